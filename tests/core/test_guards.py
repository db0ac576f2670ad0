"""A run that cannot silently go wrong: non-finite activations, losses and weights never reach the saved
SAEs."""

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sae_core import SaeConfig, SaeTrainer, TrainConfig
from sae_core.distributed import DistContext
from sae_core.errors import SaeCoreError, TrainingDivergedError
from sae_core.guards import MAX_CONSECUTIVE_SKIPS
from sae_core.models import find_blocks
from sae_core.sae import Sae
from tests.support.processes import free_port
from tests.support.tiny import tiny_model
from tests.support.training import Tok, make_trainer, params, token_data


def records(trainer) -> list[dict]:
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def poison_block(model, index: int, rows: list[tuple[int, int, float]]):
    """Every forward, block `index` outputs `value` at (sequence, position) for each of `rows`."""

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        for seq, pos, value in rows:
            hidden[seq, pos] = value

    return find_blocks(model)[1][index].register_forward_hook(hook)


def poison_loss(monkeypatch, when):
    """The SAE loss is NaN whenever `when()` is true (gradients follow)."""
    forward = Sae.forward

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out._replace(fvu=out.fvu * math.nan) if when() else out

    monkeypatch.setattr(Sae, "forward", patched)


def assert_finite_on_disk(run_dir):
    for hookpoint in ("layers.0", "layers.1", "layers.2"):
        for name, tensor in load_file(run_dir / hookpoint / "sae.safetensors").items():
            assert tensor.isfinite().all(), f"{hookpoint}/{name}"


def test_nonfinite_activation_rows_are_dropped_and_counted(tmp_path):
    model = tiny_model()
    # Block 2 is the deepest hooked one, so only layers.2 sees the bad rows (earlier layers stay clean).
    poison_block(model, 2, [(1, 5, math.nan), (2, 7, math.inf)])
    trainer = make_trainer(tmp_path, model, log_every=1)
    trainer.fit()
    assert_finite_on_disk(trainer.run_dir)
    last = records(trainer)[-1]
    assert last["nonfinite_tokens"] == 2 * trainer.total_steps and last["skipped_steps"] == 0
    assert all(math.isfinite(last[f"fvu/{h}"]) for h in trainer.hookpoints)


def test_a_nonfinite_loss_skips_exactly_that_step_and_leaves_everything_untouched(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, log_every=1, optimizer="adam")  # Adam's step counters are checked
    bad_steps = {2, 5}
    poison_loss(monkeypatch, lambda: trainer.step in bad_steps)
    for step in range(trainer.total_steps):
        before = params(trainer)
        counters = {h: c.clone() for h, c in trainer.tokens_since_fired.items()}
        adam_steps = {
            h: [s["step"].item() for s in o.parts["adam"].state.values()]
            for h, o in trainer.optimizers.items()
        }
        trainer.fit(max_steps=step + 1)
        after = params(trainer)
        changed = any(not torch.equal(before[name], after[name]) for name in before)
        assert changed == (step not in bad_steps), step
        if step in bad_steps:
            assert all(torch.equal(counters[h], c) for h, c in trainer.tokens_since_fired.items())
            assert adam_steps == {
                h: [s["step"].item() for s in o.parts["adam"].state.values()]
                for h, o in trainer.optimizers.items()
            }
            assert all(p.grad is None for sae in trainer.saes.values() for p in sae.parameters())
    assert [r["skipped_steps"] for r in records(trainer)] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert_finite_on_disk(trainer.run_dir)


def test_consecutive_nonfinite_steps_stop_with_one_line_and_keep_the_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, data=token_data(n_seq=4 * 20), save_every=2)
    poison_loss(monkeypatch, lambda: trainer.step >= 3)
    trainer.fit(max_steps=3)  # the last good step, saved
    good = load_file(trainer.run_dir / "layers.1" / "sae.safetensors")
    with pytest.raises(TrainingDivergedError) as caught:
        trainer.fit()
    message = str(caught.value)
    assert isinstance(caught.value, SaeCoreError) and "\n" not in message
    assert f"{MAX_CONSECUTIVE_SKIPS} steps in a row" in message and "--lr" in message
    assert trainer.step == 3 + MAX_CONSECUTIVE_SKIPS - 1  # stopped during the tenth skipped step
    saved = load_file(trainer.run_dir / "layers.1" / "sae.safetensors")
    assert all(torch.equal(good[name], saved[name]) for name in good)


def test_nonfinite_weights_are_never_written(tmp_path):
    trainer = make_trainer(tmp_path, save_every=100)
    trainer.fit(max_steps=1)
    files = {p: p.read_bytes() for p in trainer.run_dir.rglob("*") if p.is_file()}
    with torch.no_grad():
        next(trainer.saes["layers.1"].parameters())[0] = math.inf
    trainer.step += 1
    with pytest.raises(
        TrainingDivergedError, match=r"refusing to save step 2: SAE weights are NaN/Inf \(layers.1\)"
    ):
        trainer.save()
    assert {p: p.read_bytes() for p in trainer.run_dir.rglob("*") if p.is_file()} == files


# ---------------------------------------------------------------- two gloo ranks, only rank 1 sees the NaN
def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = tiny_model()
    cfg = TrainConfig(
        SaeConfig(expansion_factor=4, k=4), batch_size=4, lr_warmup_steps=2, save_dir=out, log_every=1
    )
    ctx = DistContext(rank=rank, world_size=2)
    trainer = SaeTrainer(cfg, token_data(), model, tokenizer=Tok(), dist_ctx=ctx, progress=False)
    if rank == 1:
        poison_block(model, 2, [(0, 3, math.nan)])
        forward = Sae.forward

        def patched(self, *args, **kwargs):
            result = forward(self, *args, **kwargs)
            return result._replace(fvu=result.fvu * math.nan) if trainer.step == 1 else result

        Sae.forward = patched
    snapshots, metrics = [], []
    for step in range(trainer.total_steps):
        metrics.append(trainer.fit(max_steps=step + 1))
        snapshots.append(params(trainer))
    torch.save({"snapshots": snapshots, "metrics": metrics}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_data_parallel_ranks_skip_together_when_one_rank_sees_a_nan(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for step in range(4):
        for name, p in ranks[0]["snapshots"][step].items():
            assert torch.equal(p, ranks[1]["snapshots"][step][name]), (step, name)
        assert ranks[0]["metrics"][step] == pytest.approx(ranks[1]["metrics"][step], nan_ok=True)
    snapshots = ranks[0]["snapshots"]
    assert all(torch.equal(snapshots[0][n], snapshots[1][n]) for n in snapshots[0])  # step 1 skipped
    assert not any(torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[0] if "W_dec" in n)
    last = ranks[0]["metrics"][-1]
    assert last["skipped_steps"] == 1 and last["nonfinite_tokens"] == 4  # rank 1's row, once a step
    assert_finite_on_disk(tmp_path / "run")


def test_the_lm_runs_in_eval_mode_and_gets_its_own_mode_back(tmp_path):
    model = tiny_model("gpt2")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    model.lm_head.training = False  # a mixed state comes back as it was, module by module
    trainer = make_trainer(tmp_path, model)
    first, second = trainer.activations.batch(0).inputs, trainer.activations.batch(0).inputs
    for hookpoint in trainer.hookpoints:
        assert torch.equal(first[hookpoint], second[hookpoint]), hookpoint
    assert all(m.training for name, m in model.named_modules() if name != "lm_head")
    assert not model.lm_head.training


def test_an_empty_batch_adds_nothing_to_its_step(tmp_path):
    data = token_data(n_seq=8)
    data[4:] = 0  # the second batch is all BOS: every token excluded
    accumulated = make_trainer(tmp_path, data=data, run_name="acc", grad_acc_steps=2)
    alone = make_trainer(tmp_path, data=data[:4], run_name="alone")
    accumulated.fit()
    alone.fit()
    assert accumulated.watch.skipped_steps == 0
    reference = params(alone)
    for name, p in params(accumulated).items():
        torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-6, msg=name)


def test_steps_with_no_tokens_are_skipped_and_never_count_as_divergence(tmp_path):
    n_steps = MAX_CONSECUTIVE_SKIPS + 2
    data = token_data(n_seq=4 * n_steps)
    data[4:] = 0  # every step after the first has only excluded tokens
    # Empty batches in place; Adam, whose weights at the end are the ones it trained (schedule-free Adam's
    # end on their average, which differs from the first step's weights by rounding).
    trainer = make_trainer(tmp_path, data=data, log_every=1, shuffle_sequences=False, optimizer="adam")
    trainer.fit(max_steps=1)
    after_first = params(trainer)
    counters = {h: c.clone() for h, c in trainer.tokens_since_fired.items()}
    trainer.fit()
    assert trainer.step == n_steps and trainer.watch.skipped_steps == n_steps - 1
    assert all(torch.equal(p, after_first[name]) for name, p in params(trainer).items())
    assert all(torch.equal(counters[h], c) for h, c in trainer.tokens_since_fired.items())
    assert records(trainer)[-1]["skipped_steps"] == n_steps - 1


def _owner_rank(rank: int, port: int, out: str) -> None:
    """--distribute_layers: rank 1 owns layers.2, whose loss is always NaN; rank 0 owns layers.0 and 1."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = TrainConfig(
        SaeConfig(expansion_factor=4, k=4),
        batch_size=4,
        lr_warmup_steps=2,
        save_dir=out,
        distribute_layers=True,
        save_every=1000,
    )
    ctx = DistContext(rank=rank, world_size=2)
    data = token_data(n_seq=8 * (MAX_CONSECUTIVE_SKIPS + 2))
    trainer = SaeTrainer(cfg, data, tiny_model(), tokenizer=Tok(), dist_ctx=ctx, progress=False)
    if rank == 1:
        poison_loss_everywhere()
    before = params(trainer)
    try:
        trainer.fit()
        error = None
    except TrainingDivergedError as e:
        error = str(e)
    changed = {name: not torch.equal(p, before[name]) for name, p in params(trainer).items()}
    torch.save({"error": error, "step": trainer.step, "changed": changed}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def poison_loss_everywhere() -> None:
    forward = Sae.forward

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        return out._replace(fvu=out.fvu * math.nan)

    Sae.forward = patched


def test_distributed_layers_owner_skips_alone_and_every_rank_stops_together(tmp_path):
    mp.spawn(_owner_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for result in ranks:
        assert result["error"] and "layers.2" in result["error"] and "layers.0" not in result["error"]
        assert result["step"] == MAX_CONSECUTIVE_SKIPS - 1
    assert all(ranks[0]["changed"].values())
    # layers.2 never took a step (its b_dec was only set to the data mean, before the first step).
    assert not any(changed for name, changed in ranks[1]["changed"].items() if name != "layers.2/b_dec")
