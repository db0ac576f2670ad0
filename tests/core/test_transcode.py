"""Transcoders (--transcode): encode a module's input, predict its output; the skip connection; sparsify's
layout both ways; evaluation with the prediction spliced in; refusals."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sae_core import ConfigError, Sae, SaeConfig, SaeTrainer, TrainConfig
from sae_core.config import RunConfig
from sae_core.errors import EvalError, SaeLoadError
from sae_core.evaluate import evaluate
from sae_core.export import saelens_files
from sae_core.models import capture_residuals, hookpoint_module, run_until_captured
from sae_core.run import parse_run_config
from sae_core.sweep import SweepTrainer
from tests.support.tiny import tiny_model
from tests.support.training import Tok, token_data

D = 32  # the tiny models' width; their MLPs are 2 * D wide inside


def llama(n_layers: int = 2):
    """A tiny Llama whose MLPs have a trained model's output scale: randomly initialised ones output about
    1e-3 of their input's scale, which a default learning rate overshoots."""
    model = tiny_model("llama", n_layers=n_layers, d=D)
    with torch.no_grad():
        for block in model.model.layers:
            for linear in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
                linear.weight.mul_(5)
    return model


def transcoder_trainer(tmp_path, model, hookpoints, run_name="run", skip=False, **kw):
    cfg = TrainConfig(
        SaeConfig(expansion_factor=4, k=8, transcode=True, skip_connection=skip),
        lr_warmup_steps=2,
        save_dir=str(tmp_path),
        run_name=run_name,
        hookpoints=hookpoints,
        **{"batch_size": 4, "max_tokens": 64 * 16, **kw},
    )
    return SaeTrainer(cfg, token_data(64, 16), model, tokenizer=Tok(), progress=False)


def module_io(model, hookpoint, ids):
    """(input, output) of a module in a plain forward, read by hooks of the test's own."""
    seen = {}
    module = hookpoint_module(model, hookpoint)
    handle = module.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen["x"], seen["y"]


def random_transcoder(d_in=D, d_out=D, skip=True, seed=0):
    torch.manual_seed(seed)
    sae = Sae(d_in, SaeConfig(num_latents=64, k=8, transcode=True, skip_connection=skip), d_out=d_out)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    return sae


def test_training_on_the_mlps_predicts_their_outputs_and_lowers_the_output_fvu(tmp_path):
    model = llama()
    trainer = transcoder_trainer(tmp_path, model, ["layers.*.mlp"], log_every=1)
    assert (trainer.d_in, trainer.d_out) == (D, D)
    first = trainer._train_step()  # W_dec starts at zero and b_dec at the outputs' mean: FVU exactly 1
    trainer.step += 1
    assert first.metrics["fvu/layers.0.mlp"] == pytest.approx(1.0, abs=1e-5)
    trainer.fit()
    report = evaluate(model, trainer.saes, token_data(16, 16, seed=5), exclude_tokens=[0])
    assert report.settings["transcoders"] == ["layers.0.mlp", "layers.1.mlp"]
    for h in ("layers.0.mlp", "layers.1.mlp"):
        assert report.hookpoints[h]["fvu"] < 0.85, (h, report.hookpoints[h]["fvu"])
        cfg = json.loads((tmp_path / "run" / h / "cfg.json").read_text())
        assert cfg["transcode"] is True and cfg["skip_connection"] is False
        assert (cfg["d_in"], cfg["d_out"]) == (D, D) and cfg["stream"].startswith("transcoder: input of")
        loaded = Sae.load_from_disk(tmp_path / "run" / h)
        assert loaded.cfg.transcode and loaded.W_skip is None
        torch.testing.assert_close(loaded.W_dec, trainer.saes[h].W_dec)


def test_a_skip_connection_learns_a_linear_module_of_other_widths_and_saves(tmp_path):
    # down_proj is linear, from the MLP's 2 * D to D: the skip connection can represent it exactly.
    model = llama()
    hookpoint = "layers.1.mlp.down_proj"
    with_skip = transcoder_trainer(tmp_path, model, [hookpoint], "skip", skip=True)
    without = transcoder_trainer(tmp_path, model, [hookpoint], "plain")
    assert (with_skip.d_in, with_skip.d_out) == (2 * D, D)
    fvu = {name: t.fit()[f"fvu/{hookpoint}"] for name, t in (("skip", with_skip), ("plain", without))}
    assert fvu["skip"] < 0.5 * fvu["plain"], fvu

    tensors = load_file(tmp_path / "skip" / hookpoint / "sae.safetensors")
    assert tensors["W_skip"].shape == (D, 2 * D) and tensors["W_skip"].abs().max() > 0.01
    assert tensors["W_dec"].shape == (4 * 2 * D, D) and tensors["b_dec"].shape == (D,)
    loaded = Sae.load_from_disk(tmp_path / "skip" / hookpoint)
    x, y = module_io(model, hookpoint, token_data(4, 16, seed=3))
    torch.testing.assert_close(loaded(x, target=y).sae_out, with_skip.saes[hookpoint](x, target=y).sae_out)


def test_accumulated_batches_give_the_update_of_one_big_batch(tmp_path):
    # The first step sets b_dec to the step's mean output, where its gradient is only rounding: were it
    # stepped, Adam would make that rounding (which depends on how the sums are split) a full-size update.
    model = llama()
    one = transcoder_trainer(tmp_path, model, ["layers.1.mlp"], "one", skip=True, lr=1e-3, max_tokens=3 * 64)
    two = transcoder_trainer(  # the same global batches of 4 sequences, each in two halves
        tmp_path,
        model,
        ["layers.1.mlp"],
        "two",
        True,
        lr=1e-3,
        max_tokens=3 * 64,
        batch_size=2,
        grad_acc_steps=2,
    )
    for _ in range(3):
        fvu = [t._train_step().metrics["fvu/layers.1.mlp"] for t in (one, two)]
        one.step, two.step = one.step + 1, two.step + 1
        assert fvu[0] == pytest.approx(fvu[1], rel=1e-5)
    for name, tensor in one.saes["layers.1.mlp"].state_dict().items():
        torch.testing.assert_close(two.saes["layers.1.mlp"].state_dict()[name], tensor, atol=1e-6, rtol=1e-5)


def test_save_and_load_round_trip_keeps_every_tensor_and_widths_are_checked(tmp_path):
    sae = random_transcoder(d_in=2 * D, d_out=D)
    sae.save_to_disk(tmp_path / "t")
    loaded = Sae.load_from_disk(tmp_path / "t")
    assert (loaded.d_in, loaded.d_out, loaded.cfg.transcode, loaded.cfg.skip_connection) == (2 * D, D, 1, 1)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x, y = torch.randn(10, 2 * D), torch.randn(10, D)
    assert torch.equal(loaded(x, target=y).sae_out, sae(x, target=y).sae_out)
    with pytest.raises(ConfigError, match="maps width 64 to 32: pass target="):
        sae(x)

    # sparsify also allows a skip connection on an autoencoder: [d_in, d_in], in the saved folder too.
    plain = Sae(D, SaeConfig(num_latents=64, k=8, skip_connection=True))
    with torch.no_grad():
        plain.W_skip.normal_()
    plain.save_to_disk(tmp_path / "plain")
    reloaded = Sae.load_from_disk(tmp_path / "plain")
    assert torch.equal(reloaded.W_skip, plain.W_skip) and reloaded.W_skip.shape == (D, D)
    for sae_ in (sae, plain):  # SAELens's TopK format has neither
        with pytest.raises(ConfigError, match="a TopK transcoder has no SAELens equivalent"):
            saelens_files(sae_, "blocks.0.hook_mlp_out", {})

    cfg_path = tmp_path / "t" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "d_out": D + 1}))
    with pytest.raises(SaeLoadError, match=r"'b_dec' has shape \(32,\), but cfg.json .*d_out=33"):
        Sae.load_from_disk(tmp_path / "t")
    cfg_path.write_text(json.dumps({**cfg, "transcode": False}))  # an autoencoder's output is its input
    with pytest.raises(SaeLoadError, match="'d_out' must be d_in=64"):
        Sae.load_from_disk(tmp_path / "t")


def test_sparsify_loads_our_transcoders_and_we_load_its_with_the_same_outputs(tmp_path):
    sparsify = pytest.importorskip(
        "sparsify", reason="eai-sparsify is in the test extra: pip install -e .[test]"
    )
    x = torch.randn(20, D)

    ours = random_transcoder()
    ours.save_to_disk(tmp_path / "ours")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "ours")
    assert theirs.cfg.transcode and theirs.cfg.skip_connection
    torch.testing.assert_close(theirs(x).sae_out, ours(x).sae_out)

    torch.manual_seed(1)
    written = sparsify.SparseCoder(
        D, sparsify.SparseCoderConfig(num_latents=64, k=8, transcode=True, skip_connection=True)
    )
    with torch.no_grad():
        for p in written.parameters():
            p.normal_(0, 0.3)
    written.save_to_disk(tmp_path / "theirs")
    loaded = Sae.load_from_disk(tmp_path / "theirs")
    assert loaded.cfg.transcode and (loaded.d_in, loaded.d_out) == (D, D)
    torch.testing.assert_close(loaded(x).sae_out, written(x).sae_out)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_evaluation_replaces_the_module_output_by_the_prediction_from_its_input(kind):
    model = tiny_model(kind, n_layers=3, d=D).double()
    saes = {h: random_transcoder(seed=i).double() for i, h in enumerate(("layers.0", "layers.1.mlp"))}
    ids = torch.randint(3, 300, (4, 12))
    report = evaluate(model, saes, ids, exclude_tokens=[], batch_size=2)
    assert report.settings["splice"] == "suffix"
    full = evaluate(model, saes, ids, exclude_tokens=[], batch_size=2, splice="full")
    for h, sae in saes.items():
        module = hookpoint_module(model, h)

        def predict(_m, args, kwargs, out, sae=sae):
            x = args[0] if args else kwargs["hidden_states"]
            y_hat = sae(x.reshape(-1, D)).sae_out.reshape(x.shape)
            return (y_hat, *out[1:]) if isinstance(out, tuple) else y_hat

        with torch.no_grad():
            clean = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
            handle = module.register_forward_hook(predict, with_kwargs=True)
            spliced = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
            handle.remove()
            inputs = {}
            with capture_residuals(model, [h], inputs=inputs) as outputs:
                run_until_captured(model, ids)
        kl = F.kl_div(
            F.log_softmax(spliced, -1), F.log_softmax(clean, -1), log_target=True, reduction="batchmean"
        )
        y = outputs[h].reshape(-1, D)
        y_hat = sae(inputs[h].reshape(-1, D)).sae_out
        fvu = (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
        assert report.hookpoints[h]["kl"] == pytest.approx(kl.item(), rel=1e-6) and kl > 0
        assert report.hookpoints[h]["kl"] == pytest.approx(full.hookpoints[h]["kl"], rel=1e-9)
        assert report.hookpoints[h]["fvu"] == pytest.approx(fvu.item(), rel=1e-9)


def test_a_sweep_trains_transcoders_as_runs_of_their_own_would(tmp_path):
    model = llama(n_layers=1)
    cfg = TrainConfig(
        SaeConfig(expansion_factor=4, k=8, transcode=True),
        batch_size=4,
        lr_warmup_steps=2,
        save_dir=str(tmp_path),
        run_name="sw",
        hookpoints=["layers.0.mlp"],
        max_tokens=16 * 16,
    )
    sweep = SweepTrainer(cfg, token_data(16, 16), model, sweep=["k=4,8"], tokenizer=Tok(), progress=False)
    sweep.fit()
    alone = transcoder_trainer(tmp_path, model, ["layers.0.mlp"], "alone", max_tokens=16 * 16)
    alone.fit()
    swept = Sae.load_from_disk(tmp_path / "sw" / "k8" / "layers.0.mlp")
    assert swept.cfg.transcode and swept.cfg.k == 8
    for name, tensor in alone.saes["layers.0.mlp"].state_dict().items():
        torch.testing.assert_close(swept.state_dict()[name], tensor, msg=name)


def test_refusals_name_what_is_wrong(tmp_path):
    model = llama()
    with pytest.raises(ConfigError, match=r"input of hookpoint 'embed_tokens' is \[1, 2\], not a \[batch"):
        transcoder_trainer(tmp_path, model, ["embed_tokens"])  # token ids, not hidden states
    with pytest.raises(ConfigError, match=r"share their widths.*layers.0.mlp: 32 -> 32.*down_proj: 64 -> 32"):
        transcoder_trainer(tmp_path, model, ["layers.0.mlp", "layers.0.mlp.down_proj"])
    with pytest.raises(ConfigError, match="--transcode cannot train from --activations"):
        RunConfig(sae=SaeConfig(transcode=True), activations=str(tmp_path))
    with pytest.raises(ConfigError, match="--normalize_inputs is not supported with --transcode"):
        TrainConfig(SaeConfig(transcode=True), normalize_inputs=True)
    with pytest.raises(EvalError, match=r"transcoder for layers.0.mlp maps width 64 -> 32, .* maps 32 -> 32"):
        evaluate(model, {"layers.0.mlp": random_transcoder(d_in=2 * D)}, token_data(2, 8))
    cli = parse_run_config(["--transcode", "--skip_connection", "--hookpoints", "layers.*.mlp"])
    assert cli.sae.transcode and cli.sae.skip_connection and cli.hookpoints == ["layers.*.mlp"]
