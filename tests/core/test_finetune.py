"""--finetune: training starts from existing SAEs, after checking their hookpoints and shapes."""

import pytest
import torch

from sae_core import ConfigError, Sae, SaeConfig, SaeTrainer, TrainConfig
from tests.support.tiny import tiny_model
from tests.support.training import Tok, make_trainer, token_data

D = 32


def test_a_finetuned_run_starts_from_the_saved_saes_and_keeps_their_b_dec(tmp_path):
    model = tiny_model("llama", n_layers=2, d=D)
    make_trainer(tmp_path, model, run_name="first", layers=[0, 1]).fit()
    saved = Sae.load_from_disk(tmp_path / "first" / "layers.1")
    tuned = make_trainer(
        tmp_path, model, run_name="tuned", layers=[1], finetune=str(tmp_path / "first"), log_every=1
    )
    assert list(tuned.saes) == ["layers.1"]
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tuned.saes["layers.1"].state_dict()[name], tensor), name
    b_dec = saved.b_dec.clone()
    # The first step's FVU is the saved SAE's on that step's tokens: nothing was re-initialised.
    x = tuned.activations.batch(0).inputs["layers.1"]
    fvu = tuned._train_step().metrics["fvu/layers.1"]
    assert fvu == pytest.approx(saved(x).fvu.item(), rel=1e-5)
    # Adam moved b_dec by at most about one lr (not to the step's mean).
    assert (tuned.saes["layers.1"].b_dec - b_dec).abs().max() <= 1.01 * tuned.lr


def test_a_source_without_the_hookpoint_or_of_another_shape_is_refused_naming_it(tmp_path):
    model = tiny_model("llama", n_layers=3, d=D)
    make_trainer(tmp_path, model, run_name="first", layers=[0, 1], max_tokens=16 * 8).fit()
    source = str(tmp_path / "first")
    with pytest.raises(
        ConfigError, match=r"--finetune .*first: no hookpoint matching layers.2 .*layers.0, layers.1"
    ):
        make_trainer(tmp_path, model, run_name="b", layers=[1, 2], finetune=source)
    wider = TrainConfig(
        SaeConfig(expansion_factor=8, k=4), save_dir=str(tmp_path), run_name="c", layers=[0], finetune=source
    )
    with pytest.raises(
        ConfigError,
        match=r"the SAE for layers.0 is an SAE of d_in=32, 128 latents, but this run trains an SAE of "
        r"d_in=32, 256 latents; set --expansion_factor",
    ):
        SaeTrainer(wider, token_data(), model, tokenizer=Tok())
    transcoder = TrainConfig(
        SaeConfig(expansion_factor=4, k=4, transcode=True),
        save_dir=str(tmp_path),
        run_name="d",
        hookpoints=["layers.0"],
        finetune=source,
    )
    with pytest.raises(
        ConfigError, match=r"is an SAE of d_in=32, 128 latents, but this run trains a transcoder"
    ):
        SaeTrainer(transcoder, token_data(), model, tokenizer=Tok())
    with pytest.raises(ConfigError, match="--normalize_inputs is not supported with --finetune"):
        TrainConfig(finetune=source, normalize_inputs=True)
