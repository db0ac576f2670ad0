"""SaeTrainer: one LM forward per batch feeds the SAEs of every selected layer.

One optimizer step:

    for each of grad_acc_steps batches (this rank's share of the global batch):
        run the LM with hooks on the selected blocks, stopping after the deepest one
        (--distribute_layers: send each layer's activations to the rank that owns its SAE)
        for each SAE: drop special tokens, split into micro_acc_steps chunks, backward the *sum* of squared
                      errors (FVU numerator) + auxk_alpha * AuxK numerator
    after the last batch's backward of each SAE (then the next SAE's, so one SAE's gradients are alive at a time):
      pool the variance of all tokens of the step (all batches, all ranks; float64, Chan's formula)
      gradients: sum over ranks, divide by that variance -> exactly the gradient of the global-batch FVU
      remove the radial part of decoder gradients, Adam step of this SAE, renormalise its decoder rows
    dead-latent counters += tokens of the step (all ranks); latents that fired anywhere reset to 0

Normalising by the pooled variance at the step makes micro-batching, gradient accumulation and data
parallelism give the same update as one big batch, up to float rounding.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, default_lr
from .distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    gather_objects,
    gather_to,
    init_distributed,
    split_layers,
)
from .models import (
    capture_residuals,
    hidden_size,
    layer_index,
    module_device,
    resolve_dtype,
    run_until_captured,
    select_hookpoints,
    special_token_ids,
)
from .sae import Sae
from .utils import atomic_write_json
from .version import __version__

# Fields that may change between a run and its resume without changing what is computed.
# (hf_token is here so that the secret is never written into the trainer state.)
RESUME_MUTABLE = {
    "save_every", "log_every", "log_to_wandb", "log_to_tensorboard", "save_dir", "run_name", "resume",
    "hf_token", "device", "backend", "data_preprocessing_num_proc",
}


class _VarianceStats:
    """Per-batch (count, mean, centred sum of squares) in float64, pooled exactly across batches and ranks."""

    def __init__(self) -> None:
        self.parts: list[tuple[int, Tensor, Tensor]] = []

    def add(self, x: Tensor) -> None:
        xd = x.double()
        mean = xd.mean(0)
        # Pooled on the CPU (d + 2 numbers per batch), whatever device the activations are on.
        self.parts.append((x.shape[0], mean.cpu(), (xd - mean).pow(2).sum().cpu()))

    def pooled(self, ctx: DistContext, reduce: bool) -> tuple[int, Tensor]:
        """(token count, sum over tokens of ||x - global mean||^2) over this step's batches (and ranks)."""
        d = self.parts[0][1].shape[0]
        head = torch.zeros(d + 1, dtype=torch.float64)
        for n, mean, _ in self.parts:
            head[0] += n
            head[1:] += n * mean
        if reduce:
            all_reduce_sum(head, ctx)
        n_total = int(head[0].item())
        gmean = head[1:] / max(n_total, 1)
        m2 = torch.zeros(1, dtype=torch.float64)
        for n, mean, sq in self.parts:
            m2 += sq + n * (mean - gmean).pow(2).sum()
        if reduce:
            all_reduce_sum(m2, ctx)
        return n_total, m2[0]


def make_adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Fused Adam where this torch supports it for the device (5x faster than foreach on CPU), else the default."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _optimizer_states(state: dict[str, Any], hookpoints: list[str], path: Path) -> dict[str, dict]:
    """Each SAE's Adam state from a trainer state; states written before Adam was per SAE hold one optimizer
    over all SAEs' parameters (in hookpoint order, the same number per SAE), which is split here."""
    if "optimizers" in state:
        return {h: state["optimizers"][h] for h in hookpoints}
    joint = state.get("optimizer") or {}
    per_sae = len(joint.get("state", {})) // max(len(hookpoints), 1) if joint.get("state") else 0
    groups = joint.get("param_groups") or []
    if per_sae == 0 or len(groups) != 1:
        raise ckpt.CheckpointError(f"{path}: no optimizer state for {hookpoints}")
    out = {}
    for i, h in enumerate(hookpoints):
        ids = range(i * per_sae, (i + 1) * per_sae)
        out[h] = {"state": {j: joint["state"][pid] for j, pid in enumerate(ids) if pid in joint["state"]},
                  "param_groups": [{**groups[0], "params": list(range(per_sae))}]}
    return out


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory (and peak CUDA allocation), in MiB."""
    import resource

    peak = {"rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        peak["cuda"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


class SaeTrainer:
    def __init__(
        self,
        cfg: TrainConfig,
        dataset: Any,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        dist_ctx: DistContext | None = None,
        resume: bool = False,
        run_info: dict[str, Any] | None = None,
        progress: bool = True,
    ):
        self.cfg = cfg
        self.model = model
        # Without an explicit context, follow the model: a CPU model on a GPU machine trains on the CPU.
        self.ctx = dist_ctx or init_distributed(str(module_device(model)))
        self.dataset = dataset
        self.run_info = run_info or {}
        self.progress = progress
        self.hookpoints = select_hookpoints(
            model, layers=cfg.layers, layer_stride=cfg.layer_stride, hookpoints=cfg.hookpoints
        )
        self.d_in = hidden_size(model)

        if cfg.distribute_layers and self.ctx.enabled:
            self.owners = {h: r for r, share in enumerate(split_layers(self.hookpoints, self.ctx.world_size)) for h in share}
        else:
            self.owners = {h: self.ctx.rank for h in self.hookpoints}
        self.distributed_layers = cfg.distribute_layers and self.ctx.enabled
        self.ddp = self.ctx.enabled and not self.distributed_layers
        self.local = [h for h in self.hookpoints if self.owners[h] == self.ctx.rank]

        if cfg.exclude_tokens is not None:
            self.exclude = torch.tensor(cfg.exclude_tokens, dtype=torch.long)
        else:
            self.exclude = torch.tensor(special_token_ids(tokenizer) if tokenizer is not None else [], dtype=torch.long)

        # Every SAE is initialised from a seed of its own, so the result does not depend on which rank owns it.
        sae_dtype = resolve_dtype(cfg.sae_dtype)
        self.saes: dict[str, Sae] = {}
        for h in self.local:
            torch.manual_seed(cfg.seed + layer_index(h))
            self.saes[h] = Sae(self.d_in, cfg.sae, self.ctx.device, sae_dtype, hookpoint=h)
        self.num_latents = cfg.sae.latents_for(self.d_in)
        self.lr = cfg.lr or default_lr(self.num_latents)
        # One Adam per SAE: each SAE is updated (and its gradients freed) as soon as its last backward of the
        # step is done, while the other SAEs may still be accumulating theirs.
        self.optimizers = {h: make_adam(list(sae.parameters()), self.lr) for h, sae in self.saes.items()}
        self.compute_dtype = resolve_dtype(cfg.autocast)

        self.tokens_since_fired = {h: torch.zeros(self.num_latents, dtype=torch.long) for h in self.local}
        self.step = 0
        self.tokens_seen = 0
        self.wall_time = 0.0
        self.b_dec_initialised = False
        # Where the time goes (reported in run.json; benchmarks/train_e2e.py reads it).
        self.timings = {"lm_forward_s": 0.0, "sae_s": 0.0}

        self.seq_len, n_seq = self._dataset_shape()
        per_batch = cfg.batch_size * self.ctx.world_size
        n_batches = n_seq // per_batch
        if cfg.max_tokens is not None:
            n_batches = min(n_batches, math.ceil(cfg.max_tokens / (per_batch * self.seq_len)))
        self.total_steps = n_batches // cfg.grad_acc_steps
        if self.total_steps == 0:
            need = per_batch * cfg.grad_acc_steps
            raise ConfigError(
                f"dataset too small for one optimizer step: it has {n_seq} sequences of {self.seq_len} tokens, one "
                f"step needs batch_size x world_size x grad_acc_steps = {need}; use more data or a smaller batch"
            )

        self.run_dir = Path(cfg.save_dir) / (cfg.run_name or "run")
        if resume:
            self._resume()
        elif ckpt.has_state(self.run_dir):
            raise ConfigError(
                f"{self.run_dir} already holds a checkpoint; pass --resume to continue it, or choose another "
                "--run_name / --save_dir (nothing was overwritten)"
            )

    # ------------------------------------------------------------------ data
    def _dataset_shape(self) -> tuple[int, int]:
        if isinstance(self.dataset, Tensor):
            if self.dataset.ndim != 2:
                raise ConfigError(f"a tensor dataset must be [sequences, tokens], got shape {tuple(self.dataset.shape)}")
            return self.dataset.shape[1], self.dataset.shape[0]
        if "input_ids" not in getattr(self.dataset, "column_names", []):
            raise ConfigError("the dataset needs an 'input_ids' column: tokenize it with sae_core.data.chunk_and_tokenize")
        n = len(self.dataset)
        if n == 0:
            raise ConfigError("the dataset is empty")
        return len(self.dataset[0]["input_ids"]), n

    def _rows(self, start: int, stop: int) -> Tensor:
        if isinstance(self.dataset, Tensor):
            return self.dataset[start:stop].long()
        ids = self.dataset[start:stop]["input_ids"]
        return ids.long() if isinstance(ids, Tensor) else torch.tensor(ids, dtype=torch.long)

    def _global_batch_ids(self, batch_index: int) -> Tensor:
        per_batch = self.cfg.batch_size * self.ctx.world_size
        return self._rows(batch_index * per_batch, (batch_index + 1) * per_batch)

    # ------------------------------------------------------------------ one step
    def _activations(self, batch_index: int) -> dict[str, Tensor]:
        """This rank's SAE inputs for one batch: {hookpoint: [tokens, d]} for the SAEs it owns."""
        global_ids = self._global_batch_ids(batch_index)
        b = self.cfg.batch_size
        my_ids = global_ids[self.ctx.rank * b : (self.ctx.rank + 1) * b]
        device = self.ctx.device
        t0 = time.perf_counter()
        with torch.no_grad(), capture_residuals(self.model, self.hookpoints) as acts:
            run_until_captured(self.model, my_ids.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.timings["lm_forward_s"] += time.perf_counter() - t0
        for h, a in acts.items():
            if a.shape[-1] != self.d_in:
                raise ConfigError(f"{h} has width {a.shape[-1]}, expected the model's hidden size {self.d_in}")
        if self.distributed_layers:
            ids = global_ids
            gathered = {}
            for h in self.hookpoints:
                full = gather_to(acts[h].float(), self.owners[h], self.ctx)
                if full is not None:
                    gathered[h] = full
            acts = gathered
        else:
            ids = my_ids
        mask = ~torch.isin(ids, self.exclude)
        return {h: acts[h][mask.to(acts[h].device)].float() for h in self.local}

    def _lr_at(self, step: int) -> float:
        warm = self.cfg.lr_warmup_steps
        if step < warm:
            return self.lr * (step + 1) / warm
        return self.lr * max(self.total_steps - step, 0) / (self.total_steps - warm + 1)

    def _train_step(self) -> dict[str, float]:
        cfg = self.cfg
        stats = {h: _VarianceStats() for h in self.local}
        fired = {h: torch.zeros(self.num_latents, dtype=torch.bool) for h in self.local}
        sse = {h: 0.0 for h in self.local}
        aux = {h: 0.0 for h in self.local}
        dead_masks = {
            h: (self.tokens_since_fired[h] >= cfg.dead_feature_threshold).to(self.ctx.device) for h in self.local
        }
        first = self.step * cfg.grad_acc_steps
        batches = (self._activations(first + a) for a in range(cfg.grad_acc_steps))
        if not self.b_dec_initialised:
            # First step only: hold all its batches so b_dec starts at the mean of the whole (global) step.
            batches = list(batches)
            for h in self.local:
                self._init_b_dec(h, torch.cat([inputs[h] for inputs in batches]))
            self.b_dec_initialised = True
        lr = self._lr_at(self.step)
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr
        metrics: dict[str, float] = {}
        for a, inputs in enumerate(batches):
            last_batch = a == cfg.grad_acc_steps - 1
            t0 = time.perf_counter()
            for h, x in inputs.items():
                sae = self.saes[h]
                stats[h].add(x)
                dead = dead_masks[h] if cfg.auxk_alpha > 0 and dead_masks[h].any() else None
                for chunk in x.chunk(cfg.micro_acc_steps):
                    out = sae(chunk, dead, total_variance=1.0, compute_dtype=self.compute_dtype)
                    loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
                    loss.backward()
                    live = out.latent_indices[out.latent_acts > 0]
                    fired[h][live.cpu()] = True
                    sse[h] += out.fvu.item()
                    aux[h] += out.auxk_loss.item()
                if last_batch:
                    # Update this SAE now and free its gradients before the next layer makes its own: only
                    # one layer's gradients are ever alive (with grad_acc_steps 1), whatever the layer count.
                    metrics.update(self._update_layer(h, stats[h], fired[h], sse[h], aux[h]))
            self.timings["sae_s"] += time.perf_counter() - t0
        metrics["lr"] = lr
        return metrics

    def _update_layer(self, h: str, stats: _VarianceStats, fired: Tensor, sse: float, aux: float) -> dict[str, float]:
        """Normalise, reduce across ranks and apply the step's gradient of one SAE; its metrics."""
        cfg = self.cfg
        sae = self.saes[h]
        n_tokens, variance = stats.pooled(self.ctx, reduce=self.ddp)
        grads = [p.grad for p in sae.parameters()]
        if self.ddp:
            flat = torch.cat([g.reshape(-1) for g in grads])
            all_reduce_sum(flat, self.ctx)
            fired = all_reduce_sum(fired.long(), self.ctx) > 0
            sse, aux = all_reduce_sum(torch.tensor([sse, aux], dtype=torch.float64), self.ctx).tolist()
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            del flat
        scale = 1.0 / max(float(variance), 1e-30)
        for g in grads:
            g.mul_(scale)
        if cfg.sae.normalize_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        self.optimizers[h].step()
        self.optimizers[h].zero_grad(set_to_none=True)
        if cfg.sae.normalize_decoder:
            sae.set_decoder_norm_to_unit_norm()
        counters = self.tokens_since_fired[h]
        counters += n_tokens
        counters[fired] = 0
        metrics = {
            f"fvu/{h}": sse * scale,
            f"auxk/{h}": aux * scale,
            f"dead_pct/{h}": 100.0 * (counters >= cfg.dead_feature_threshold).float().mean().item(),
        }
        if h == self.local[0]:
            metrics["step_tokens"] = n_tokens
        return metrics

    @torch.no_grad()
    def _init_b_dec(self, h: str, x: Tensor) -> None:
        """b_dec starts at the mean of the first batch (over all ranks), so the encoder sees centred inputs."""
        head = torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64), x.double().sum(0).cpu()])
        if self.ddp:
            all_reduce_sum(head, self.ctx)
        self.saes[h].b_dec.data.copy_((head[1:] / head[0].clamp_min(1)).to(self.saes[h].b_dec.dtype))

    # ------------------------------------------------------------------ the loop
    def fit(self, max_steps: int | None = None) -> dict[str, float]:
        """Train to the end of the data (or max_tokens), saving every `save_every` steps and at the end.

        `max_steps` stops earlier (after a checkpoint), e.g. to continue later with `resume=True`.
        """
        from tqdm.auto import tqdm

        cfg = self.cfg
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        loggers = self._open_loggers()
        bar = tqdm(
            total=self.total_steps, initial=self.step, desc="Training", unit="step",
            disable=not (self.ctx.is_main and self.progress),
        )
        last: dict[str, float] = {}
        t_start = time.perf_counter()
        wall0 = self.wall_time
        tokens_at_start = self.tokens_seen
        stop_at = min(max_steps, self.total_steps) if max_steps is not None else self.total_steps
        while self.step < stop_at:
            metrics = self._train_step()
            self.step += 1
            step_tokens = self._all_metrics(metrics)
            self.tokens_seen += int(step_tokens.pop("step_tokens", 0))
            last = step_tokens
            self.wall_time = wall0 + time.perf_counter() - t_start
            if self.ctx.is_main:
                fvus = [v for k, v in last.items() if k.startswith("fvu/")]
                rate = (self.tokens_seen - tokens_at_start) / max(time.perf_counter() - t_start, 1e-9)
                bar.set_postfix(fvu=f"{sum(fvus) / len(fvus):.3f}", tok_s=f"{rate:,.0f}")
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    record = {"step": self.step, "tokens": self.tokens_seen, "tokens_per_s": rate, **last}
                    for log in loggers:
                        log(record)
            if self.step % cfg.save_every == 0 or self.step == stop_at:
                self.save()
        bar.close()
        return last

    def _all_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """With --distribute_layers each rank has its own layers' metrics: merge them (everyone gets all)."""
        if not self.distributed_layers:
            return metrics
        merged: dict[str, float] = {}
        for part in gather_objects(metrics, self.ctx):
            for k, v in part.items():
                if k == "step_tokens":
                    merged[k] = max(merged.get(k, 0), v)
                else:
                    merged[k] = v
        return merged

    def _open_loggers(self):
        if not self.ctx.is_main:
            return []
        path = self.run_dir / "metrics.jsonl"
        loggers = []

        def jsonl(record: dict) -> None:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

        loggers.append(jsonl)
        if self.cfg.log_to_wandb:
            try:
                import wandb

                run = wandb.init(name=self.run_dir.name, config=self.run_info.get("config", self.cfg.to_dict()))
                loggers.append(lambda r: run.log(r, step=r["step"]))
            except ImportError:
                print("warning: --log_to_wandb given but wandb is not installed; logging to metrics.jsonl only")
        if self.cfg.log_to_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.run_dir / "tensorboard"))

                def tb(r: dict) -> None:
                    for k, v in r.items():
                        if isinstance(v, (int, float)) and k != "step":
                            writer.add_scalar(k, v, r["step"])

                loggers.append(tb)
            except ImportError:
                print("warning: --log_to_tensorboard given but tensorboard is not installed")
        return loggers

    # ------------------------------------------------------------------ checkpoints
    def _config_for_state(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        return {k: v for k, v in d.items() if k not in RESUME_MUTABLE}

    def save(self) -> None:
        """Write the SAE folders, this rank's trainer state and run.json; every rank reaches the same barriers."""
        writes_state = self.distributed_layers or self.ctx.is_main
        if writes_state:
            try:
                self._write_checkpoint()
            except OSError as e:
                # Disk full, quota, permissions: every write is atomic, so what was saved before is intact.
                raise ckpt.CheckpointError(
                    f"cannot write the checkpoint of step {self.step} to {self.run_dir}: {e.strerror or e}; "
                    "the previous checkpoint is intact (free space, then resume with --resume)"
                ) from None
        barrier(self.ctx)
        if writes_state:
            ckpt.prune_states(self.run_dir, self.ctx.rank, self.step)
        peaks = gather_objects(_peak_memory_mb(self.ctx.device), self.ctx)  # every rank joins
        if self.ctx.is_main:
            self._write_run_info(peaks)
        barrier(self.ctx)

    def _write_checkpoint(self) -> None:
        for h, sae in self.saes.items():
            sae.save_to_disk(self.run_dir / h)
        state = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "wall_time": self.wall_time,
            "world_size": self.ctx.world_size,
            "distribute_layers": self.distributed_layers,
            "hookpoints": list(self.local),
            "config": json.dumps(self._config_for_state(), sort_keys=True),
            "saes": {h: sae.state_dict() for h, sae in self.saes.items()},
            "optimizers": {h: opt.state_dict() for h, opt in self.optimizers.items()},
            "tokens_since_fired": dict(self.tokens_since_fired),
            "b_dec_initialised": self.b_dec_initialised,
        }
        ckpt.save_state(self.run_dir, self.ctx.rank, self.step, state)

    def _write_run_info(self, peak_memory_mb: list[dict[str, float]]) -> None:
        info = {
            **self.run_info,
            "hookpoints": self.hookpoints,
            "tokens": self.tokens_seen,
            "steps": self.step,
            "total_steps": self.total_steps,
            # Sequences [0, train_sequences) of the dataset feed the whole run: evaluation holds out the rest.
            "train_sequences": self.total_steps * self.cfg.grad_acc_steps * self.cfg.batch_size * self.ctx.world_size,
            "seq_len": self.seq_len,
            "wall_time_s": round(self.wall_time, 3),
            "world_size": self.ctx.world_size,
            "distribute_layers": self.distributed_layers,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "peak_memory_mb_per_rank": peak_memory_mb,
        }
        info.setdefault("config", {k: v for k, v in self.cfg.to_dict().items() if k != "hf_token"})
        info["sae_core_version"] = __version__
        atomic_write_json(self.run_dir / "run.json", info)

    def _resume(self) -> None:
        writers = self.ctx.world_size if self.distributed_layers else 1
        step = ckpt.latest_complete_step(self.run_dir, writers)
        if step is None:
            if ckpt.has_state(self.run_dir):
                raise ConfigError(
                    f"{self.run_dir}: the trainer states there were written by a different number of ranks or "
                    f"mode; resume with the same world size and --distribute_layers setting as the original run"
                )
            raise ConfigError(f"nothing to resume: {self.run_dir / ckpt.STATE_DIR} holds no trainer state")
        rank = self.ctx.rank if self.distributed_layers else 0
        path = ckpt.state_path(self.run_dir, rank, step)
        state = ckpt.load_state(path)
        if state["world_size"] != self.ctx.world_size or state["distribute_layers"] != self.distributed_layers:
            raise ConfigError(
                f"{path}: the run was saved with world size {state['world_size']} "
                f"(distribute_layers={state['distribute_layers']}); resume it with the same number of ranks "
                f"and mode (now {self.ctx.world_size}, distribute_layers={self.distributed_layers})"
            )
        saved_cfg = json.loads(state["config"])
        now = self._config_for_state()
        diff = sorted(k for k in set(saved_cfg) | set(now) if saved_cfg.get(k) != now.get(k))
        if diff:
            detail = ", ".join(f"{k}: {saved_cfg.get(k)!r} -> {now.get(k)!r}" for k in diff[:5])
            raise ConfigError(f"--resume with a config that differs from the checkpoint's ({detail}); use the original values")
        missing = set(self.local) - set(state["saes"])
        if missing:
            raise ckpt.CheckpointError(f"{path}: no state for {sorted(missing)}")
        for h in self.local:
            self.saes[h].load_state_dict(state["saes"][h])
            self.tokens_since_fired[h] = state["tokens_since_fired"][h].clone()
        for h, state_dict in _optimizer_states(state, self.local, path).items():
            self.optimizers[h].load_state_dict(state_dict)
        self.step = state["step"]
        self.tokens_seen = state["tokens"]
        self.wall_time = state.get("wall_time", 0.0)
        self.b_dec_initialised = state["b_dec_initialised"]
