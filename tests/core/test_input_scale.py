"""normalize_inputs: SAEs train on activations scaled to a mean squared norm of d_in, and are saved for
raw ones."""

import json

import torch

from sae_core import Sae
from sae_core.models import capture_residuals, run_until_captured
from tests.support.tiny import tiny_model
from tests.support.training import make_trainer, params, token_data


def raw_activations(model, ids, hookpoint):
    with torch.no_grad(), capture_residuals(model, [hookpoint], stop_early=False) as acts:
        run_until_captured(model, ids)
    return acts[hookpoint].reshape(-1, acts[hookpoint].shape[-1])[1:]  # skip the excluded BOS position


def test_saved_sae_takes_raw_activations_and_matches_training(tmp_path):
    model = tiny_model()
    data = token_data(n_seq=48)
    # In dataset order, so that the first step is data[:4].
    trainer = make_trainer(
        tmp_path, model=model, data=data, normalize_inputs=True, lr=3e-3, shuffle_sequences=False
    )
    trainer.fit()
    hookpoint = "layers.1"
    scale = trainer.input_scales[hookpoint]
    # The scale brings the first step's activations to a mean squared norm of d_in (here from the first batch,
    # BOS excluded as in training).
    first = torch.cat([raw_activations(model, data[i : i + 1], hookpoint) for i in range(4)])
    assert abs((first * scale).pow(2).sum(1).mean().item() / first.shape[1] - 1.0) < 1e-4
    assert scale != 1.0

    x = raw_activations(model, data[:2], hookpoint)
    saved = Sae.load_from_disk(tmp_path / "run" / hookpoint)
    trained = trainer.saes[hookpoint]
    raw_out = saved(x)
    scaled_out = trained(x * scale)
    torch.testing.assert_close(raw_out.sae_out, scaled_out.sae_out / scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw_out.latent_indices, scaled_out.latent_indices)
    torch.testing.assert_close(raw_out.fvu, scaled_out.fvu, rtol=1e-5, atol=1e-6)  # FVU ignores the scale
    saved_cfg = json.loads((tmp_path / "run" / hookpoint / "cfg.json").read_text())
    assert saved_cfg["input_scale_folded"] == scale
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["input_scales"][hookpoint] == scale


def test_resume_keeps_the_scale_and_is_exact(tmp_path):
    data = token_data(n_seq=48)
    full = make_trainer(tmp_path, data=data, run_name="full", normalize_inputs=True)
    full.fit()
    first = make_trainer(tmp_path, data=data, run_name="split", normalize_inputs=True, save_every=100)
    first.fit(max_steps=5)
    second = make_trainer(tmp_path, data=data, run_name="split", normalize_inputs=True, resume=True)
    assert second.input_scales == full.input_scales
    second.fit()
    for name, value in params(full).items():
        torch.testing.assert_close(params(second)[name], value, rtol=0, atol=0, msg=name)


def test_without_the_option_nothing_is_scaled(tmp_path):
    trainer = make_trainer(tmp_path, data=token_data(n_seq=16))
    trainer.fit()
    assert set(trainer.input_scales.values()) == {1.0}
    assert "input_scale_folded" not in json.loads((tmp_path / "run" / "layers.0" / "cfg.json").read_text())
