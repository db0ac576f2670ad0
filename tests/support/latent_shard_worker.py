"""A torchrun rank for tests/core/test_latent_shards.py: sharded SAEs against one unsharded SAE.

Every rank builds the unsharded reference itself (the same seed, the whole global batch, no collective) and
its shard of the same SAE, runs both, and compares forward outputs, gradients (its rows; b_dec whole) and
parameters after optimizer steps. A mismatch raises (the rank exits non-zero with the difference); rank 0
writes what was compared to the JSON file given as the last argument.

    torchrun --nproc_per_node 2 latent_shard_worker.py steps ties wide_k OUT.json   # 1 replica x 2 shards
    torchrun --nproc_per_node 4 latent_shard_worker.py replicas OUT.json             # 2 replicas x 2 shards

The `trainers` scenario (2 ranks) runs SaeTrainers with 2 shards in the folder of OUT.json, whose `cache`
the test wrote, for the test to compare with unsharded runs (`trainer_config` is shared with it); `twin`
(4 ranks) trains the run the CLI test launches (TWIN) without the CLI, for its resumed run to equal.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sae_core import SaeConfig, SaeTrainer, TrainConfig
from sae_core.cache import ActivationCache
from sae_core.distributed import init_distributed
from sae_core.errors import ConfigError
from sae_core.latent_shards import ShardedSae, make_layout
from sae_core.optim import SaeOptimizer
from sae_core.sae import Sae
from sae_core.sweep import SweepTrainer
from tests.support.tiny import tiny_model
from tests.support.training import Tok, token_data

D_IN, SHARDS = 8, 2
ALPHA = 1 / 32
checks: dict[str, int] = {}


def close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")
    checks[name.split("[")[0]] = checks.get(name.split("[")[0], 0) + 1


def by_index(acts: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen latents in index order (both paths use unsorted top-k)."""
    order = indices.argsort(dim=1)
    return acts.detach().gather(1, order), indices.gather(1, order)


def rows(sharded: ShardedSae) -> slice:
    return slice(sharded.first_latent, sharded.first_latent + sharded.encoder.out_features)


def compare_forward_backward(tag, whole, sharded, x, dead, residual_variance=0.5):
    """One forward and backward of both; the sharded gradients must be the rows of the whole ones."""
    ref = whole(x, dead, total_variance=1.0, residual_variance=residual_variance)
    out = sharded(x, dead, total_variance=1.0, residual_variance=residual_variance)
    (ref.fvu + ALPHA * ref.auxk_loss).backward()
    (out.fvu + ALPHA * out.auxk_loss).backward()
    close(f"forward_output[{tag}]", out.sae_out, ref.sae_out)
    close(f"fvu[{tag}]", out.fvu, ref.fvu)
    close(f"auxk[{tag}]", out.auxk_loss, ref.auxk_loss)
    ref_acts, ref_idx = by_index(ref.latent_acts, ref.latent_indices)
    acts, idx = by_index(out.latent_acts, out.latent_indices)
    # Latents chosen with value 0 (fewer positive pre-activations than k) may differ and change nothing.
    positive = ref_acts > 0
    assert torch.equal((acts > 0).sum(1), positive.sum(1)), f"{tag}: number of active latents differs"
    assert torch.equal(idx[acts > 0], ref_idx[positive]), f"{tag}: chosen latents differ"
    close(f"latent_acts[{tag}]", acts[acts > 0], ref_acts[positive])
    r = rows(sharded)
    close(f"grad[{tag}]", sharded.encoder.weight.grad, whole.encoder.weight.grad[r])
    close(f"grad[{tag}]", sharded.encoder.bias.grad, whole.encoder.bias.grad[r])
    close(f"grad[{tag}]", sharded.W_dec.grad, whole.W_dec.grad[r])
    close(f"grad[{tag}]", sharded.b_dec.grad, whole.b_dec.grad)
    return ref, out


def optimizer_step(sae, optimizer):
    sae.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    optimizer.zero_grad()
    sae.set_decoder_norm_to_unit_norm()


def compare_params(tag, whole, sharded):
    r = rows(sharded)
    close(f"params[{tag}]", sharded.encoder.weight, whole.encoder.weight[r])
    close(f"params[{tag}]", sharded.encoder.bias, whole.encoder.bias[r])
    close(f"params[{tag}]", sharded.W_dec, whole.W_dec[r])
    close(f"params[{tag}]", sharded.b_dec, whole.b_dec)


def scenario_steps(layout, replica_batches=False):
    """Several Adam steps with AuxK: dead latents on both shards, then on one shard only, then fewer dead
    latents than k_aux (its scale < 1), then none. With `replica_batches` each replica takes its half of the
    global batch and gradients are summed over replicas, as the trainer does."""
    cfg = SaeConfig(num_latents=32, k=4)
    torch.manual_seed(0)
    whole = Sae(D_IN, cfg)
    sharded = ShardedSae.from_whole(whole, layout)
    opt_whole, opt_sharded = SaeOptimizer("adam", whole, 1e-2), SaeOptimizer("adam", sharded, 1e-2)
    g = torch.Generator().manual_seed(1)
    dead_sets = [list(range(0, 32, 3)), list(range(16, 32)), [1, 20], []]
    for step, dead_latents in enumerate(dead_sets * 2):
        x = torch.randn(24, D_IN, generator=g) * 2 + 0.5
        dead = torch.zeros(32, dtype=torch.bool)
        dead[dead_latents] = True
        dead_mask = dead if dead.any() else None
        ref = whole(x, dead_mask, total_variance=1.0, residual_variance=0.5)
        (ref.fvu + ALPHA * ref.auxk_loss).backward()
        if replica_batches:
            share = x.shape[0] // layout.replicas
            mine = x[layout.replica_rank * share : (layout.replica_rank + 1) * share]
        else:
            mine = x
        out = sharded(mine, dead_mask, total_variance=1.0, residual_variance=0.5)
        (out.fvu + ALPHA * out.auxk_loss).backward()
        if replica_batches:
            for p in sharded.parameters():
                dist.all_reduce(p.grad, group=layout.replica_group)
        else:
            close(f"forward_output[steps{step}]", out.sae_out, ref.sae_out)
            close(f"auxk[steps{step}]", out.auxk_loss, ref.auxk_loss)
            if dead_latents:
                assert ref.auxk_loss > 0, "the scenario must exercise AuxK"
        r = rows(sharded)
        close(f"grad[steps{step}]", sharded.encoder.weight.grad, whole.encoder.weight.grad[r])
        close(f"grad[steps{step}]", sharded.W_dec.grad, whole.W_dec.grad[r])
        close(f"grad[steps{step}]", sharded.b_dec.grad, whole.b_dec.grad)
        optimizer_step(whole, opt_whole)
        optimizer_step(sharded, opt_sharded)
        compare_params(f"steps{step}", whole, sharded)
    # Dead latents only on the other shards: they still received AuxK gradient on their encoder rows.
    return whole, sharded


def scenario_ties(layout):
    """Each latent of shard 0 has a twin on shard 1 (same encoder row and bias, its own decoder row): every
    pre-activation is tied with one on the other shard. Inputs and weights are small dyadic numbers, so
    both paths compute the tied values exactly; k is even and rows whose k-th and (k+1)-th largest positive
    values are different pairs' equal values are dropped, so the top-k is defined by values alone."""
    cfg = SaeConfig(num_latents=16, k=4, normalize_decoder=False)
    torch.manual_seed(2)
    whole = Sae(D_IN, cfg)
    with torch.no_grad():
        w = torch.randint(-16, 17, (8, D_IN)).float() / 16
        whole.encoder.weight.copy_(torch.cat([w, w]))
        whole.encoder.bias.copy_(torch.cat([torch.full((8,), -0.5)] * 2))
        whole.W_dec.copy_(torch.randint(-16, 17, (16, D_IN)).float() / 16)
        whole.b_dec.zero_()
    x = torch.randint(-4, 5, (64, D_IN)).float()
    pre = torch.sort(x @ w.T - 0.5, dim=1, descending=True).values  # one value per pair
    half = cfg.k // 2
    x = x[(pre[:, half - 1] > pre[:, half]) | (pre[:, half - 1] <= 0)]
    assert x.shape[0] >= 16, "too few rows without a tie at the boundary"
    sharded = ShardedSae.from_whole(whole, layout)
    ref, _ = compare_forward_backward("ties", whole, sharded, x, None)
    twins = (ref.latent_indices % 8).sort(dim=1).values
    # The scenario has ties: chosen latents come in twin pairs across the shards.
    positive_rows = (ref.latent_acts > 0).all(1)
    assert positive_rows.sum() > 0
    assert torch.equal(twins[positive_rows, 0::2], twins[positive_rows, 1::2]), "twins not both chosen"


def scenario_wide_k(layout):
    """k larger than one shard's share (k = 12 > 8 latents per shard) and than the positive pre-activations
    of a shard (shard 1's latents all negative; shard 0 has fewer than k positive), with AuxK among dead
    latents of both shards."""
    cfg = SaeConfig(num_latents=16, k=12)
    torch.manual_seed(3)
    whole = Sae(D_IN, cfg)
    with torch.no_grad():
        whole.encoder.bias[8:] = -50.0
        whole.encoder.bias[:8] = torch.linspace(-1, 1, 8)
    sharded = ShardedSae.from_whole(whole, layout)
    x = torch.randn(20, D_IN)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 5, 9, 14]] = True
    ref, _ = compare_forward_backward("wide_k", whole, sharded, x, dead)
    assert ((ref.latent_acts > 0).sum(1) < cfg.k).all(), "fewer positive latents than k on every token"


# ---------------------------------------------------------------------------------------- trainers
STOP_AT = 3  # the step interrupted runs stop at (a checkpoint: save_every 3)
SWEEP = ["expansion_factor=2,4"]


def trainer_config(save_dir: Path, run_name: str, shards: int = 1, **kw) -> TrainConfig:
    """The runs of the `trainers` scenario: 8 steps of 4 sequences (2 hookpoints, 128 latents, AuxK with the
    latents dead after 51 tokens), a checkpoint every 3 steps."""
    return TrainConfig(
        SaeConfig(expansion_factor=4, k=4),
        batch_size=4,
        lr_warmup_steps=2,
        lr=1e-3,  # as tests.support.training.COMMON: rank counts add sums in other orders
        layers=[0, 2],
        max_tokens=8 * 4 * 16,
        save_every=3,
        save_dir=str(save_dir),
        run_name=run_name,
        shard_latents=shards,
        **kw,
    )


def live_trainer(cfg: TrainConfig, resume: bool = False) -> SaeTrainer:
    return SaeTrainer(cfg, token_data(), tiny_model(), tokenizer=Tok(), resume=resume, progress=False)


def scenario_trainers(work: Path):
    """With 2 shards: from the cache, a whole run and one stopped at STOP_AT and resumed; resharding 1 -> 2
    (the unsharded run the test stopped in `sharded/up`); a live run with Adam stopped for the test to resume
    with 1 shard (2 -> 1); a sweep from the cache."""
    cache = ActivationCache(work / "cache")
    runs = work / "sharded"

    def cached(run_name: str, resume: bool = False, **kw) -> SaeTrainer:
        return SaeTrainer(trainer_config(runs, run_name, 2, **kw), cache, None, resume=resume, progress=False)

    cached("full").fit()
    cached("part").fit(max_steps=STOP_AT)
    cached("part", resume=True).fit()
    cached("up", resume=True).fit()
    live_trainer(trainer_config(runs, "stopped", 2, optimizer="adam")).fit(max_steps=STOP_AT)
    sweep = SweepTrainer(trainer_config(runs, "sweep", 2), cache, None, sweep=SWEEP, progress=False)
    assert all(t.shards is sweep.trainers[0].shards for t in sweep.trainers), "the variants share one mesh"
    sweep.fit()
    try:  # a variant whose latents the shards do not divide: refused, naming it
        SweepTrainer(trainer_config(runs, "odd", 2), cache, None, sweep=["num_latents=64,63"], progress=False)
    except ConfigError as e:
        assert str(e).startswith(
            "sweep variant num_latents63: --shard_latents 2 does not divide the SAE's 63"
        ), e
        checks["refused_variant"] = 1


# The CLI test's run: 2 replicas x 2 shards from the cache, 32 steps of 2 x 2 sequences.
TWIN = {
    "expansion_factor": 4,
    "k": 4,
    "batch_size": 2,
    "lr_warmup_steps": 2,
    "lr": 1e-3,
    "save_every": 3,
    "log_every": 1,
    "shard_latents": 2,
}


def twin_flags() -> list[str]:
    return [flag for name, value in TWIN.items() for flag in (f"--{name}", str(value))]


def twin_config(save_dir: Path, **overrides) -> TrainConfig:
    settings = {**TWIN, **overrides}
    sae = SaeConfig(expansion_factor=settings.pop("expansion_factor"), k=settings.pop("k"))
    return TrainConfig(sae, save_dir=str(save_dir), run_name="r", **settings)


def scenario_twin(work: Path):
    SaeTrainer(twin_config(work / "twin"), ActivationCache(work / "cache"), None, progress=False).fit()


def main():
    *scenarios, out_path = sys.argv[1:]
    ctx = init_distributed("cpu", "gloo")
    layout = make_layout(ctx, SHARDS)
    for name in scenarios:
        if name == "steps":
            scenario_steps(layout)
        elif name == "ties":
            scenario_ties(layout)
        elif name == "wide_k":
            scenario_wide_k(layout)
        elif name == "replicas":
            scenario_steps(layout, replica_batches=True)
        elif name == "trainers":
            scenario_trainers(Path(out_path).parent)
        elif name == "twin":
            scenario_twin(Path(out_path).parent)
        else:
            raise SystemExit(f"unknown scenario {name}")
    all_checks = [None] * ctx.world_size
    dist.all_gather_object(all_checks, checks)
    if ctx.is_main:
        with open(out_path, "w") as f:
            json.dump({"world_size": ctx.world_size, "replicas": layout.replicas, "checks": all_checks}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
