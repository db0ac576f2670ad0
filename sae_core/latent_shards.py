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

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

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


def make_layout(ctx: DistContext, shards: int) -> ShardLayout:
    """Split the ranks of `ctx` into world_size / shards replicas of `shards` consecutive ranks."""
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

    replicas = ctx.world_size // shards
    mesh = init_device_mesh(ctx.device.type, (replicas, shards), mesh_dim_names=("replica", "shard"))
    return ShardLayout(
        shards=shards,
        shard_rank=mesh.get_local_rank("shard"),
        replicas=replicas,
        replica_rank=mesh.get_local_rank("replica"),
        shard_group=mesh.get_group("shard"),
        replica_group=mesh.get_group("replica"),
        mesh=mesh,
    )


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


def refuse_incomplete_shard_states(run_dir: Path, shards: int) -> None:
    """Raise a CheckpointError naming the shard states missing at the newest saved step (resume found no step
    with the states of all `shards` shards)."""
    steps: dict[int, set[int]] = {}
    for p in (run_dir / STATE_DIR).glob("rank*-step*.pt"):
        if m := re.fullmatch(r"rank(\d+)-step(\d+)\.pt", p.name):
            steps.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    newest = max(steps)
    missing = [f"rank{r}-step{newest:09d}.pt" for r in range(shards) if r not in steps[newest]]
    raise CheckpointError(
        f"{run_dir / STATE_DIR}: no step has the trainer states of all {shards} latent shards (the newest, "
        f"step {newest}, lacks {', '.join(missing)}); restore the missing shard states, or resume with the "
        "--shard_latents the run was saved with"
    )
