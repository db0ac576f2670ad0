"""The evaluation metrics contract (docs/metrics.md), on tiny float64 models against plain PyTorch."""

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from sae_core import Sae, SaeConfig
from sae_core.evaluate import METRIC_KEYS, PLOT_FILES, EvalError, evaluate, evaluate_run, main
from sae_core.models import find_blocks
from tests.support.tiny import child_env, shared_cache_model, tiny_model

BOS, EOS, PAD = 0, 1, 2
SPECIAL = [BOS, PAD]
D = 32


def token_ids(n_seq=7, seq_len=24, seed=0):
    """Random text with BOS at position 0 and a few pads inside: exclusion of inputs and targets matters."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (n_seq, seq_len), generator=g)
    ids[:, 0] = BOS
    ids[1, seq_len // 4] = ids[-1, seq_len // 2] = ids[-2, -1] = PAD
    return ids


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", n_layers=3, d=D).double()


class IdentitySae:
    """x̂ = x (+ offset), bit for bit: an exact splice."""

    def __init__(self, d=D, offset=None):
        self.d_in = self.num_latents = d
        self.offset = offset

    def encode(self, x):
        return x, torch.arange(self.d_in).expand(x.shape[0], -1)

    def decode(self, acts, indices):
        return acts if self.offset is None else acts + self.offset


def constant_sae(value: torch.Tensor) -> Sae:
    """A real Sae whose decoder is zero: it predicts `value` for every token."""
    sae = Sae(D, SaeConfig(num_latents=2 * D, k=4), dtype=torch.float64)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(value)
    return sae


def plus_minus_identity_sae() -> Sae:
    """A real TopK Sae that reconstructs exactly: latents ReLU(x) and ReLU(-x), decoder rows +e_i and -e_i."""
    sae = Sae(D, SaeConfig(num_latents=2 * D, k=D), dtype=torch.float64)
    eye = torch.eye(D, dtype=torch.float64)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_dec.zero_()
    return sae


# ----------------------------------------------------------------------------------------------------------
# An independent reference: whole tensors, full forwards with hooks, torch.nn.functional losses.


def block_output(model, layer, ids):
    captured = {}
    block = find_blocks(model)[1][layer]
    handle = block.register_forward_hook(
        lambda m, a, o: captured.setdefault("x", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    handle.remove()
    return captured["x"], logits


def spliced_logits(model, layer, ids, keep, values):
    def replace(_m, _a, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[keep] = values
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = find_blocks(model)[1][layer].register_forward_hook(replace)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    handle.remove()
    return logits


def reference(model, sae, layer, ids, exclude=SPECIAL):
    keep = ~torch.isin(ids, torch.tensor(exclude, dtype=torch.long))
    positions = keep[:, :-1] & keep[:, 1:]
    targets = ids[:, 1:][positions]
    x_all, clean = block_output(model, layer, ids)
    x = x_all[keep]
    with torch.no_grad():
        if isinstance(sae, Sae):
            out = sae(x)
            x_hat, acts, indices = out.sae_out, out.latent_acts, out.latent_indices
        else:
            acts, indices = sae.encode(x)
            x_hat = sae.decode(acts, indices)
    mean = x.mean(0)

    def ce(logits):
        return F.cross_entropy(logits[:, :-1][positions], targets).item()

    def kl(logits):
        p = F.log_softmax(clean[:, :-1][positions], -1)
        q = F.log_softmax(logits[:, :-1][positions], -1)
        return F.kl_div(q, p, log_target=True, reduction="batchmean").item()

    variants = {"sae": x_hat, "zero": torch.zeros_like(mean), "mean": mean}
    logits = {v: spliced_logits(model, layer, ids, keep, value) for v, value in variants.items()}
    fired = torch.zeros(sae.num_latents, dtype=torch.bool)
    fired[indices[acts > 0]] = True
    ce_clean, ce_v = ce(clean), {v: ce(lg) for v, lg in logits.items()}
    return {
        "fvu": ((x - x_hat) ** 2).sum().item() / ((x - mean) ** 2).sum().item(),
        "mse": ((x - x_hat) ** 2).mean().item(),
        "cosine": F.cosine_similarity(x, x_hat, dim=1).mean().item(),
        "rel_bias": (x_hat**2).sum().item() / (x * x_hat).sum().item(),
        "l0": (acts > 0).sum(1).double().mean().item(),
        "dead_pct_eval": 100.0 * (~fired).double().mean().item(),
        "ce_clean": ce_clean,
        "ce_sae": ce_v["sae"],
        "ce_zero": ce_v["zero"],
        "ce_mean": ce_v["mean"],
        "delta_ce": ce_v["sae"] - ce_clean,
        "loss_recovered_zero": (ce_v["zero"] - ce_v["sae"]) / (ce_v["zero"] - ce_clean),
        "loss_recovered_mean": (ce_v["mean"] - ce_v["sae"]) / (ce_v["mean"] - ce_clean),
        "kl": kl(logits["sae"]),
        "kl_zero": kl(logits["zero"]),
        "kl_mean": kl(logits["mean"]),
        "tokens": int(keep.sum()),
        "ce_positions": int(positions.sum()),
        "mean": mean,
    }


# ----------------------------------------------------------------------------------------------------------
# The contract


def test_mean_predictor_scores_fvu_one_and_perfect_reconstruction_zero(llama):
    ids = token_ids()
    mean = reference(llama, IdentitySae(), 1, ids)["mean"]
    saes = {"layers.1": constant_sae(mean), "layers.2": plus_minus_identity_sae()}
    # The mean predictor must sit at layer 1, where `mean` was measured; the exact SAE can go anywhere.
    report = evaluate(llama, saes, ids, exclude_tokens=SPECIAL, batch_size=3)
    mean_pred, perfect = report.hookpoints["layers.1"], report.hookpoints["layers.2"]
    assert mean_pred["fvu"] == pytest.approx(1.0, abs=1e-12)
    assert perfect["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert perfect["cosine"] == pytest.approx(1.0, abs=1e-12) and perfect["rel_bias"] == pytest.approx(1.0)
    # Splicing in the mean is mean-ablation itself: nothing of the loss is recovered against it.
    assert mean_pred["loss_recovered_mean"] == pytest.approx(0.0, abs=1e-9)
    assert perfect["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-9) and perfect["kl"] < 1e-12


def test_constant_offset_is_penalised(llama):
    ids = token_ids()
    ref = reference(llama, IdentitySae(), 0, ids)
    x = block_output(llama, 0, ids)[0][~torch.isin(ids, torch.tensor(SPECIAL))]
    x_sst = ((x - ref["mean"]) ** 2).sum().item()
    offset = torch.full((D,), 0.01, dtype=torch.float64)
    saes = {"layers.0": IdentitySae(offset=offset)}
    shifted = evaluate(llama, saes, ids, exclude_tokens=SPECIAL).hookpoints["layers.0"]
    expected = ref["tokens"] * offset.pow(2).sum().item() / x_sst
    assert shifted["fvu"] == pytest.approx(expected, rel=1e-9) and shifted["fvu"] > 0
    # A mean predictor off by the same constant scores worse than the mean predictor (1), not the same.
    off_mean = evaluate(llama, {"layers.0": constant_sae(ref["mean"] + offset)}, ids, exclude_tokens=SPECIAL)
    assert off_mean.hookpoints["layers.0"]["fvu"] == pytest.approx(1 + expected, rel=1e-9)


def test_identity_splice_gives_zero_kl_zero_delta_ce_and_full_loss_recovered(llama):
    report = evaluate(llama, {"layers.1": IdentitySae()}, token_ids(), exclude_tokens=SPECIAL, batch_size=4)
    m = report.hookpoints["layers.1"]
    assert m["kl"] == pytest.approx(0.0, abs=1e-14) and m["delta_ce"] == pytest.approx(0.0, abs=1e-14)
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-14)
    assert m["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-12)
    assert m["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-12)
    assert m["fvu"] == 0.0 and m["mse"] == 0.0


def test_zero_ablation_kl_equals_a_direct_computation(llama):
    ids = token_ids()
    zero = constant_sae(torch.zeros(D, dtype=torch.float64))
    m = evaluate(llama, {"layers.0": zero}, ids, exclude_tokens=SPECIAL, batch_size=2).hookpoints["layers.0"]

    # Direct: zero block 0's output at non-special positions, then the mean over counted positions of
    # sum_v p_clean(v) (log p_clean(v) - log p_zero(v)).
    keep = ~torch.isin(ids, torch.tensor(SPECIAL))
    clean = block_output(llama, 0, ids)[1]
    ablated = spliced_logits(llama, 0, ids, keep, 0.0)
    positions = keep[:, :-1] & keep[:, 1:]
    p = clean[:, :-1][positions].log_softmax(-1)
    q = ablated[:, :-1][positions].log_softmax(-1)
    direct = (p.exp() * (p - q)).sum(-1).mean().item()
    assert direct > 1e-4
    assert m["kl_zero"] == pytest.approx(direct, rel=1e-9)
    assert m["kl"] == pytest.approx(direct, rel=1e-9)  # this SAE *is* zero-ablation
    assert m["loss_recovered_zero"] == pytest.approx(0.0, abs=1e-12)


def test_all_metrics_agree_with_a_plain_pytorch_computation(llama):
    ids = token_ids(n_seq=7)
    torch.manual_seed(1)
    saes = {}
    for layer in (0, 2):
        sae = Sae(D, SaeConfig(num_latents=128, k=6), dtype=torch.float64, hookpoint=f"layers.{layer}")
        with torch.no_grad():  # a plausible SAE: centred on the data, so FVU is well below 1
            sae.b_dec.copy_(reference(llama, IdentitySae(), layer, ids)["mean"])
        saes[f"layers.{layer}"] = sae
    report = evaluate(llama, saes, ids, exclude_tokens=SPECIAL, batch_size=3)  # 3 batches, the last one short
    for h, sae in saes.items():
        ref = reference(llama, sae, int(h.split(".")[1]), ids)
        got = report.hookpoints[h]
        for key in METRIC_KEYS:
            if key in ref:
                assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-12), (h, key)
        hist = got["density_hist"]
        assert sum(hist["counts"]) + hist["never_fired"] == sae.num_latents
        assert hist["never_fired"] == round(ref["dead_pct_eval"] * sae.num_latents / 100)
        assert got["dead_pct_train"] is None
    s = report.settings
    assert s["tokens"] == ref["tokens"] and s["ce_positions"] == ref["ce_positions"]
    assert 0 < ref["fvu"] < 1


@pytest.mark.parametrize("kind", ["llama", "neox", "gpt2"])
def test_suffix_forward_from_the_block_equals_a_full_forward_with_a_hook(kind):
    model = tiny_model(kind, n_layers=3, d=D).double()
    ids = token_ids(n_seq=4, seq_len=16)
    torch.manual_seed(0)
    saes = {f"layers.{i}": Sae(D, SaeConfig(num_latents=64, k=8), dtype=torch.float64) for i in (0, 1, 2)}
    suffix = evaluate(model, saes, ids, exclude_tokens=SPECIAL, batch_size=2, splice="suffix")
    full = evaluate(model, saes, ids, exclude_tokens=SPECIAL, batch_size=2, splice="full")
    assert (suffix.settings["splice"], full.settings["splice"]) == ("suffix", "full")
    for h in saes:
        for key in METRIC_KEYS:
            if isinstance(full.hookpoints[h][key], float):
                expected = full.hookpoints[h][key]
                assert suffix.hookpoints[h][key] == pytest.approx(expected, rel=1e-9, abs=1e-13), (h, key)
    ref = reference(model, saes["layers.1"], 1, ids)
    assert suffix.hookpoints["layers.1"]["kl"] == pytest.approx(ref["kl"], rel=1e-6)


def test_a_model_whose_logits_the_suffix_cannot_replay_falls_back_to_full_forwards():
    # Gemma 2 soft-caps its logits after the final norm: the suffix path must notice and not be used.
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=300,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=1.0,
    )
    model = Gemma2ForCausalLM(cfg).eval().double()
    ids = token_ids(n_seq=2, seq_len=10)
    saes = {"layers.0": IdentitySae(offset=torch.full((D,), 0.1, dtype=torch.float64))}
    with pytest.warns(UserWarning, match="does not reproduce its logits"):
        auto = evaluate(model, saes, ids, exclude_tokens=SPECIAL)
    assert auto.settings["splice"] == "full"
    ref = reference(model, saes["layers.0"], 0, ids)
    assert auto.hookpoints["layers.0"]["kl"] == pytest.approx(ref["kl"], rel=1e-6)
    with pytest.raises(EvalError, match="does not reproduce its logits"):
        evaluate(model, saes, ids, exclude_tokens=SPECIAL, splice="suffix")


def test_a_model_passing_state_outside_the_residual_stream_falls_back_to_full_forwards():
    # Block 1 caches its input for block 2, like a shared KV cache: clean replays pass, spliced ones fail.
    model = shared_cache_model(n_layers=3, d=D).double()
    ids = token_ids(n_seq=4, seq_len=10)
    saes = {
        h: IdentitySae(offset=torch.full((D,), 0.1, dtype=torch.float64)) for h in ("layers.0", "layers.1")
    }
    with pytest.warns(UserWarning, match="does not reproduce its logits with layers.0 spliced"):
        auto = evaluate(model, saes, ids, exclude_tokens=SPECIAL, batch_size=2)
    assert auto.settings["splice"] == "full"
    for h, layer in (("layers.0", 0), ("layers.1", 1)):
        ref = reference(model, saes[h], layer, ids)
        for key in ("ce_sae", "ce_zero", "ce_mean", "kl", "kl_zero", "kl_mean"):
            assert auto.hookpoints[h][key] == pytest.approx(ref[key], rel=1e-6, abs=1e-12), (h, key)
    with pytest.raises(EvalError, match="does not reproduce its logits with layers.0 spliced"):
        evaluate(model, saes, ids, exclude_tokens=SPECIAL, splice="suffix")


def test_special_tokens_are_excluded_by_default_and_included_on_request(llama):
    ids = token_ids()
    excluded = evaluate(llama, {"layers.0": IdentitySae()}, ids, exclude_tokens=SPECIAL).settings
    included = evaluate(llama, {"layers.0": IdentitySae()}, ids, exclude_tokens=None).settings
    n_special = int(torch.isin(ids, torch.tensor(SPECIAL)).sum())
    assert excluded["tokens"] == ids.numel() - n_special and excluded["include_special_tokens"] is False
    assert included["tokens"] == ids.numel() and included["ce_positions"] == ids.shape[0] * (ids.shape[1] - 1)
    assert included["include_special_tokens"] is True
    # A position counts for CE only when its input and its target are both ordinary tokens.
    keep = ~torch.isin(ids, torch.tensor(SPECIAL))
    assert excluded["ce_positions"] == int((keep[:, :-1] & keep[:, 1:]).sum())


@pytest.mark.parametrize(
    "saes, ids, message",
    [
        (
            {"layers.0": IdentitySae(d=16)},
            token_ids(),
            "has d_in=16, but the model's residual stream at layers.0 has width 32",
        ),
        ({"layers.3": IdentitySae()}, token_ids(), "hookpoint 'layers.3' is not in the model"),
        ({"embed": IdentitySae()}, token_ids(), "hookpoint 'embed' is not in the model"),
        ({"layers.0": IdentitySae()}, torch.zeros(0, 16, dtype=torch.long), "no evaluation tokens"),
        ({"layers.0": IdentitySae()}, torch.tensor([[BOS, PAD, PAD]]), "no evaluation tokens: all 3 tokens"),
        ({}, token_ids(), "no SAEs to evaluate"),
    ],
)
def test_bad_input_is_a_one_line_eval_error(llama, saes, ids, message):
    with pytest.raises(EvalError) as e:
        evaluate(llama, saes, ids, exclude_tokens=SPECIAL)
    assert message in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------
# A real training run: held-out selection, training counters, files, the command line


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, tiny_text_file):
    from sae_core.run import main as train

    save_dir = tmp_path_factory.mktemp("runs")
    train(
        [
            str(tiny_model_dir),
            str(tiny_text_file),
            "--ctx_len",
            "32",
            "--batch_size",
            "4",
            "--expansion_factor",
            "2",
            "--k",
            "4",
            "--layers",
            "0",
            "2",
            "--max_tokens",
            "512",
            "--lr_warmup_steps",
            "1",
            "--dead_feature_threshold",
            "64",
            "--save_dir",
            str(save_dir),
            "--run_name",
            "r",
            "--device",
            "cpu",
        ]
    )
    return save_dir / "r"


def test_cli_writes_report_markdown_and_plots_on_held_out_tokens(trained_run, tiny_model_dir):
    env = child_env(OMP_NUM_THREADS="1")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_core.evaluate",
            str(tiny_model_dir),
            str(trained_run),
            "--max_tokens",
            "256",
            "--batch_size",
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = trained_run / "eval"
    report = json.loads((out / "report.json").read_text())
    run = json.loads((trained_run / "run.json").read_text())
    s = report["settings"]
    assert s["offset"] == run["train_sequences"] == 16 and "after the 16 training sequences" in s["held_out"]
    assert (s["model"], s["dataset"], s["split"]) == (str(tiny_model_dir), run["dataset"], "train")
    assert s["ctx_len"] == 32
    assert s["sequences"] == 8 and s["include_special_tokens"] is False and s["sae_path"] == str(trained_run)
    assert list(report["hookpoints"]) == ["layers.0", "layers.2"]
    for m in report["hookpoints"].values():
        assert list(m) == list(METRIC_KEYS)
        assert m["dead_pct_train"] is not None and 0 <= m["dead_pct_eval"] <= 100 and m["fvu"] > 0
    md = (out / "report.md").read_text()
    assert "| hookpoint | FVU | L0 |" in md and "`layers.2`" in md
    for name in PLOT_FILES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_held_out_offset_follows_ctx_len_and_running_out_is_an_error(trained_run, tiny_model_dir):
    # Training used 16 sequences of 32 tokens = 16 * 31 text tokens after BOS; at ctx_len 64 (63 after BOS)
    # the first sequence that does not overlap them is ceil(496 / 63) = 8.
    report = evaluate_run(
        str(tiny_model_dir), str(trained_run), ctx_len=64, max_tokens=128, hookpoints="layers.0"
    )
    s = report.settings
    assert s["offset"] == 8 and s["ctx_len"] == 64 and s["sequences"] == 2
    assert list(report.hookpoints) == ["layers.0"]
    with pytest.raises(EvalError, match="no held-out tokens left"):
        evaluate_run(str(tiny_model_dir), str(trained_run), offset=10**6)


def test_cli_bad_input_is_one_line_and_exits_2(trained_run, tmp_path, capsys):
    from tests.support.tiny import save_tiny_model

    wide = save_tiny_model(tmp_path / "wide", d=48)  # another model: the SAEs do not fit it
    capsys.readouterr()
    for argv, message in [
        (
            [str(wide), str(trained_run)],
            "has d_in=32, but the model's residual stream at layers.0 has width 48",
        ),
        ([str(wide), str(tmp_path / "missing")], "no SAE folder"),
        ([str(wide), str(trained_run), "--max_tokens", "0"], "max_tokens must be positive"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]  # above it, at most the progress bars of model loading
        assert e.value.code == 2 and last.startswith("error: ") and message in last, err
        assert "Traceback" not in err


def test_cli_rejects_abbreviated_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["model", "sae", "--max_tok", "100"])  # argparse's default would take it for --max_tokens
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "error: unrecognized arguments: --max_tok 100 (see --help)\n"


def test_dead_pct_train_comes_from_the_training_counters(trained_run):
    from sae_core.evaluate import training_dead_pct

    state_file = next((trained_run / "trainer_state").glob("rank0-step*.pt"))
    state = torch.load(state_file, weights_only=True)
    threshold = json.loads(state["config"])["dead_feature_threshold"]
    dead = training_dead_pct(trained_run)
    for h, counters in state["tokens_since_fired"].items():
        assert dead[h] == pytest.approx(100 * (counters >= threshold).double().mean().item())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training_dead_pct(trained_run / "layers.0") == {}  # no trainer state there


def test_dead_pct_train_skips_a_step_that_not_every_rank_saved(tmp_path):
    # --distribute_layers on 2 ranks: rank 0 holds layers.0, rank 1 layers.1. A crash after rank 0 saved
    # step 4 but before rank 1 did: the counters must come from step 2, the newest complete one.
    from sae_core.checkpoint import save_state
    from sae_core.evaluate import training_dead_pct

    (tmp_path / "run.json").write_text(json.dumps({"world_size": 2, "distribute_layers": True}))
    config = json.dumps({"dead_feature_threshold": 10})
    for rank, step, dead in [(0, 2, 1), (1, 2, 3), (0, 4, 2)]:
        counters = torch.tensor([0] * (4 - dead) + [10] * dead)
        save_state(
            tmp_path,
            rank,
            step,
            {"step": step, "saes": {}, "config": config, "tokens_since_fired": {f"layers.{rank}": counters}},
        )
    assert training_dead_pct(tmp_path) == {"layers.0": 25.0, "layers.1": 75.0}
