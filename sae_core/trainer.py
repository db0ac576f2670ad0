"""SaeTrainer: one LM forward per batch feeds the SAEs of every selected layer.

One optimizer step:

    for each of grad_acc_steps batches (this rank's share of the global batch):
        run the LM (in eval mode) with hooks on the selected blocks, stopping after the deepest one
        (--distribute_layers: send each layer's activations to the rank that owns its SAE)
        for each SAE: drop special tokens and rows with NaN/Inf (counted), split into micro_acc_steps chunks,
                      backward the *sum* of squared errors (FVU numerator) + auxk_alpha * AuxK numerator
    after the last batch's backward of each SAE
    (then the next SAE's, so one SAE's gradients are alive at a time):
      pool the variance of all tokens of the step (all batches, all ranks; float64, Chan's formula)
      gradients: sum over ranks, divide by that variance -> exactly the gradient of the global-batch FVU
      remove the radial part of decoder gradients, Adam step of this SAE, renormalise its decoder rows
      dead-latent counters += tokens of the step (all ranks); latents that fired anywhere reset to 0
      (a NaN/Inf loss or gradient on any rank, or no token at all, skips the SAE's update and its counters;
      MAX_CONSECUTIVE_SKIPS non-finite steps in a row stop the run)

Normalising by the pooled variance at the step makes micro-batching, gradient accumulation and data
parallelism give the same update as one big batch, up to float rounding.

The file reads in that order: building the trainer, `fit`, one training step, one optimizer step per SAE,
checkpoints (save and resume), then the helpers they use.
"""

import contextlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import checkpoint as ckpt
from .activations import LiveActivations, excluded_token_ids
from .best import BestSaes
from .cache import ActivationCache, CachedActivations
from .config import E2E_FROM_CACHE, TRANSCODE_FROM_CACHE, TrainConfig
from .data import sequence_shape
from .distributed import (
    DistContext,
    PooledVariance,
    all_reduce_sum,
    barrier,
    gather_objects,
    init_distributed,
    split_layers,
)
from .e2e import AuxGradients, EndToEndLoss
from .errors import CheckpointError, ConfigError
from .finetune import start_from
from .fused_optim import fused_decoder_kernels, step_with_fused_decoder
from .guards import DivergenceWatch, refuse_nonfinite_weights
from .kernels import encoder_compute_dtype
from .latent_shards import (
    ShardedSae,
    ShardLayout,
    all_shards_agree,
    make_layout,
    prune_other_layouts,
    read_shard_state,
)
from .loggers import Logger, Profiler, Progress, run_loggers
from .models import (
    hidden_size,
    hookpoint_seed,
    module_device,
    resolve_dtype,
    select_hookpoints,
    transcoder_widths,
)
from .optim import SaeOptimizer, decays, default_lr, lr_at, warmup_steps
from .precision import tf32_matmuls
from .sae import Sae
from .utils import atomic_write_json
from .version import __version__

# A latent counts as dead (AuxK trains it) after dead_feature_threshold tokens without firing, but never after
# more than this fraction of the run's tokens: at the 10M default, any run shorter than 10M tokens would
# otherwise never revive a latent.
MAX_DEAD_FRACTION = 0.1


def dead_threshold(requested: int, run_tokens: int) -> int:
    """Tokens without firing after which a latent is dead: `requested`, capped at MAX_DEAD_FRACTION of the
    run (at least one token)."""
    return max(1, min(requested, math.floor(MAX_DEAD_FRACTION * run_tokens)))


def decayed_k(step: int, decay_steps: int, start: int, k: int) -> int:
    """The k of optimizer step `step`: linear from `start` at step 0 to `k` at `decay_steps`, then `k` (as
    sparsify's k decay, counted here in optimizer steps rather than batches)."""
    if step >= decay_steps:
        return k
    progress = step / decay_steps
    return round(start * (1 - progress) + k * progress)


def count_fired(counts: Tensor, indices: Tensor, acts: Tensor) -> None:
    """counts[m] += the selections of latent m that fired (activation > 0), on the device: boolean indexing
    would make the host wait for the device to learn the result's size."""
    counts.index_add_(0, indices.reshape(-1), (acts > 0).reshape(-1).to(counts.dtype))


class TrainStep(NamedTuple):
    """What one optimizer step did, over all ranks."""

    tokens: int  # tokens the SAEs trained on (special tokens excluded)
    # fvu/, auxk/, dead_pct/<hookpoint> of every SAE, lr; nonfinite_tokens and skipped_steps (run totals)
    metrics: dict[str, float]
    nonfinite_tokens: int = 0  # token rows dropped because an activation was NaN/Inf (all SAEs, all ranks)
    nonfinite_skips: tuple[str, ...] = ()  # SAEs whose update was skipped: non-finite loss or gradients
    empty_skips: tuple[str, ...] = ()  # SAEs whose update was skipped: no token of the step reached them


class SaeTrainer:
    """Trains one SAE per selected hookpoint of `model` on `dataset` (token ids [sequences, tokens], or a
    dataset with an 'input_ids' column), alone or under torchrun. With an `ActivationCache` as `dataset` it
    trains from the cached activations, and `model` may be None.

    `loggers` are called on the main rank with every metrics record, after metrics.jsonl (always written) and
    wandb/TensorBoard (when cfg asks). `resume=True` continues the newest checkpoint in the run folder;
    without it an existing checkpoint is never overwritten.
    """

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
        loggers: Sequence[Logger] = (),
    ):
        self.cfg = cfg
        self.model = model
        self.dataset = dataset
        self.cache = dataset if isinstance(dataset, ActivationCache) else None
        # Without an explicit context, follow the model: a CPU model on a GPU machine trains on the CPU.
        self.ctx = dist_ctx or init_distributed(str(module_device(model)) if model is not None else None)
        # --shard_latents: each SAE is split over a group of ranks that read the same batches; the trainer's
        # data parallelism (and its collectives) then runs over replicas of that group (latent_shards.py).
        self.shards = make_layout(self.ctx, cfg.shard_latents) if cfg.shard_latents > 1 else None
        if self.shards is not None:
            self.ctx = self.shards.data_ctx(self.ctx)
        self.run_info = run_info or {}
        self.progress = progress
        self.extra_loggers = list(loggers)
        self.run_dir = Path(cfg.save_dir) / (cfg.run_name or "run")
        self.profiler = Profiler(self.ctx.device, enabled=cfg.profile)

        self._place_hookpoints()
        if self.cache is not None:
            self.cache.check_exclusion(cfg.exclude_tokens)
            self.excluded_token_ids = self.cache.excluded_token_ids
        else:
            self.excluded_token_ids = excluded_token_ids(cfg.exclude_tokens, tokenizer, warn=self.ctx.is_main)
        self._build_saes()
        if cfg.finetune:
            start_from(self.saes, cfg.finetune)
        self.seq_len, self.total_steps = self._step_budget()
        self.warmup_steps = warmup_steps(cfg.lr_warmup_steps, self.total_steps)
        # Sequences [0, train_sequences) of the dataset feed the whole run: evaluation holds out the rest.
        self.train_sequences = self.total_steps * cfg.grad_acc_steps * cfg.batch_size * self.ctx.world_size
        self.dead_threshold = dead_threshold(cfg.dead_feature_threshold, self.train_sequences * self.seq_len)
        if self.cache is not None:
            # A shuffled cache feeds rows of any cached sequence: evaluation must start after all of them.
            self.train_sequences = self.cache.sequences
            self.activations = CachedActivations(
                self.cache,
                hookpoints=self.hookpoints,
                owners=self.owners,
                ctx=self.ctx,
                batch_size=cfg.batch_size,
                whole_batch=self.distributed_layers,
                seed=cfg.seed,
                shuffle_shards=cfg.cache_shuffle_shards,
                profiler=self.profiler,
            )
        else:
            self.activations = self._live_activations()
        # --loss_fn kl/ce: the SAEs train through the frozen LM, their reconstructions spliced in (e2e.py).
        self.e2e = None
        if cfg.loss_fn != "fvu":
            self.e2e = EndToEndLoss(
                model, cfg.loss_fn, self.hookpoints, cfg.sae.transcode, cfg.micro_acc_steps
            )
        self.step = 0
        self.tokens_seen = 0
        self.wall_time = 0.0
        self.b_dec_initialised = bool(cfg.finetune)  # a fine-tuned SAE keeps its b_dec
        # Run totals of dropped rows and skipped steps (a metrics record is written every log_every steps).
        self.watch = DivergenceWatch(self.hookpoints)
        # Activations are multiplied by these before the SAEs (1 unless normalize_inputs), set at the first
        # step.
        self.input_scales = {hookpoint: 1.0 for hookpoint in self.local_hookpoints}
        self.best = BestSaes(self.local_hookpoints) if cfg.save_best else None
        self._resume_or_refuse(resume)

    def _live_activations(self) -> LiveActivations:
        order = None
        if self.cfg.shuffle_sequences:
            # Visited in a seeded order that every rank draws alike and a resume draws again.
            generator = torch.Generator().manual_seed(self.cfg.seed)
            order = torch.randperm(self.train_sequences, generator=generator)
        return LiveActivations(
            self.model,
            self.dataset,
            hookpoints=self.hookpoints,
            owners=self.owners,
            ctx=self.ctx,
            batch_size=self.cfg.batch_size,
            d_in=self.d_in,
            excluded=self.excluded_token_ids,
            gather=self.distributed_layers,
            profiler=self.profiler,
            order=order,
            transcode=self.cfg.sae.transcode,
            d_out=self.d_out,
        )

    def _place_hookpoints(self) -> None:
        """The SAEs this rank trains: all (alone, or data parallel) or its share (--distribute_layers)."""
        cfg = self.cfg
        selection = {"layers": cfg.layers, "layer_stride": cfg.layer_stride, "hookpoints": cfg.hookpoints}
        transcode = cfg.sae.transcode
        if self.cache is not None:
            if transcode:
                raise ConfigError(TRANSCODE_FROM_CACHE)
            if cfg.loss_fn != "fvu":
                raise ConfigError(E2E_FROM_CACHE.format(loss_fn=cfg.loss_fn))
            self.hookpoints, self.d_in = self.cache.select_hookpoints(**selection), self.cache.d_in
        else:
            self.hookpoints = select_hookpoints(self.model, **selection, transcode=transcode)
            self.d_in = hidden_size(self.model)
        # Transcoders: the width of the modules' inputs and outputs; an SAE's output is its input.
        self.d_in, self.d_out = (
            transcoder_widths(self.model, self.hookpoints) if transcode else (self.d_in,) * 2
        )
        self.distributed_layers = cfg.distribute_layers and self.ctx.enabled
        self.ddp = self.ctx.enabled and not self.distributed_layers
        if self.distributed_layers:
            shares = split_layers(self.hookpoints, self.ctx.world_size)
            self.owners = {hookpoint: rank for rank, share in enumerate(shares) for hookpoint in share}
        else:
            self.owners = {hookpoint: self.ctx.rank for hookpoint in self.hookpoints}
        self.local_hookpoints = [
            hookpoint for hookpoint in self.hookpoints if self.owners[hookpoint] == self.ctx.rank
        ]

    def _build_saes(self) -> None:
        """This rank's SAEs, an optimizer for each, and their dead-latent counters."""
        cfg = self.cfg
        sae_dtype = resolve_dtype(cfg.sae_dtype)
        # Every SAE is initialised from a seed of its own, so the result does not depend on which rank owns
        # it.
        self.saes: dict[str, Sae] = {}
        for hookpoint in self.local_hookpoints:
            torch.manual_seed(cfg.seed + hookpoint_seed(hookpoint))
            if self.shards:
                sae = ShardedSae.create(
                    self.d_in, cfg.sae, self.shards, self.ctx.device, sae_dtype, hookpoint=hookpoint
                )
            else:
                sae = Sae(
                    self.d_in, cfg.sae, self.ctx.device, sae_dtype, hookpoint=hookpoint, d_out=self.d_out
                )
            self.saes[hookpoint] = sae
        self.num_latents = cfg.sae.latents_for(self.d_in)
        self.lr = cfg.lr or default_lr(cfg.optimizer, self.num_latents)
        # One optimizer per SAE: each SAE is updated (and its gradients freed) as soon as its last backward of
        # the step is done, while the other SAEs may still be accumulating theirs.
        self.optimizers = {
            hookpoint: SaeOptimizer(cfg.optimizer, sae, self.lr) for hookpoint, sae in self.saes.items()
        }
        self.compute_dtype = encoder_compute_dtype(cfg.autocast, self.ctx.device)
        # On the SAEs' device, so that the step never waits on a copy; `any_dead` mirrors on the host whether
        # any latent is dead (read with the step's one transfer, _optimizer_step): whether AuxK runs.
        self.tokens_since_fired = {
            hookpoint: torch.zeros(self.num_latents, dtype=torch.long, device=self.ctx.device)
            for hookpoint in self.local_hookpoints
        }
        self.any_dead = {hookpoint: False for hookpoint in self.local_hookpoints}
        # FVU of each SAE's last update: the residual's variance in units of the input's, AuxK's denominator.
        self.last_fvu = {hookpoint: 1.0 for hookpoint in self.local_hookpoints}

    def _step_budget(self) -> tuple[int, int]:
        """(tokens per sequence, optimizer steps of the run): one pass over the data, or max_tokens' worth."""
        cfg = self.cfg
        n_seq, seq_len = self.cache.sequence_shape() if self.cache else sequence_shape(self.dataset)
        if n_seq == 0:
            raise ConfigError("the dataset is empty")
        per_batch = cfg.batch_size * self.ctx.world_size
        n_batches = n_seq // per_batch
        if cfg.max_tokens is not None:
            n_batches = min(n_batches, math.ceil(cfg.max_tokens / (per_batch * seq_len)))
        total_steps = n_batches // cfg.grad_acc_steps
        if total_steps == 0:
            raise ConfigError(
                f"dataset too small for one optimizer step: it has {n_seq} sequences of {seq_len} tokens, "
                "one step needs batch_size x world_size x grad_acc_steps = "
                f"{per_batch * cfg.grad_acc_steps}; use more data or a smaller batch"
            )
        return seq_len, total_steps

    # ------------------------------------------------------------------ the loop
    def fit(self, max_steps: int | None = None) -> dict[str, float]:
        """Train to the end of the data (or max_tokens), saving every `save_every` steps and at the end.

        `max_steps` stops earlier (after a checkpoint), e.g. to continue later with `resume=True`.
        Returns the last step's metrics.
        """
        stop_at = self.total_steps if max_steps is None else min(max_steps, self.total_steps)
        progress = self._progress()
        started, wall_time_at_start = time.perf_counter(), self.wall_time
        metrics: dict[str, float] = {}
        while self.step < stop_at:
            done = self._train_step()
            metrics = done.metrics
            self.step += 1
            self.tokens_seen += done.tokens
            self.wall_time = wall_time_at_start + time.perf_counter() - started
            if self.ctx.is_main:
                progress.update(self.step, self.tokens_seen, metrics)
            if self.step % self.cfg.save_every == 0 or self.step == stop_at:
                self.save()
        progress.close()
        self.finish()
        return metrics

    def finish(self) -> None:
        """At the end of the run, self.saes take the weights that were saved (schedule-free Adam trains on
        other weights than it saves); before it, nothing changes."""
        if self.step == self.total_steps:
            for optimizer in self.optimizers.values():
                optimizer.keep_averaged_weights()

    def _progress(self) -> Progress:
        """The main rank writes metrics.jsonl, wandb/TensorBoard when asked, and the extra loggers."""
        loggers = []
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config = self.run_info.get("config", self.cfg.to_dict())
            loggers = run_loggers(self.cfg, self.run_dir, config) + self.extra_loggers
        show_bar = self.ctx.is_main and self.progress
        return Progress(loggers, self.cfg, self.total_steps, self.step, self.tokens_seen, show_bar)

    # ------------------------------------------------------------------ one training step
    def _train_step(self) -> TrainStep:
        """One optimizer step of every SAE over grad_acc_steps batches; every rank gets the step's metrics.
        --tf32 holds within it only (CUDA; sweeps call it too), the process's setting before and after."""
        with tf32_matmuls(self.cfg.tf32, self.ctx.device):
            return self._step_every_sae()

    def _step_every_sae(self) -> TrainStep:
        cfg = self.cfg
        local_hookpoints = self.local_hookpoints
        variance = {hookpoint: PooledVariance() for hookpoint in local_hookpoints}
        # Accumulated on the device (no host synchronisation per batch): how often each latent fired, and the
        # sums of the losses in float64 (as the Python floats they replace).
        device = self.ctx.device
        fired = {h: torch.zeros(self.num_latents, dtype=torch.long, device=device) for h in local_hookpoints}
        sse = {h: torch.zeros((), dtype=torch.float64, device=device) for h in local_hookpoints}
        auxk = {h: torch.zeros((), dtype=torch.float64, device=device) for h in local_hookpoints}
        dead = {
            hookpoint: self.tokens_since_fired[hookpoint] >= self.dead_threshold
            if cfg.auxk_alpha > 0 and self.any_dead[hookpoint]
            else None
            for hookpoint in local_hookpoints
        }
        first_batch = self.step * cfg.grad_acc_steps
        nonfinite = {hookpoint: 0 for hookpoint in local_hookpoints}
        batches = (self.activations.batch(first_batch + offset) for offset in range(cfg.grad_acc_steps))
        if not self.b_dec_initialised:
            # First step only: hold all its batches so b_dec starts at the mean of the whole (global) step.
            batches = list(batches)
            for hookpoint in local_hookpoints:
                self._init_from_first_step(
                    hookpoint,
                    torch.cat([batch.inputs[hookpoint] for batch in batches]),
                    torch.cat(
                        [
                            (batch.inputs if batch.targets is None else batch.targets)[hookpoint]
                            for batch in batches
                        ]
                    ),
                )
            self.b_dec_initialised = True
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.lr, decays(self.cfg.optimizer))
        for optimizer in self.optimizers.values():
            optimizer.set_lr(lr)
        k = decayed_k(
            self.step,
            cfg.k_decay_steps,
            cfg.k_decay_start or min(self.num_latents, 10 * self.d_in),
            cfg.sae.k,
        )
        for sae in self.saes.values():
            sae.k_override = k
        tokens, metrics, skipped = 0, {}, {}
        if self.e2e is not None:
            tokens, metrics, skipped = self._end_to_end_step(
                first_batch, variance, fired, sse, auxk, dead, nonfinite
            )
            batches = ()
        # Multi-TopK is passed only when asked: sharded SAEs (which refuse it) keep their signature.
        loss_options = {"multi_topk": True} if cfg.multi_topk else {}
        for batch_number, batch in enumerate(batches):
            with self.profiler.timed("sae_s"):
                for hookpoint, x in batch.inputs.items():
                    nonfinite[hookpoint] += batch.nonfinite[hookpoint]
                    if self.input_scales[hookpoint] != 1.0:
                        x = x * self.input_scales[hookpoint]
                    # What the SAE reconstructs: x, or a transcoder's module output.
                    y = batch.targets[hookpoint] if batch.targets is not None else x
                    variance[hookpoint].add(y)
                    dead_mask = dead[hookpoint]
                    # An empty batch (every token excluded or non-finite) has nothing to backward.
                    chunks = zip(x.chunk(cfg.micro_acc_steps), y.chunk(cfg.micro_acc_steps))
                    for chunk, target in chunks if x.shape[0] else ():
                        out = self.saes[hookpoint](
                            chunk,
                            dead_mask,
                            target=target,
                            total_variance=1.0,
                            residual_variance=self._auxk_denominator(hookpoint),
                            compute_dtype=self.compute_dtype,
                            **loss_options,
                        )
                        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
                        if out.multi_topk_fvu is not None:  # Gao et al. §5.3: FVU(k) + FVU(4k) / 8
                            loss = loss + out.multi_topk_fvu / 8
                        loss.backward()
                        count_fired(fired[hookpoint], out.latent_indices, out.latent_acts)
                        sse[hookpoint] += out.fvu.detach().double()
                        auxk[hookpoint] += out.auxk_loss.detach().double()
                    if batch_number == cfg.grad_acc_steps - 1:
                        # Update this SAE now and free its gradients before the next layer makes its
                        # own: only one layer's gradients are ever alive (with grad_acc_steps 1),
                        # whatever the layer count.
                        tokens, sae_metrics, skipped[hookpoint], nonfinite[hookpoint] = self._optimizer_step(
                            hookpoint,
                            variance[hookpoint],
                            fired[hookpoint],
                            sse[hookpoint],
                            auxk[hookpoint],
                            nonfinite[hookpoint],
                        )
                        metrics.update(sae_metrics)
        metrics["lr"] = lr
        if cfg.k_decay_steps:
            metrics["k"] = k
        for sae in self.saes.values():
            sae.k_override = None  # outside a step (after fit, in a checkpoint) an SAE encodes with cfg.k
        step = self._merge_ranks(
            TrainStep(
                tokens,
                metrics,
                sum(nonfinite.values()),
                tuple(hookpoint for hookpoint, why in skipped.items() if why == "nonfinite"),
                tuple(hookpoint for hookpoint, why in skipped.items() if why == "empty"),
            )
        )
        totals = self.watch.after_step(
            self.step + 1, step.nonfinite_tokens, step.nonfinite_skips, step.empty_skips
        )
        if self.best is not None:
            self.best.observe(step.metrics)
        return TrainStep(step.tokens, {**step.metrics, **totals})

    def _end_to_end_step(
        self,
        first_batch: int,
        variance: dict[str, PooledVariance],
        fired: dict[str, Tensor],
        sse: dict[str, Tensor],
        auxk: dict[str, Tensor],
        dead: dict[str, Tensor | None],
        nonfinite: dict[str, int],
    ) -> tuple[int, dict[str, float], dict[str, str]]:
        """--loss_fn kl/ce (e2e.py): the spliced forward and backward of every batch of the step, then one
        optimizer step per SAE with the gradient of loss / (loss positions of the step, all ranks) +
        auxk_alpha * AuxK. FVU and AuxK are measured as in the FVU path. Returns (tokens, metrics,
        outcomes)."""
        cfg = self.cfg
        aux_grads = AuxGradients()

        def reconstruct(hookpoint: str, x: Tensor, y: Tensor) -> Tensor:
            variance[hookpoint].add(y.detach())
            if x.shape[0] == 0:
                return y
            nonfinite[hookpoint] += int((~(x.isfinite().all(-1) & y.isfinite().all(-1))).sum())
            scale = self.input_scales[hookpoint]
            dead_mask = dead[hookpoint]
            out = self.saes[hookpoint](
                x * scale,
                dead_mask,
                target=y * scale,
                total_variance=1.0,
                residual_variance=self._auxk_denominator(hookpoint),
                compute_dtype=self.compute_dtype,
            )
            count_fired(fired[hookpoint], out.latent_indices, out.latent_acts)
            sse[hookpoint] += out.fvu.detach().double()
            auxk[hookpoint] += out.auxk_loss.detach().double()
            aux_grads.add(hookpoint, self.saes[hookpoint], cfg.auxk_alpha * out.auxk_loss)
            return out.sae_out / scale

        loss_sum, positions = 0.0, 0
        with self.profiler.timed("lm_forward_s", sync=True):  # the SAEs run inside the LM's forward
            for offset in range(cfg.grad_acc_steps):
                _, ids = self.activations.token_ids(first_batch + offset)
                part, count = self.e2e.batch(ids.to(self.ctx.device), self.excluded_token_ids, reconstruct)
                loss_sum, positions = loss_sum + part, positions + count
        totals = torch.tensor([loss_sum, positions], dtype=torch.float64)
        if self.ddp:
            all_reduce_sum(totals, self.ctx)
        loss_sum, positions = totals.tolist()
        tokens, metrics, skipped = 0, {cfg.loss_fn: loss_sum / max(positions, 1)}, {}
        for hookpoint, sae in self.saes.items():
            # _optimizer_step divides every gradient by the step's variance: the loss's part is pre-scaled
            # so that it ends up divided by the step's loss positions instead.
            _, total_variance = variance[hookpoint].pooled(self.ctx, reduce=self.ddp)
            aux_grads.merge(hookpoint, sae, max(float(total_variance), 1e-30) / max(positions, 1))
            tokens, sae_metrics, skipped[hookpoint], nonfinite[hookpoint] = self._optimizer_step(
                hookpoint,
                variance[hookpoint],
                fired[hookpoint],
                sse[hookpoint],
                auxk[hookpoint],
                nonfinite[hookpoint],
            )
            metrics.update(sae_metrics)
        return tokens, metrics, skipped

    @torch.no_grad()
    def _init_from_first_step(self, hookpoint: str, x: Tensor, y: Tensor) -> None:
        """From the first step's tokens (over all ranks): the input scale (normalize_inputs: mean squared norm
        d_in), and b_dec at their (scaled) mean, so the encoder sees centred inputs. A transcoder (y: the
        module outputs) starts b_dec at the outputs' mean and the encoder bias at -W_enc mean(x), as
        sparsify."""
        xd, yd = x.double(), y.double()
        sums = [yd.sum(0).cpu()] + ([xd.sum(0).cpu()] if self.cfg.sae.transcode else [])
        head = torch.cat([torch.tensor([float(x.shape[0]), xd.pow(2).sum()]), *sums])
        if self.ddp:
            all_reduce_sum(head, self.ctx)
        count, sum_sq, total = head[0].clamp_min(1), head[1], head[2 : 2 + self.d_out]
        if self.cfg.normalize_inputs and sum_sq > 0:
            self.input_scales[hookpoint] = math.sqrt(self.d_in * float(count) / float(sum_sq))
        sae = self.saes[hookpoint]
        sae.b_dec.data.copy_((total / count * self.input_scales[hookpoint]).to(sae.b_dec.dtype))
        if self.cfg.sae.transcode:
            mean_x = (head[2 + self.d_out :] / count).to(sae.encoder.weight)
            sae.encoder.bias.data.copy_(-(sae.encoder.weight.data @ mean_x))

    def _merge_ranks(self, step: TrainStep) -> TrainStep:
        """With --distribute_layers each rank has its own layers' metrics: merge them (everyone gets all)."""
        if not self.distributed_layers:
            return step
        parts = [TrainStep(*part) for part in gather_objects(tuple(step), self.ctx)]
        # Every rank trained on the same tokens (each owner sees the whole global batch of its layers).
        merged: dict[str, float] = {}
        for part in parts:
            merged.update(part.metrics)
        return TrainStep(
            max(part.tokens for part in parts),
            merged,
            sum(part.nonfinite_tokens for part in parts),
            tuple(h for part in parts for h in part.nonfinite_skips),
            tuple(h for part in parts for h in part.empty_skips),
        )

    # ------------------------------------------------------------------ one optimizer step per SAE
    def _optimizer_step(
        self,
        hookpoint: str,
        variance: PooledVariance,
        fired: Tensor,
        sse: Tensor,
        auxk: Tensor,
        nonfinite: int,
    ) -> tuple[int, dict[str, float], str, int]:
        """Normalise, sum across ranks and apply one SAE's gradient of the step.

        Returns (step tokens, metrics, outcome, non-finite rows dropped on all ranks). The outcome is
        "stepped", or "nonfinite" / "empty" when the update was skipped (weights, Adam state and dead
        counters untouched). `fired` counts how often each latent fired; `sse` and `auxk` are the step's loss
        sums (float64 on the device). Whether to skip is the step's one host synchronisation for this SAE:
        everything the host needs (token count, finiteness, metrics, dead counts after either outcome) is
        computed on the device first and read in one transfer.
        """
        sae = self.saes[hookpoint]
        n_tokens, total_variance = variance.pooled(self.ctx, reduce=self.ddp)
        for p in sae.parameters():
            if p.grad is None:  # every batch of this rank was empty: it adds nothing to the sum
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in sae.parameters()]
        nonfinite_rows = sse.new_full((), float(nonfinite))
        if self.ddp:
            flat = torch.cat([g.reshape(-1) for g in grads])
            all_reduce_sum(flat, self.ctx)
            fired = all_reduce_sum(fired, self.ctx)
            sse, auxk, nonfinite_rows = all_reduce_sum(torch.stack([sse, auxk, nonfinite_rows]), self.ctx)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            del flat
        scale = 1.0 / total_variance.clamp_min(1e-30)
        for g in grads:
            g.mul_(scale)
        # A NaN/Inf on any rank survives the sums above, so every rank decides on the same numbers and
        # skips together without a collective of its own (with --distribute_layers the owner decides alone).
        finite = torch.stack([sse.isfinite(), auxk.isfinite(), *(g.isfinite().all() for g in grads)]).all()
        counters, fired = self.tokens_since_fired[hookpoint], fired > 0
        stepped_counters = (counters + n_tokens.long()).masked_fill_(fired, 0)
        dead_if_stepped = (stepped_counters >= self.dead_threshold).float().mean()
        dead_if_skipped = (counters >= self.dead_threshold).float().mean()
        report = (
            n_tokens,
            finite,
            sse * scale,
            auxk * scale,
            nonfinite_rows,
            dead_if_stepped,
            dead_if_skipped,
        )
        report = torch.stack([value.double() for value in report]).tolist()  # the host synchronisation
        n_tokens, finite, fvu, auxk_loss, nonfinite, dead_if_stepped, dead_if_skipped = report
        n_tokens, finite, nonfinite = int(n_tokens), bool(finite), int(nonfinite)
        metrics = {f"fvu/{hookpoint}": fvu, f"auxk/{hookpoint}": auxk_loss}
        if self.shards is not None:  # each shard checked its own rows: skip together
            finite = all_shards_agree(finite, self.shards)
        if n_tokens == 0 or not finite:
            sae.zero_grad(set_to_none=True)
            metrics[f"dead_pct/{hookpoint}"] = 100.0 * dead_if_skipped
            return n_tokens, metrics, "empty" if finite else "nonfinite", nonfinite
        if self.step == 0 and sae.cfg.transcode and not self.cfg.finetune:
            # b_dec was just set to this step's mean output, where a transcoder (W_dec = 0) has a gradient of
            # 0 up to rounding; Adam would turn that rounding into a full step whose sign depends on the
            # order of the sums (rank count, accumulation).
            sae.b_dec.grad.zero_()
        fused = fused_decoder_kernels(sae, self.optimizers[hookpoint])  # --kernels triton (fused_optim.py)
        if fused is not None:  # the decoder's radial removal, update and renormalisation in one pass
            step_with_fused_decoder(self.optimizers[hookpoint], sae.W_dec, fused)
        else:
            if sae.unit_norm_decoder:
                sae.remove_gradient_parallel_to_decoder_directions()
            self.optimizers[hookpoint].step()
        self.optimizers[hookpoint].zero_grad()
        if sae.unit_norm_decoder and fused is None:
            sae.set_decoder_norm_to_unit_norm()
        counters.copy_(stepped_counters)
        self.any_dead[hookpoint] = dead_if_stepped > 0
        self.last_fvu[hookpoint] = fvu
        metrics[f"dead_pct/{hookpoint}"] = 100.0 * dead_if_stepped
        return n_tokens, metrics, "stepped", nonfinite

    def _auxk_denominator(self, hookpoint: str) -> float:
        """AuxK's error is normalised by the variance of the residual it predicts (Gao et al.), estimated by
        the previous update's FVU: a constant of the step, so accumulation and ranks still add up exactly."""
        return max(self.last_fvu[hookpoint], 1e-6)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Write the SAE folders, this rank's trainer state and run.json; every rank reaches the same
        barriers."""
        # Sharded: every shard of the first replica writes its state and joins the gather of its SAEs.
        writes_state = self.distributed_layers or self.ctx.is_main or (self.shards and self.ctx.rank == 0)
        refuse_nonfinite_weights(self.saes, self.ctx, self.distributed_layers, self.step, self.run_dir)
        if writes_state:
            try:
                self._write_checkpoint()
            except OSError as e:
                # Disk full, quota, permissions: every write is atomic, so what was saved before is intact.
                raise CheckpointError(
                    f"cannot write the checkpoint of step {self.step} to {self.run_dir}: {e.strerror or e}; "
                    "the previous checkpoint is intact (free space, then resume with --resume)"
                ) from None
        barrier(self.ctx)
        if writes_state:
            ckpt.prune_states(self.run_dir, self._state_rank, self.step)
            if self._state_rank == 0 and not self.distributed_layers:  # a resharded run: the old layout's
                prune_other_layouts(self.run_dir, self.shards.shards if self.shards else 1, self.step)
        profile = self.profiler.run_info(self.ctx)  # with cfg.profile a collective: every rank joins
        scales = (
            gather_objects(self.input_scales, self.ctx) if self.distributed_layers else [self.input_scales]
        )
        if self.ctx.is_main:
            self._write_run_info(profile, {h: s for part in scales for h, s in part.items()})
        barrier(self.ctx)

    def _write_checkpoint(self) -> None:
        # The SAE folders get the weights to use (schedule-free: the average), the trainer state the ones
        # training continues from.
        with contextlib.ExitStack() as averaged:
            for optimizer in self.optimizers.values():
                averaged.enter_context(optimizer.averaged_weights())
            for hookpoint, sae in self.saes.items():
                sae.save_to_disk(self.run_dir / hookpoint, input_scale=self.input_scales[hookpoint])
            if self.best is not None:
                self.best.save(self.saes, self.run_dir, self.step, self.input_scales)
        state = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "wall_time": self.wall_time,
            "world_size": self.ctx.world_size,
            "distribute_layers": self.distributed_layers,
            "hookpoints": list(self.local_hookpoints),
            "config": json.dumps(self._config_for_state(), sort_keys=True),
            "saes": {hookpoint: sae.state_dict() for hookpoint, sae in self.saes.items()},
            "optimizers": {hookpoint: opt.state_dict() for hookpoint, opt in self.optimizers.items()},
            "tokens_since_fired": {hookpoint: c.cpu() for hookpoint, c in self.tokens_since_fired.items()},
            "dead_threshold": self.dead_threshold,
            "last_fvu": dict(self.last_fvu),
            "b_dec_initialised": self.b_dec_initialised,
            **self.watch.state_dict(),
            "input_scales": dict(self.input_scales),
            **(self.best.state_dict() if self.best is not None else {}),
        }
        ckpt.save_state(self.run_dir, self._state_rank, self.step, state)

    @property
    def _state_rank(self) -> int:
        """Which trainer-state file this rank writes and reads: its shard with --shard_latents."""
        return self.shards.shard_rank if self.shards is not None else self.ctx.rank

    def _write_run_info(self, profile: dict[str, Any], input_scales: dict[str, float]) -> None:
        cfg = self.cfg
        info = {
            **self.run_info,
            "hookpoints": self.hookpoints,
            "tokens": self.tokens_seen,
            "steps": self.step,
            "total_steps": self.total_steps,
            "train_sequences": self.train_sequences,
            "seq_len": self.seq_len,
            "wall_time_s": round(self.wall_time, 3),
            "world_size": self.ctx.world_size,
            "distribute_layers": self.distributed_layers,
            "input_scales": input_scales,  # what activations were multiplied by in training (1: raw)
            "dead_threshold": self.dead_threshold,  # tokens without firing that made a latent dead
            # The encoder product's dtype (the `autocast` setting resolved on this device).
            "compute_dtype": str(self.compute_dtype or resolve_dtype(cfg.sae_dtype)).removeprefix("torch."),
            "learning_rate": {
                "optimizer": cfg.optimizer,
                "peak": self.lr,
                # What the schedule actually reached: below `peak` when the run stopped during warm-up. The
                # schedule rises until step max(warmup, 1) - 1 and only falls after, so that step (or the last
                # one taken, if earlier) holds the maximum.
                "peak_reached": (
                    lr_at(
                        min(self.step, max(self.warmup_steps, 1)) - 1,
                        self.total_steps,
                        self.warmup_steps,
                        self.lr,
                        decays(cfg.optimizer),
                    )
                    if self.step
                    else 0.0
                ),
                "warmup_steps": self.warmup_steps,
            },
            **profile,
        }
        info.setdefault("config", self.cfg.to_dict())  # to_dict never holds secrets
        info["sae_core_version"] = __version__
        atomic_write_json(self.run_dir / "run.json", info)

    def _config_for_state(self) -> dict[str, Any]:
        return ckpt.resumable_config(self.cfg.to_dict())

    def _resume_or_refuse(self, resume: bool) -> None:
        """With `resume`, continue from the newest checkpoint every writing rank completed; without it, refuse
        to start over a run folder that holds one (nothing is ever overwritten)."""
        if not resume:
            if ckpt.has_state(self.run_dir):
                raise ConfigError(
                    f"{self.run_dir} already holds a checkpoint; pass --resume to continue it, "
                    "or choose another --run_name / --save_dir (nothing was overwritten)"
                )
            return
        if not ckpt.has_state(self.run_dir):
            raise ConfigError(f"nothing to resume: {self.run_dir / ckpt.STATE_DIR} holds no trainer state")
        if self.distributed_layers:
            step = ckpt.latest_complete_step(self.run_dir, self.ctx.world_size)
            if step is None:
                raise ConfigError(
                    f"{self.run_dir}: the trainer states there were written by a different number of "
                    "ranks or mode; resume with the same world size, --distribute_layers and "
                    "--shard_latents settings as the original run"
                )
            path = ckpt.state_path(self.run_dir, self._state_rank, step)
            state = ckpt.load_state(path)
        else:
            # This shard's state (one process and data parallel: the whole SAEs', shard 0 of 1), cut from
            # the saved shards' states when the run was saved with another --shard_latents.
            names = [name for name, _ in next(iter(self.saes.values())).named_parameters()]
            layout = self.shards or ShardLayout()
            path, state = read_shard_state(self.run_dir, layout, self.ctx.world_size, names)
        ckpt.check_resumable(
            path,
            state,
            self._config_for_state(),
            self.ctx.world_size,
            self.distributed_layers,
            self.local_hookpoints,
            defaults=ckpt.resumable_config(type(self.cfg)().to_dict()),
        )
        for hookpoint in self.local_hookpoints:
            self.saes[hookpoint].load_state_dict(state["saes"][hookpoint])
            self.optimizers[hookpoint].load_state_dict(state["optimizers"][hookpoint])
            counters = state["tokens_since_fired"][hookpoint].to(self.ctx.device, copy=True)
            self.tokens_since_fired[hookpoint] = counters
            self.any_dead[hookpoint] = bool((counters >= self.dead_threshold).any())
            # absent in states written before AuxK used it: 1.0 is the input-normalised AuxK they trained with
            self.last_fvu[hookpoint] = state.get("last_fvu", {}).get(hookpoint, 1.0)
        self.step = state["step"]
        self.tokens_seen = state["tokens"]
        self.wall_time = state.get("wall_time", 0.0)
        self.b_dec_initialised = state["b_dec_initialised"]
        self.watch.load_state_dict(state)
        self.input_scales.update(state.get("input_scales", {}))  # absent in states written before the option
        if self.best is not None:
            self.best.load_state_dict(state)
