"""torchrun integration: process group set-up, the collectives the trainer needs, and the layer split.

Everything degrades to no-ops in a single process, so the trainer has one code path. On CPU the gloo
backend is used (CI runs two real ranks on two cores), on GPU nccl. Every collective has a timeout, and
ranks ask the kernel to kill them when their parent (torchrun) dies, so a failure never leaves a rank
waiting forever.
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import ConfigError
from .parent_death import die_with_parent

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # --shard_latents: the data-parallel replicas' group (rank, world_size count replicas) and this rank's
    # rank in the whole run, which decides the main rank. None: the whole run.
    group: Any = None
    global_rank: int | None = None

    @property
    def is_main(self) -> bool:
        return (self.rank if self.global_rank is None else self.global_rank) == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None, backend: str | None = None) -> DistContext:
    """Join the torchrun process group when launched by torchrun; otherwise a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return DistContext(device=dev)
    die_with_parent()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(
                "device cuda requested but no GPU is available; use --device cpu (gloo backend)"
            )
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank with LOCAL_RANK {local_rank} has no GPU of its own: "
                f"{torch.cuda.device_count()} visible; "
                "use --nproc_per_node at most the GPU count, or --device cpu (gloo)"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("backend nccl needs GPUs; on CPU use --backend gloo")
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("SAE_CORE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend, timeout=timeout, device_id=dev if use_cuda else None)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def all_reduce_sum(t: Tensor, ctx: DistContext) -> Tensor:
    """Sum `t` over ranks in place. NCCL only reduces GPU tensors, so a CPU tensor makes a round trip."""
    if ctx.enabled:
        if ctx.device.type == "cuda" and not t.is_cuda:
            on_gpu = t.to(ctx.device)
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM, group=ctx.group)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ctx.group)
    return t


def barrier(ctx: DistContext) -> None:
    """Every rank of the run (also with --shard_latents, whose ctx counts replicas) waits for all."""
    if dist.is_initialized():
        dist.barrier()


def gather_to(t: Tensor, owner: int, ctx: DistContext) -> Tensor | None:
    """Concatenate (along dim 0, in rank order) every rank's `t` on rank `owner`; None elsewhere."""
    if not ctx.enabled:
        return t
    t = t.contiguous()
    bucket = [torch.empty_like(t) for _ in range(ctx.world_size)] if ctx.rank == owner else None
    dist.gather(t, bucket, dst=owner)
    return torch.cat(bucket) if bucket is not None else None


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's picklable `obj`, on every rank (small things only: metrics)."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj, group=ctx.group)
    return out


def split_layers(hookpoints: list[str], world_size: int) -> list[list[str]]:
    """Contiguous, balanced shares: sizes differ by at most one; any layer count on any rank count."""
    if world_size > len(hookpoints):
        raise ConfigError(
            f"--distribute_layers with {world_size} ranks but only {len(hookpoints)} layers to train: "
            "every rank needs at least one layer; "
            "use fewer ranks or more layers (or drop --distribute_layers)"
        )
    base, extra = divmod(len(hookpoints), world_size)
    shares, start = [], 0
    for r in range(world_size):
        size = base + (1 if r < extra else 0)
        shares.append(hookpoints[start : start + size])
        start += size
    return shares


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class PooledVariance:
    """Per-batch (count, mean, centred sum of squares) in float64, pooled exactly across batches and ranks
    (Chan's formula): the denominator of a step's FVU, whatever the batching."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, Tensor, Tensor]] = []

    def add(self, x: Tensor) -> None:
        xd = x.double()
        # An empty batch (every token excluded) counts zero tokens; its mean would be 0/0 = NaN.
        mean = xd.mean(0) if x.shape[0] else xd.new_zeros(x.shape[-1])
        # Kept on x's device: a copy to the host per batch would make the step wait on the device.
        self.parts.append((x.shape[0], mean, (xd - mean).pow(2).sum()))

    def pooled(self, ctx: DistContext, reduce: bool) -> tuple[Tensor, Tensor]:
        """(token count, sum over tokens of ||x - global mean||^2) over this step's batches (and ranks), as
        float64 scalars on the activations' device (reading them is the caller's host synchronisation)."""
        d, device = self.parts[0][1].shape[0], self.parts[0][1].device
        head = torch.zeros(d + 1, dtype=torch.float64, device=device)
        for n, mean, _ in self.parts:
            head[0] += n
            head[1:] += n * mean
        if reduce:
            all_reduce_sum(head, ctx)
        n_total = head[0]
        gmean = head[1:] / n_total.clamp_min(1)
        m2 = torch.zeros(1, dtype=torch.float64, device=device)
        for n, mean, sq in self.parts:
            m2 += sq + n * (mean - gmean).pow(2).sum()
        if reduce:
            all_reduce_sum(m2, ctx)
        return n_total, m2[0]
