"""SaeTrainer on tiny random models: learning, exact accumulation, resume, selection, early stop."""

import json
import sys
import types

import pytest
import torch

from sae_core import ConfigError, SaeConfig, SaeTrainer, TrainConfig
from sae_core.errors import CheckpointError
from sae_core.models import capture_residuals, find_blocks, run_until_captured, select_hookpoints
from tests.support.tiny import tiny_model
from tests.support.training import Tok, make_trainer, params, token_data


def test_training_reduces_fvu_on_a_tiny_model(tmp_path):
    trainer = make_trainer(tmp_path, data=token_data(n_seq=320, vocab=40), lr=3e-3, log_every=1)
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    for h in trainer.hookpoints:
        assert last[f"fvu/{h}"] < 0.75 * first[f"fvu/{h}"]
    assert last["tokens"] == 320 * 15  # BOS excluded: 15 of 16 tokens per sequence
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir()) == [
        "layers.0",
        "layers.1",
        "layers.2",
        "trainer_state",
    ]


def test_grad_and_micro_accumulation_equal_one_big_batch(tmp_path):
    model = tiny_model()
    # A fixed, moderate LR: Adam turns float rounding of the summed gradients into parameter differences
    # proportional to the LR (the tiny model's default, 0.036, would need a looser tolerance).
    big = make_trainer(tmp_path, model, run_name="big", batch_size=8, lr=1e-3)
    acc = make_trainer(tmp_path, model, run_name="acc", batch_size=4, grad_acc_steps=2, lr=1e-3)
    micro = make_trainer(tmp_path, model, run_name="micro", batch_size=8, micro_acc_steps=3, lr=1e-3)
    assert big.total_steps == acc.total_steps == micro.total_steps == 4
    for t in (big, acc, micro):
        t.fit()
    ref = params(big)
    for other in (acc, micro):
        for name, p in params(other).items():
            torch.testing.assert_close(p, ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    model = tiny_model()
    full = make_trainer(tmp_path, model, run_name="full", save_every=100)
    full.fit()
    part = make_trainer(tmp_path, model, run_name="part", save_every=100)
    part.fit(max_steps=3)
    resumed = make_trainer(tmp_path, model, run_name="part", save_every=100, resume=True)
    assert resumed.step == 3
    resumed.fit()
    for name, p in params(full).items():
        assert torch.equal(p, params(resumed)[name]), name
    for h in full.hookpoints:
        assert torch.equal(full.tokens_since_fired[h], resumed.tokens_since_fired[h])
    # Only the newest state is kept.
    assert [p.name for p in (tmp_path / "part" / "trainer_state").iterdir()] == ["rank0-step000000008.pt"]


def test_each_sae_is_updated_alone_so_only_its_gradients_are_alive(tmp_path):
    trainer = make_trainer(tmp_path)
    alive_at_update = []
    for h, opt in trainer.optimizers.items():
        step = opt.step

        def spy(step=step, h=h):
            alive_at_update.append((h, [g for g, s in trainer.saes.items() if s.W_dec.grad is not None]))
            return step()

        opt.step = spy
    trainer.fit(max_steps=2)
    assert alive_at_update == [(h, [h]) for _ in range(2) for h in trainer.hookpoints]


def test_resume_refuses_a_state_without_per_sae_optimizers(tmp_path):
    """Adam state is per SAE (state["optimizers"]); the joint-optimizer layout never shipped and is not
    read."""
    model = tiny_model()
    make_trainer(tmp_path, model, save_every=100).fit(max_steps=2)
    path = tmp_path / "run" / "trainer_state" / "rank0-step000000002.pt"
    state = torch.load(path, weights_only=True)
    state["optimizer"] = state.pop("optimizers")["layers.0"]
    torch.save(state, path)
    with pytest.raises(
        CheckpointError, match=r"rank0-step000000002.pt: no state for \['layers.0', 'layers.1'"
    ):
        make_trainer(tmp_path, model, save_every=100, resume=True)


def test_extra_loggers_get_every_record_written_to_metrics_jsonl(tmp_path):
    records = []
    cfg = TrainConfig(
        SaeConfig(expansion_factor=4, k=4),
        batch_size=4,
        lr_warmup_steps=2,
        log_every=3,
        save_dir=str(tmp_path),
        run_name="run",
    )
    trainer = SaeTrainer(
        cfg, token_data(), tiny_model(), tokenizer=Tok(), progress=False, loggers=[records.append]
    )
    last = trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 8]  # every log_every steps and the last
    assert records == lines
    assert {k: v for k, v in records[-1].items() if k not in ("step", "tokens", "tokens_per_s")} == last


def test_wandb_and_tensorboard_log_each_record_when_installed(tmp_path, monkeypatch):
    logged, scalars = [], []
    wandb = types.ModuleType("wandb")
    wandb.init = lambda name, config: types.SimpleNamespace(
        log=lambda r, step: logged.append((step, name, r))
    )
    tensorboard = types.ModuleType("torch.utils.tensorboard")

    class SummaryWriter:
        def __init__(self, folder):
            self.folder = folder

        def add_scalar(self, key, value, step):
            scalars.append((self.folder, key, step))

    tensorboard.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", tensorboard)
    make_trainer(tmp_path, log_every=4, log_to_wandb=True, log_to_tensorboard=True).fit()
    assert [(step, name) for step, name, _ in logged] == [(4, "run"), (8, "run")]
    assert (str(tmp_path / "run" / "tensorboard"), "fvu/layers.2", 8) in scalars
    assert not any(key == "step" for _, key, _ in scalars)


def test_wandb_and_tensorboard_missing_warn_and_metrics_jsonl_is_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    make_trainer(tmp_path, log_to_wandb=True, log_to_tensorboard=True).fit()
    out = capsys.readouterr().out
    assert "warning: --log_to_wandb given but wandb is not installed; logging to metrics.jsonl only" in out
    assert "warning: --log_to_tensorboard given but tensorboard is not installed" in out
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_run_json_holds_timings_and_peak_memory_only_when_profiling(tmp_path):
    make_trainer(tmp_path, run_name="plain").fit()
    plain = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert "timings" not in plain and "peak_memory_mb_per_rank" not in plain
    assert plain["config"]["profile"] is False
    make_trainer(tmp_path, run_name="profiled", profile=True).fit()
    profiled = json.loads((tmp_path / "profiled" / "run.json").read_text())
    assert set(profiled["timings"]) == {"lm_forward_s", "sae_s"}
    assert all(seconds > 0 for seconds in profiled["timings"].values())
    assert len(profiled["peak_memory_mb_per_rank"]) == 1 and profiled["peak_memory_mb_per_rank"][0]["rss"] > 0


def test_profile_may_change_on_resume(tmp_path):
    model = tiny_model()
    make_trainer(tmp_path, model).fit(max_steps=2)
    resumed = make_trainer(tmp_path, model, resume=True, profile=True)
    assert resumed.step == 2


def test_existing_checkpoint_is_never_overwritten_and_resume_checks_config(tmp_path):
    model = tiny_model()
    make_trainer(tmp_path, model).fit(max_steps=1)
    with pytest.raises(ConfigError, match="already holds a checkpoint; pass --resume"):
        make_trainer(tmp_path, model)
    with pytest.raises(ConfigError, match="differs from the checkpoint's.*batch_size"):
        make_trainer(tmp_path, model, resume=True, batch_size=2)
    with pytest.raises(ConfigError, match="nothing to resume"):
        make_trainer(tmp_path, model, run_name="other", resume=True)


def test_layer_selection():
    model = tiny_model(n_layers=6)
    assert select_hookpoints(model) == [f"layers.{i}" for i in range(6)]
    assert select_hookpoints(model, layer_stride=2) == ["layers.0", "layers.2", "layers.4"]
    assert select_hookpoints(model, layers=[4, 1]) == ["layers.1", "layers.4"]
    assert select_hookpoints(model, hookpoints=["layers.[3-5]"]) == ["layers.3", "layers.4", "layers.5"]
    with pytest.raises(ConfigError, match="out of range: this model has 6 layers"):
        select_hookpoints(model, layers=[6])
    with pytest.raises(ConfigError, match="matches nothing"):
        select_hookpoints(model, hookpoints=["blocks.*"])


@pytest.mark.parametrize("kind", ["llama", "neox", "gpt2"])
def test_forward_stops_after_deepest_hooked_block_and_captures_block_outputs(kind):
    model = tiny_model(kind, n_layers=4)
    _, blocks = find_blocks(model)
    calls = []
    handle = blocks[3].register_forward_hook(lambda *a: calls.append(1))
    ids = token_data(2, 8)
    with capture_residuals(model, ["layers.0", "layers.1"]) as acts:
        run_until_captured(model, ids)
    handle.remove()
    assert calls == [] and set(acts) == {"layers.0", "layers.1"}
    full = model(ids, output_hidden_states=True).hidden_states  # [embeddings, block 0, block 1, ...]
    torch.testing.assert_close(acts["layers.1"], full[2])


def test_dataset_too_small_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="dataset too small for one optimizer step: it has 3 sequences"):
        make_trainer(tmp_path, data=token_data(n_seq=3))


def test_dead_latents_counted_in_tokens_and_auxk_turns_on(tmp_path):
    # With a threshold below one step's tokens, latents that never fire are dead after step 1 -> AuxK > 0.
    t = make_trainer(tmp_path, dead_feature_threshold=10, data=token_data(n_seq=16))
    t.fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(line["auxk/layers.0"] > 0 for line in lines)
    counters = t.tokens_since_fired["layers.0"]
    assert counters.max() <= t.tokens_seen and (counters == 0).any()


def test_dead_threshold_is_capped_at_a_tenth_of_the_run_so_short_runs_revive_latents(tmp_path):
    # 32 sequences x 16 tokens = 512 planned tokens: the 10M default becomes 51.
    t = make_trainer(tmp_path, data=token_data(n_seq=32))
    assert t.cfg.dead_feature_threshold == 10_000_000
    assert t.dead_threshold == 51  # the plan counts whole sequences (BOS included)
    t.fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(line["auxk/layers.0"] > 0 for line in lines), "AuxK never acted in a short run"
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["dead_threshold"] == 51
    assert run["compute_dtype"] == "float32"  # autocast "auto" is exact on a CPU
    # A threshold below the cap is kept as asked.
    assert make_trainer(tmp_path, run_name="low", dead_feature_threshold=7).dead_threshold == 7


def test_training_sequences_are_visited_once_each_in_a_seeded_order(tmp_path, monkeypatch):
    data = token_data(n_seq=40)
    seen = []
    # 8 steps of 4 sequences: 32 of the 40
    trainer = make_trainer(tmp_path, data=data, max_tokens=32 * 16, shuffle_sequences=True)
    original = trainer.activations.batch

    def record(index):
        batch = original(index)
        seen.append(index)
        return batch

    monkeypatch.setattr(trainer.activations, "batch", record)
    order = trainer.activations.order
    assert sorted(order.tolist()) == list(range(32))  # the held-out tail (32..39) is never visited
    assert order.tolist() != list(range(32))
    trainer.fit()
    assert seen == list(range(8))
    again = make_trainer(tmp_path, data=data, max_tokens=32 * 16, run_name="again", shuffle_sequences=True)
    assert torch.equal(again.activations.order, order)  # the same seed draws the same order
    assert make_trainer(tmp_path, data=data, run_name="plain").activations.order is None  # off by default
