"""Tensor-parallel SAEs: one SAE's M latents split over the S ranks of a latent-shard group.

Ranks form a 2-D mesh, replicas x shards (a torch DeviceMesh; shard groups are consecutive ranks, so on
GPUs they share a node). Rank s of a shard group holds latents [s M/S, (s+1) M/S): those rows of the encoder
weight, encoder bias and decoder; b_dec is replicated. Every rank of a shard group sees the same tokens;
replicas see different ones (data parallel). One forward:

    pre_s     = W_enc[s] (x - b_dec) + b_enc[s]                    # [N, M/S], the dense product, local
    local     = TopK(pre_s, min(k, M/S))                          # (value, global index) candidates
    chosen    = TopK(all_gather(local), k)                        # the global top-k, same on every rank
    x_hat     = sum over shards of decode(chosen latents of s) + b_dec    # one all-reduce of [N, d]

The global top-k is in the union of local top-k's (a latent among the k largest of all is among the k largest
of its shard). AuxK works alike among dead latents: local top-k_aux candidates, the global top k_aux among all
dead latents, decoded where they live and summed. What crosses the wire per forward is independent of M:
candidates (S N (k + k_aux) values and indices) and partial reconstructions (N d, twice with AuxK).

Gradients. Every rank computes the same loss from the same summed reconstruction, so the backward of that
sum is the identity (each partial gets the loss's gradient once, not S times), and the sharded parameters'
gradients are exactly their rows of the unsharded gradient: no reduction inside the shard group. b_dec's
gradient has a part through the decoder (the same on every rank) and a part through each shard's encoder:
the centring x - b_dec sums the latter over the group in its backward (d numbers), so b_dec's gradient is
complete and equal on every rank. Across replicas every gradient is summed as in plain data parallelism.

Ties: candidates are merged by value, then by lower global index. Among latents whose value is 0 after the
ReLU (k more than the positive pre-activations) the choice changes nothing: they add nothing and get no
gradient. Exact ties between positive pre-activations at the k-th place are resolved by torch.topk within a
shard, as in the unsharded SAE, and torch.topk does not specify which of equal values it keeps.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checkpoint as ckpt
from .checkpoint import STATE_DIR
from .config import SaeConfig
from .distributed import DistContext
from .errors import CheckpointError, ConfigError
from .kernels import sparse_decode, topk_encode
from .sae import ForwardOutput, Sae


@dataclass(frozen=True)
class ShardLayout:
    """Where this rank sits in the replicas x shards mesh, and the two process groups it talks in."""

    shards: int = 1
    shard_rank: int = 0
    replicas: int = 1
    replica_rank: int = 0
    shard_group: Any = None  # process group of this rank's shard group (None: a single shard)
    replica_group: Any = None  # process group of the ranks holding the same shard in other replicas
    mesh: Any = None  # the DeviceMesh, kept alive with its groups

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    def data_ctx(self, ctx: DistContext) -> DistContext:
        """The context data parallelism runs in: one rank per replica, collectives in the replica group.
        All ranks of a shard group read the same batches."""
        return DistContext(
            rank=self.replica_rank,
            world_size=self.replicas,
            local_rank=ctx.local_rank,
            device=ctx.device,
            group=self.replica_group,
            global_rank=ctx.rank,
        )


# The layouts made in this process, by (world size, shards, device type), with the default process group they
# were made in: every trainer of a sweep shares one mesh (and its process groups) instead of building its own.
_LAYOUTS: dict[tuple[int, int, str], tuple[Any, "ShardLayout"]] = {}


def make_layout(ctx: DistContext, shards: int) -> ShardLayout:
    """Split the ranks of `ctx` into world_size / shards replicas of `shards` consecutive ranks (the same
    layout again, while the process group lives, for every later call with the same numbers)."""
    if shards < 1:
        raise ConfigError(f"--shard_latents must be at least 1, got {shards}")
    if ctx.world_size % shards:
        raise ConfigError(
            f"--shard_latents {shards} does not divide the {ctx.world_size} ranks of this run; launch a "
            f"multiple of {shards} ranks (torchrun --nproc_per_node) or choose a divisor of {ctx.world_size}"
        )
    if shards == 1 and not ctx.enabled:
        return ShardLayout()
    from torch.distributed.device_mesh import init_device_mesh

    key = (ctx.world_size, shards, ctx.device.type)
    made = _LAYOUTS.get(key)
    if made is not None and made[0] is dist.group.WORLD:
        return made[1]
    replicas = ctx.world_size // shards
    mesh = init_device_mesh(ctx.device.type, (replicas, shards), mesh_dim_names=("replica", "shard"))
    layout = ShardLayout(
        shards=shards,
        shard_rank=mesh.get_local_rank("shard"),
        replicas=replicas,
        replica_rank=mesh.get_local_rank("replica"),
        shard_group=mesh.get_group("shard"),
        replica_group=mesh.get_group("replica"),
        mesh=mesh,
    )
    _LAYOUTS[key] = (dist.group.WORLD, layout)
    return layout


def check_divisible(num_latents: int, shards: int) -> None:
    if num_latents % shards:
        raise ConfigError(
            f"--shard_latents {shards} does not divide the SAE's {num_latents} latents; choose a shard count "
            f"that divides {num_latents} (or a width, --expansion_factor or --num_latents, that it divides)"
        )


# ---------------------------------------------------------------------- autograd-aware collectives
class _SumOverShards(torch.autograd.Function):
    """Forward: the sum of every shard's partial reconstruction. Backward: the identity, because every rank
    computes the same loss from this sum and each partial contributes to it once."""

    @staticmethod
    def forward(ctx, partial: Tensor, group: Any) -> Tensor:
        total = partial.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CentreForShards(torch.autograd.Function):
    """x - b_dec, whose b_dec gradient is summed over the shard group: each shard's encoder contributes its
    own latents' part. (x's gradient, which the trainer never asks for, is this shard's part only.)"""

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x - b_dec

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_b = None
        if ctx.needs_input_grad[1]:
            grad_b = -grad.sum(0)
            dist.all_reduce(grad_b, group=ctx.group)
        return grad if ctx.needs_input_grad[0] else None, grad_b, None


def _all_gather_cat(t: Tensor, layout: ShardLayout) -> Tensor:
    """Every shard's [N, c] tensor, concatenated along dim 1 in shard order."""
    parts = [torch.empty_like(t) for _ in range(layout.shards)]
    dist.all_gather(parts, t.contiguous(), group=layout.shard_group)
    return torch.cat(parts, dim=1)


@torch.no_grad()
def select_global_topk(
    values: Tensor, global_indices: Tensor, k: int, layout: ShardLayout
) -> tuple[Tensor, Tensor, Tensor]:
    """The k largest of every shard's candidates (values [N, c], global indices [N, c]; the same c on every
    shard, pad with -inf). Returns (values [N, k], global indices [N, k], mask [N, c] of this shard's
    candidates that were chosen). Order: value, then lower global index."""
    n, c = values.shape
    all_values = _all_gather_cat(values, layout)
    all_indices = _all_gather_cat(global_indices, layout)
    # Stable sorts: first by index, then by value (descending), so equal values keep index order.
    by_index = torch.argsort(all_indices, dim=1, stable=True)
    by_value = torch.sort(all_values.gather(1, by_index), dim=1, descending=True, stable=True).indices
    chosen = by_index.gather(1, by_value[:, :k])  # positions in the gathered [N, S c] candidates
    mask = torch.zeros(n * c, dtype=torch.bool, device=values.device)
    mine = (chosen // c) == layout.shard_rank
    rows = torch.arange(n, device=values.device).unsqueeze(1).expand_as(chosen)
    mask[(rows * c + chosen % c)[mine]] = True
    return all_values.gather(1, chosen), all_indices.gather(1, chosen), mask.view(n, c)


def _pad(t: Tensor, width: int, value: float) -> Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), value)], dim=1)


# ---------------------------------------------------------------------- the sharded SAE
# Rows of the whole SAE's initial encoder drawn at a time while a shard is cut from it (16M floats).
INIT_BLOCK_ELEMENTS = 1 << 24


class ShardedSae(Sae):
    """This rank's shard of an SAE: parameters named as in `Sae` (encoder.weight [M/S, d], encoder.bias,
    W_dec [M/S, d], b_dec [d]), the same forward outputs (global latent indices), and `save_to_disk`, a
    collective of the shard group that writes the whole SAE from shard 0.

    `create` gives exactly the shard of the SAE that `Sae(d_in, cfg)` would build from the same seed, without
    building it: the whole SAE may not fit in one process. `from_whole` cuts a shard from an existing SAE.
    """

    def __init__(
        self,
        d_in: int,
        cfg: SaeConfig,
        layout: ShardLayout,
        encoder_weight: Tensor,
        encoder_bias: Tensor,
        decoder: Tensor,
        b_dec: Tensor,
        *,
        hookpoint: str | None = None,
    ):
        nn.Module.__init__(self)  # Sae.__init__ would allocate the whole SAE
        self.cfg, self.d_in, self.hookpoint, self.k_override = cfg, d_in, hookpoint, None
        self.d_out, self.W_skip = d_in, None  # an autoencoder (the config refuses sharded transcoders)
        self.layout = layout
        self.total_latents = cfg.latents_for(d_in)
        check_divisible(self.total_latents, layout.shards)
        per_shard = self.total_latents // layout.shards
        if encoder_weight.shape != (per_shard, d_in):
            raise ValueError(f"a shard's encoder is [{per_shard}, {d_in}], got {list(encoder_weight.shape)}")
        self.first_latent = layout.shard_rank * per_shard
        self.encoder = nn.Linear(d_in, per_shard, device="meta")
        self.encoder.weight = nn.Parameter(encoder_weight)
        self.encoder.bias = nn.Parameter(encoder_bias)
        self.W_dec = nn.Parameter(decoder)
        self.b_dec = nn.Parameter(b_dec)

    @classmethod
    def from_whole(cls, whole: Sae, layout: ShardLayout, device: str | torch.device = "cpu") -> "ShardedSae":
        """This rank's rows of `whole` (copied to `device`)."""
        check_divisible(whole.num_latents, layout.shards)
        per_shard = whole.num_latents // layout.shards
        rows = slice(layout.shard_rank * per_shard, (layout.shard_rank + 1) * per_shard)
        return cls(
            whole.d_in,
            whole.cfg,
            layout,
            whole.encoder.weight.data[rows].clone().to(device),
            whole.encoder.bias.data[rows].clone().to(device),
            whole.W_dec.data[rows].clone().to(device),
            whole.b_dec.data.clone().to(device),
            hookpoint=whole.hookpoint,
        )

    @classmethod
    def create(
        cls,
        d_in: int,
        cfg: SaeConfig,
        layout: ShardLayout,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        hookpoint: str | None = None,
    ) -> "ShardedSae":
        """The shard `from_whole(Sae(d_in, cfg, device, dtype))` would give, and the global generator left
        where `Sae(...)` leaves it. Sae's encoder is nn.Linear's: weight and then bias drawn uniform in
        +-1/sqrt(d_in) on the CPU in float32 (the bias is then zeroed). The weight is drawn a block of rows at
        a time (the same numbers as drawn whole: tested) and only this shard's rows are kept."""
        m = cfg.latents_for(d_in)
        check_divisible(m, layout.shards)
        per_shard = m // layout.shards
        first, stop = layout.shard_rank * per_shard, (layout.shard_rank + 1) * per_shard
        bound = 1 / math.sqrt(d_in)
        block_rows = max(1, INIT_BLOCK_ELEMENTS // d_in)
        kept = []
        for start in range(0, m, block_rows):
            block = torch.empty(min(block_rows, m - start), d_in).uniform_(-bound, bound)
            lo, hi = max(start, first), min(start + block.shape[0], stop)
            if lo < hi:
                kept.append(block[lo - start : hi - start].clone())
        torch.empty(m).uniform_(-bound, bound)  # nn.Linear's bias draw: the generator ends where Sae's does
        weight = torch.cat(kept).to(device=device, dtype=dtype)
        decoder = weight.clone()
        if cfg.normalize_decoder:  # as Sae.set_decoder_norm_to_unit_norm
            decoder /= torch.norm(decoder, dim=1, keepdim=True) + torch.finfo(decoder.dtype).eps
        zeros = weight.new_zeros
        return cls(d_in, cfg, layout, weight, zeros(per_shard), decoder, zeros(d_in), hookpoint=hookpoint)

    @property
    def num_latents(self) -> int:
        """Latents of the whole SAE (this shard holds num_latents / shards of them)."""
        return self.total_latents

    def forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        *,
        target: Tensor | None = None,
        total_variance: Tensor | float | None = None,
        residual_variance: Tensor | float | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> ForwardOutput:
        """As `Sae.forward`, a collective of the shard group. `dead_mask` covers all M latents (every rank of
        the group holds the same one: the latents chosen, hence the counters, are the same everywhere).
        `target` is what the trainer passes every SAE, for an autoencoder equal to x: it is not used (the
        config refuses sharded transcoders)."""
        layout = self.layout
        per_shard = self.encoder.out_features
        x = x.reshape(-1, self.d_in).to(self.dtype)
        dead_local = None
        n_dead = 0
        if dead_mask is not None:
            dead_local = dead_mask[self.first_latent : self.first_latent + per_shard].to(x.device)
            n_dead = int(dead_mask.sum())
        dead_idx = dead_local.nonzero().squeeze(1) if dead_local is not None else None
        centred = _CentreForShards.apply(x, self.b_dec, layout.shard_group)
        enc = topk_encode(
            centred,
            self.encoder.weight,
            self.encoder.bias,
            min(self.k, per_shard),
            dead_idx,
            self.k_aux,
            compute_dtype,
        )
        acts, indices, mask = select_global_topk(enc.acts, enc.indices + self.first_latent, self.k, layout)
        partial = sparse_decode(enc.acts * mask, enc.indices, self.W_dec)
        sae_out = _SumOverShards.apply(partial, layout.shard_group) + self.b_dec

        e = (x - sae_out).float()
        if total_variance is None:
            xf = x.float()
            total_variance = (xf - xf.mean(0)).pow(2).sum()
        fvu = e.pow(2).sum() / total_variance

        if n_dead > 0 and self.k_aux > 0:
            width = min(self.k_aux, per_shard)  # the most candidates any shard can have: same on all
            local_aux = enc.aux_acts.shape[1]
            padded_values = _pad(enc.aux_acts.detach(), width, float("-inf"))
            padded_indices = _pad(enc.aux_indices + self.first_latent, width, -1)
            k_aux = min(self.k_aux, n_dead)
            _, _, aux_mask = select_global_topk(padded_values, padded_indices, k_aux, layout)
            aux_partial = sparse_decode(enc.aux_acts * aux_mask[:, :local_aux], enc.aux_indices, self.W_dec)
            aux_out = _SumOverShards.apply(aux_partial, layout.shard_group)  # no b_dec
            scale = min(n_dead / self.k_aux, 1.0)
            residual = e.detach()
            if residual_variance is None:
                residual_variance = (residual - residual.mean(0)).pow(2).sum()
            auxk_loss = scale * (aux_out.float() - residual).pow(2).sum() / residual_variance
        else:
            auxk_loss = fvu.new_zeros(())
        return ForwardOutput(sae_out, acts, indices, fvu, auxk_loss)

    def encode(self, *args, **kwargs):
        raise NotImplementedError("a ShardedSae encodes in forward (a collective); gather it with whole()")

    def decode(self, *args, **kwargs):
        raise NotImplementedError("a ShardedSae decodes in forward (a collective); gather it with whole()")

    # ---------------------------------------------------------------- the whole SAE, for saving
    @torch.no_grad()
    def whole(self) -> Sae | None:
        """The unsharded SAE on shard 0 of the group (on the CPU), None on the others; a collective.

        Shard 0 receives one shard at a time into a CPU copy: its device never holds more than one shard
        more than in training (a gather would put the whole matrix on it)."""
        group, per_shard = self.layout.shard_group, self.encoder.out_features
        gathered = {}
        sharded = {
            "encoder.weight": self.encoder.weight,
            "encoder.bias": self.encoder.bias,
            "W_dec": self.W_dec,
        }
        for name, t in sharded.items():
            t = t.detach().contiguous()
            if not self.is_gatherer:
                dist.send(t, group=group, group_dst=0)
                continue
            whole = torch.empty((self.total_latents, *t.shape[1:]), dtype=t.dtype)
            whole[:per_shard] = t.cpu()
            received = torch.empty_like(t)
            for shard in range(1, self.layout.shards):
                dist.recv(received, group=group, group_src=shard)
                whole[shard * per_shard : (shard + 1) * per_shard] = received.cpu()
            gathered[name] = whole
        if not self.is_gatherer:
            return None
        sae = Sae(self.d_in, self.cfg, "meta", self.dtype, hookpoint=self.hookpoint)
        sae.load_state_dict({**gathered, "b_dec": self.b_dec.detach().cpu()}, assign=True)
        return sae

    @property
    def is_gatherer(self) -> bool:
        return self.layout.shard_rank == 0

    def save_to_disk(self, path, input_scale: float = 1.0) -> None:
        """Write the whole SAE in the usual layout from shard 0; every rank of the shard group calls it."""
        whole = self.whole()
        if whole is not None:
            whole.save_to_disk(path, input_scale=input_scale)


def all_shards_agree(flag: bool, layout: ShardLayout) -> bool:
    """True when `flag` is true on every rank of the shard group (e.g. all gradients finite), so that the
    shards of one SAE skip or take an update together."""
    if not layout.sharded:
        return flag
    device = "cuda" if layout.mesh is not None and layout.mesh.device_type == "cuda" else "cpu"
    failures = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(failures, group=layout.shard_group)
    return int(failures.item()) == 0


# ---------------------------------------------------------------------- trainer states: resume, reshard
# Parameters whose rows are latents: split over the shards, with the rows of their optimizer state. The others
# (b_dec) are whole, and the same, on every shard.
LATENT_PARAMS = frozenset({"encoder.weight", "encoder.bias", "W_dec"})


def _state_files(run_dir: Path) -> dict[int, dict[int, Path]]:
    """{step: {rank: path}} of the trainer states in the run folder."""
    files: dict[int, dict[int, Path]] = {}
    for p in (run_dir / STATE_DIR).glob("rank*-step*.pt"):
        if m := re.fullmatch(r"rank(\d+)-step(\d+)\.pt", p.name):
            files.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    return files


def _open_state(path: Path) -> dict[str, Any]:
    """A trainer state whose tensors are mapped from the file, read as they are touched (resharding reads
    only the rows it keeps); an unreadable file gets checkpoint.load_state's one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format state, or damaged: load_state says which
        state = None
    if not isinstance(state, dict) or "step" not in state or "saes" not in state or "config" not in state:
        return ckpt.load_state(path)
    return state


def _saved_shards(state: dict[str, Any]) -> int:
    return int(json.loads(state["config"]).get("shard_latents", 1))


def newest_shard_step(run_dir: Path) -> tuple[int, int]:
    """(step, shard count) of the newest step at which every shard of the layout that saved it wrote its
    state; the count is read from that step's rank-0 state (1 for an unsharded run: rank 0 writes alone).
    Steps of another layout (a run resumed with another --shard_latents) are taken as they were saved."""
    files = _state_files(run_dir)
    newest_shards = None
    for step in sorted(files, reverse=True):
        ranks = files[step]
        if 0 not in ranks:
            continue
        shards = _saved_shards(_open_state(ranks[0]))
        newest_shards = newest_shards or shards
        if set(ranks) >= set(range(shards)):
            return step, shards
    if newest_shards is None:
        raise ConfigError(
            f"{run_dir}: the trainer states there were written by a different number of ranks or mode; "
            "resume with the same world size, --distribute_layers and --shard_latents settings as the "
            "original run"
        )
    refuse_incomplete_shard_states(run_dir, newest_shards)
    raise AssertionError("unreachable")


def read_shard_state(
    run_dir: Path, layout: ShardLayout, replicas: int, param_names: list[str]
) -> tuple[Path, dict[str, Any]]:
    """(path, trainer state) this rank resumes from: its shard's state of the newest complete step when the
    run was saved with layout.shards shards, else one cut for this shard from the saved shards' states
    (resharding). Another number of data-parallel replicas is refused in one line: the batches would
    differ."""
    step, saved = newest_shard_step(run_dir)
    path = ckpt.state_path(run_dir, 0, step)
    states = [_open_state(ckpt.state_path(run_dir, shard, step)) for shard in range(saved)]
    saved_replicas = int(states[0]["world_size"])
    if saved_replicas != replicas and (saved > 1 or layout.shards > 1):
        raise ConfigError(
            f"{path}: the run was saved on {saved_replicas * saved} ranks ({saved_replicas} data-parallel "
            f"replicas x --shard_latents {saved}); resume it on {saved_replicas} x N ranks with "
            f"--shard_latents N, N dividing the latents (now {replicas} x {layout.shards})"
        )
    if saved == layout.shards:
        path = ckpt.state_path(run_dir, layout.shard_rank, step)
        return path, ckpt.load_state(path)
    return path, reshard_state(states, layout, param_names, f"{run_dir / STATE_DIR} step {step}")


def reshard_state(
    states: list[dict[str, Any]], layout: ShardLayout, param_names: list[str], where: str
) -> dict[str, Any]:
    """The trainer state shard `layout.shard_rank` of `layout.shards` would have written, from the states
    that all shards of another layout wrote at one step (in shard order; one state for an unsharded run):
    the rows of each latent parameter and of its optimizer state, concatenated and cut again; what is whole
    on every shard (b_dec and its optimizer state, the dead-latent counters, the step, the schedule) from
    shard 0, after checking that the other shards agree. `param_names`: the SAE's parameters in optimizer
    order; `where` names the states in errors."""
    first = states[0]
    config = json.loads(first["config"])
    config["shard_latents"] = layout.shards
    out = {**first, "config": json.dumps(config, sort_keys=True), "saes": {}, "optimizers": {}}
    out["tokens_since_fired"] = {
        hookpoint: _agreed(
            [s["tokens_since_fired"][hookpoint] for s in states], f"{hookpoint} counters", where
        )
        for hookpoint in first["tokens_since_fired"]
    }
    for hookpoint, first_sae in first["saes"].items():
        saved_rows = first_sae["encoder.weight"].shape[0]
        latents = saved_rows * len(states)
        check_divisible(latents, layout.shards)
        new_rows = latents // layout.shards
        rows = slice(layout.shard_rank * new_rows, (layout.shard_rank + 1) * new_rows)
        saes = [s["saes"][hookpoint] for s in states]
        out["saes"][hookpoint] = {
            name: _recut([sd[name] for sd in saes], name, saved_rows, rows, f"{hookpoint} {name}", where)
            for name in first_sae
        }
        optimizers = [s["optimizers"][hookpoint] for s in states]
        if "state" not in optimizers[0]:
            raise CheckpointError(f"{where}: the optimizer state of {hookpoint} has several parts")
        new_state = {}
        for index, entry in optimizers[0]["state"].items():
            name = param_names[int(index)]
            new_state[index] = {
                key: _recut(
                    [o["state"][index][key] for o in optimizers],
                    name,
                    saved_rows,
                    rows,
                    f"{name} {key}",
                    where,
                )
                for key in entry
            }
        groups = _agreed([o["param_groups"] for o in optimizers], f"{hookpoint} param groups", where)
        out["optimizers"][hookpoint] = {"state": new_state, "param_groups": groups}
    return out


def _recut(parts: list[Any], name: str, saved_rows: int, rows: slice, what: str, where: str) -> Any:
    """A latent parameter's (or its optimizer state's) `rows` of the concatenated saved shards; anything else
    (b_dec, step counts) as shard 0 holds it, after checking that the others agree."""
    if name in LATENT_PARAMS and isinstance(parts[0], Tensor) and parts[0].dim() > 0:
        return _cut_rows(parts, saved_rows, rows)
    return _agreed(parts, what, where)


def _cut_rows(parts: list[Tensor], rows_per_part: int, rows: slice) -> Tensor:
    """Rows `rows` of the concatenated `parts` (rows_per_part rows each), reading only the parts needed."""
    first, last = rows.start // rows_per_part, (rows.stop - 1) // rows_per_part
    offset = first * rows_per_part
    return torch.cat(parts[first : last + 1])[rows.start - offset : rows.stop - offset].clone()


def _agreed(values: list[Any], what: str, where: str) -> Any:
    """values[0], after checking every shard holds the same (floats to rounding: sums over a group)."""
    for shard, value in enumerate(values[1:], 1):
        first = values[0]
        if isinstance(first, Tensor):
            same = first.shape == value.shape and (
                torch.allclose(first, value, rtol=1e-5, atol=1e-7)
                if first.is_floating_point()
                else torch.equal(first, value)
            )
        else:
            same = first == value
        if not same:
            raise CheckpointError(
                f"{where}: shard {shard}'s {what} differs from shard 0's, though every shard holds the same: "
                "these states are not of one run; restore them, or resume with the --shard_latents they had"
            )
    return values[0].clone() if isinstance(values[0], Tensor) else values[0]


def prune_other_layouts(run_dir: Path, shards: int, keep_step: int) -> None:
    """After every shard saved `keep_step`: remove older states of the ranks >= `shards` (left by the layout
    a resharded run was saved with before)."""
    for step, ranks in _state_files(run_dir).items():
        if step < keep_step:
            for rank, path in ranks.items():
                if rank >= shards:
                    path.unlink(missing_ok=True)


def refuse_incomplete_shard_states(run_dir: Path, shards: int) -> None:
    """Raise a CheckpointError naming the shard states missing at the newest saved step (resume found no step
    with the states of all `shards` shards)."""
    files = _state_files(run_dir)
    newest = max(files)
    missing = [f"rank{r}-step{newest:09d}.pt" for r in range(shards) if r not in files[newest]]
    raise CheckpointError(
        f"{run_dir / STATE_DIR}: no step has the trainer states of all {shards} latent shards (the newest, "
        f"step {newest}, lacks {', '.join(missing)}); restore the missing shard states (resuming, also with "
        "another --shard_latents, needs every shard's state)"
    )
