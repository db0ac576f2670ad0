"""What an SAE is (`SaeConfig`), how it is trained (`TrainConfig`) and what a run reads (`RunConfig`).

Every field is `name: type = default` with a one-line docstring under it: `python -m sae_core --help` is built
from those docstrings. Values are validated at construction, so a typo fails before a model is loaded.
"""

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from .errors import ConfigError

OptimizerName = Literal["adam", "schedule_free_adam", "signum", "muon"]
# Compute dtypes of the SAE encoder (`autocast`); None, the value of configs saved before "auto", is exact.
AUTOCAST_CHOICES = ("auto", "bfloat16", "float16", "float32")
# Implementations of the sparse parts of the step (`kernels`): sae_core/kernels.py or triton_kernels.py.
KERNEL_CHOICES = ("auto", "torch", "triton")

# An activation cache holds each module's output only, not the input a transcoder encodes.
TRANSCODE_FROM_CACHE = (
    "--transcode cannot train from --activations: the cache holds module outputs, not the module inputs a "
    "transcoder encodes; train it live (without --activations)"
)

# Training objectives (`loss_fn`): FVU of each hookpoint, or end to end through the LM (sae_core/e2e.py).
LOSS_FNS = ("fvu", "kl", "ce")

# End-to-end losses run the LM with the SAEs spliced in: a cache has no LM to run.
E2E_FROM_CACHE = (
    "--loss_fn {loss_fn} cannot train from --activations: the loss runs the LM with the SAEs spliced in, "
    "and a cache has no LM; train live (without --activations) or use --loss_fn fvu"
)

# Fields that are never serialised: not into run.json, trainer states, logs, cards or the pipeline's records.
SECRET_FIELDS = frozenset({"hf_token"})


@dataclass(kw_only=True)
class SaeConfig:
    """Shape and sparsity of one TopK sparse autoencoder.

    Keyword arguments only: the seed README's `SaeConfig(hidden_size)` silently made a hidden_size-times-wide
    SAE. The input width d_in is read from the model, not given here.
    """

    expansion_factor: int = 32
    """Number of latents as a multiple of the input width d_in."""

    normalize_decoder: bool = True
    """Keep decoder rows at unit norm during training."""

    num_latents: int = 0
    """Number of latents; when non-zero it wins over expansion_factor."""

    k: int = 32
    """Number of latents kept active per token (the TopK)."""

    transcode: bool = False
    """Train transcoders: encode each hooked module's input and predict its output (e.g. layers.*.mlp)."""

    skip_connection: bool = False
    """Add a learned linear skip connection from input to output (W_skip, zero at the start)."""

    kernels: str = "auto"  # auto is torch everywhere until GPU measurements justify triton (issue 17)
    """Sparse top-k, decode and backward: torch, triton (fused Triton kernels, CUDA only) or auto (torch)."""

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if self.num_latents < 0:
            raise ConfigError(
                f"num_latents must be >= 0 (0 means expansion_factor * d_in), got {self.num_latents}"
            )
        if self.num_latents == 0 and self.expansion_factor <= 0:
            raise ConfigError(f"expansion_factor must be a positive integer, got {self.expansion_factor}")
        if self.k <= 0:
            raise ConfigError(f"k must be a positive integer (latents active per token), got {self.k}")
        if self.num_latents and self.k > self.num_latents:
            raise ConfigError(f"k={self.k} exceeds num_latents={self.num_latents}; choose k <= num_latents")

    def latents_for(self, d_in: int) -> int:
        """Number of latents for an input of width `d_in`, checking that k fits."""
        m = self.num_latents or self.expansion_factor * d_in
        if self.k > m:
            raise ConfigError(f"k={self.k} exceeds the {m} latents of an SAE on d_in={d_in}; lower k")
        return m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SaeConfig":
        """Build from a cfg.json dict, ignoring keys that are not SaeConfig fields (d_in, hookpoint, ...)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(kw_only=True)
class TrainConfig:
    """How SAEs are trained on one model: which layers, how many tokens per step, when to save."""

    # The one positional argument, as in the seed README: TrainConfig(SaeConfig(k=32), batch_size=8).
    sae: SaeConfig = field(default_factory=SaeConfig, kw_only=False)
    """The SAE configuration (its fields are flags too)."""

    batch_size: int = 8
    """Sequences per batch on each rank (the global batch is batch_size x world size)."""

    grad_acc_steps: int = 1
    """Batches whose gradients are accumulated into one optimizer step."""

    micro_acc_steps: int = 1
    """Chunks each batch's tokens are split into before the SAE, to save memory."""

    optimizer: OptimizerName = "schedule_free_adam"
    """adam, schedule_free_adam (iterates averaged, no decay), signum (sign descent with momentum) or muon
    (orthogonalised updates); see sae_core/optim.py."""

    lr: float | None = None
    """Peak learning rate; default per optimizer: adam 3.2e-3, signum 5e-3 (both times
    sqrt(2**14 / num_latents), at most 1e-2), muon 2e-3."""

    lr_warmup_steps: int = 1000
    """Optimizer steps of linear warm-up, at most a tenth of the run's steps; the LR then decays linearly
    to 0."""

    normalize_inputs: bool = False
    """Scale each hookpoint's activations to a mean squared norm of d_in (Gao et al.), measured on the first
    step, so one learning rate suits every layer; saved SAEs still take raw activations (scale folded in)."""

    loss_fn: str = "fvu"
    """fvu (each SAE reconstructs its hookpoint), or kl / ce: every SAE's reconstruction replaces its module's
    output, the rest of the LM runs and the loss is the KL to the clean next-token distribution or the LM's
    cross-entropy (end to end; a full LM forward and backward per batch)."""

    multi_topk: bool = False
    """Add the Multi-TopK loss of Gao et al.: the FVU of the top 4k latents' reconstruction, divided by 8."""

    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (0 turns it off)."""

    dead_feature_threshold: int = 10_000_000
    """A latent is dead (AuxK trains it) after this many tokens without firing (at most a tenth of a run)."""

    hookpoints: list[str] = field(default_factory=list)
    """Block outputs or module paths in the decoder stack, globs allowed: 'layers.*', 'layers.*.mlp'."""

    layers: list[int] = field(default_factory=list)
    """Layer indices to train SAEs on (default: all)."""

    layer_stride: int = 1
    """Train on every layer_stride-th layer (ignored when layers is given)."""

    distribute_layers: bool = False
    """Under torchrun, place each layer's SAE on one rank instead of all."""

    shard_latents: int = 1
    """Under torchrun, split each SAE's latents over this many ranks (tensor parallel, for SAEs too wide for
    one device); the world size must be a multiple of it, each group of that many ranks sharing batches."""

    exclude_tokens: list[int] | None = None
    """Token ids never fed to the SAEs; default: the tokenizer's BOS id, and pad's when it is not EOS."""

    # Off by default: at 60k tokens on the embedded model it changed held-out FVU by -0.006 (layer 6) and
    # +0.048 (layer 18) with Adam at lr 6e-3, one seed each (benchmarks/RESULTS.md): not yet shown to help.
    shuffle_sequences: bool = False
    """Visit the training sequences in a random order (seeded by --seed): a batch then mixes documents from
    the whole training set instead of a few neighbouring ones. Evaluation's held-out tail is unchanged."""

    cache_shuffle_shards: int = 4
    """Training from an activation cache: rows are shuffled across windows of this many shards, the shards
    taken in a seeded random order (--seed); 0 reads the cache in its written order."""

    k_decay_steps: int = 0
    """Optimizer steps over which k falls linearly from k_decay_start to k, as in sparsify (0: no decay)."""

    k_decay_start: int | None = None
    """The k of step 0 under k_decay_steps; default min(latents, 10 x d_in), as in sparsify."""

    finetune: str | None = None
    """Start from these SAEs instead of fresh ones: a run folder, a folder of hookpoint folders or a Hub repo
    with an SAE of the same shape for every hookpoint trained."""

    max_tokens: int | None = None
    """Stop after this many tokens (default: one pass over the dataset)."""

    save_every: int = 1000
    """Save a checkpoint every this many optimizer steps (and at the end)."""

    save_best: bool = False
    """At each checkpoint also keep every SAE whose running FVU (mean since the last checkpoint) is its best
    so far, in run_dir/best/<hookpoint>/."""

    save_dir: str = "checkpoints"
    """Folder under which the run folder is created."""

    run_name: str | None = None
    """Name of the run folder (default: a name derived from model and time)."""

    log_every: int = 10
    """Write a metrics line every this many optimizer steps."""

    log_to_wandb: bool = False
    """Also log metrics to Weights & Biases (when installed)."""

    log_to_tensorboard: bool = False
    """Also log metrics to TensorBoard (when installed)."""

    seed: int = 42
    """Random seed for SAE initialisation."""

    sae_dtype: str = "float32"
    """Parameter dtype of the SAEs: float32 or float64 (for half-precision compute use --autocast)."""

    autocast: str | None = "auto"
    """Compute dtype of the SAE encoder product: auto (bfloat16 on GPUs that have it, float32 elsewhere),
    bfloat16, float16, or float32 (exact)."""

    tf32: bool = False
    """TF32 tensor-core matmuls for the float32 products of training on CUDA (sparsify's default); off keeps
    float32 exact (README, GPU speed); no effect on CPUs."""

    profile: bool = False
    """Record where time and memory go in run.json (syncs the GPU every batch; for benchmarks)."""

    def __post_init__(self) -> None:
        if isinstance(self.sae, dict):
            self.sae = SaeConfig.from_dict(self.sae)
        for name in (
            "batch_size",
            "grad_acc_steps",
            "micro_acc_steps",
            "layer_stride",
            "save_every",
            "log_every",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.optimizer not in get_args(OptimizerName):
            raise ConfigError(
                f"optimizer must be one of {', '.join(get_args(OptimizerName))}, got {self.optimizer!r}"
            )
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.loss_fn not in LOSS_FNS:
            raise ConfigError(f"loss_fn must be one of {', '.join(LOSS_FNS)}, got {self.loss_fn!r}")
        if self.loss_fn != "fvu":
            self._check_end_to_end()
        if self.multi_topk and self.shard_latents > 1:
            raise ConfigError("--multi_topk is not supported with --shard_latents; train those SAEs whole")
        if self.auxk_alpha < 0:
            raise ConfigError(f"auxk_alpha must be >= 0, got {self.auxk_alpha}")
        if self.dead_feature_threshold <= 0:
            raise ConfigError(f"dead_feature_threshold must be positive, got {self.dead_feature_threshold}")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.cache_shuffle_shards < 0:
            raise ConfigError(f"cache_shuffle_shards must be >= 0, got {self.cache_shuffle_shards}")
        if self.k_decay_steps < 0:
            raise ConfigError(f"k_decay_steps must be >= 0, got {self.k_decay_steps}")
        if self.k_decay_start is not None and self.k_decay_start < self.sae.k:
            raise ConfigError(
                f"k_decay_start={self.k_decay_start} is below k={self.sae.k}: k decays from a larger start"
            )
        if self.sae.transcode and self.normalize_inputs:
            # The input and output scales would both have to be folded into the saved transcoder.
            raise ConfigError("--normalize_inputs is not supported with --transcode; drop one of them")
        if self.finetune and self.normalize_inputs:
            # The SAEs to start from take raw activations (their scale was folded into their biases).
            raise ConfigError("--normalize_inputs is not supported with --finetune; drop one of them")
        if any(i < 0 for i in self.layers):
            raise ConfigError(f"layers must be non-negative layer indices, got {self.layers}")
        if self.sae_dtype in ("bfloat16", "float16"):
            # Half-precision weights lose Adam's small updates (and the CPU backward has no half kernels):
            # keep fp32 weights and compute in half precision with autocast instead.
            raise ConfigError(
                f"sae_dtype={self.sae_dtype} is not supported: half-precision weights lose small updates; "
                f"keep sae_dtype float32 and pass --autocast {self.sae_dtype} for half-precision compute"
            )
        if self.sae_dtype not in ("float32", "float64"):
            raise ConfigError(f"sae_dtype must be float32 or float64, got {self.sae_dtype!r}")
        if self.autocast not in (None, *AUTOCAST_CHOICES):
            raise ConfigError(f"autocast must be one of {', '.join(AUTOCAST_CHOICES)}, got {self.autocast!r}")
        if self.shard_latents < 1:
            raise ConfigError(f"shard_latents must be a positive integer, got {self.shard_latents}")
        if self.shard_latents > 1 and self.distribute_layers:
            raise ConfigError(
                "--shard_latents and --distribute_layers cannot be combined; choose one "
                "(--shard_latents for SAEs too wide for one device, --distribute_layers for many layers)"
            )
        if self.shard_latents > 1 and (self.sae.transcode or self.sae.skip_connection or self.finetune):
            raise ConfigError(
                "--shard_latents is not supported with --transcode, --skip_connection or --finetune yet; "
                "train those SAEs whole (data parallel or --distribute_layers)"
            )
        if self.shard_latents > 1 and self.sae.kernels == "triton":
            raise ConfigError("--shard_latents runs the torch kernels only; drop --kernels triton")
        if self.shard_latents > 1 and self.optimizer == "muon":
            raise ConfigError(
                "--shard_latents does not support --optimizer muon (it orthogonalises whole matrices); "
                "use adam or signum"
            )

    def _check_end_to_end(self) -> None:
        """What --loss_fn kl/ce cannot be combined with: one forward splices every SAE at once."""
        what = f"--loss_fn {self.loss_fn}"
        if self.distribute_layers:
            raise ConfigError(
                f"{what} cannot be combined with --distribute_layers: one spliced forward needs every SAE on "
                "the rank that runs it; train data parallel (without --distribute_layers)"
            )
        if self.shard_latents > 1:
            raise ConfigError(f"{what} is not supported with --shard_latents; train the SAEs whole")
        if self.multi_topk:
            raise ConfigError(f"--multi_topk is a reconstruction loss: use it with --loss_fn fvu, not {what}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, nested SaeConfig included, except the secrets (SECRET_FIELDS)."""
        return {k: v for k, v in asdict(self).items() if k not in SECRET_FIELDS}


@dataclass(kw_only=True)
class RunConfig(TrainConfig):
    """TrainConfig plus where the model and the data come from: what `python -m sae_core` runs."""

    model: str | None = None
    """Hub id or local folder of a causal LM; default: the embedded SmolLM2-135M."""

    dataset: str | None = None
    """Hub id, local file/folder, or saved (tokenized) dataset; default: the embedded corpus."""

    split: str = "train"
    """Dataset split."""

    text_column: str = "text"
    """Column holding the text."""

    data_args: str = ""
    """Extra load_dataset arguments as key=value,key=value (e.g. name=wikitext-2-raw-v1)."""

    ctx_len: int = 2048
    """Tokens per training sequence."""

    max_examples: int | None = None
    """Use at most this many documents of the dataset."""

    shuffle_seed: int | None = 42
    """Shuffle documents with this seed before tokenizing (None: keep order)."""

    data_preprocessing_num_proc: int | None = None
    """Processes for tokenization (default: half the cores)."""

    hf_token: str | None = None
    """Hugging Face token (default: HF_TOKEN); never logged or saved."""

    revision: str | None = None
    """Model revision (branch, tag or commit)."""

    dtype: str = "float32"
    """Dtype of the language model: float32, bfloat16, float16."""

    attn_implementation: str | None = None
    """Attention implementation passed to transformers (e.g. eager, sdpa)."""

    load_in_8bit: bool = False
    """Load the language model in 8 bit with bitsandbytes (works on CPU too)."""

    trust_remote_code: bool = False
    """Allow model code from the Hub to run (off unless asked)."""

    device: str | None = None
    """cpu or cuda (default: cuda when available)."""

    backend: str | None = None
    """torch.distributed backend (default: nccl on GPU, gloo on CPU)."""

    resume: bool = False
    """Continue the run in save_dir/run_name from its newest checkpoint."""

    activations: str | None = None
    """Train from this activation cache folder (written by python -m sae_core.cache) instead of running the
    LM; model and data settings are read from its manifest."""

    sweep: list[str] = field(default_factory=list)
    """Train every combination of these settings in one pass, e.g. k=16,32 expansion_factor=8,16; each
    variant is saved under run_name/<variant>/."""

    init_seeds: list[int] = field(default_factory=list)
    """Also sweep the SAE initialisation seed over these values (one variant each)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ctx_len < 2:
            raise ConfigError(f"ctx_len must be at least 2, got {self.ctx_len}")
        if self.activations is not None and self.sae.transcode:
            raise ConfigError(TRANSCODE_FROM_CACHE)
        if self.loss_fn != "fvu" and self.activations is not None:
            raise ConfigError(E2E_FROM_CACHE.format(loss_fn=self.loss_fn))
        if self.loss_fn != "fvu" and (self.sweep or self.init_seeds):
            raise ConfigError(
                f"--loss_fn {self.loss_fn} cannot be combined with --sweep or --init_seeds (a sweep shares "
                "one forward between its variants, end-to-end training needs one per variant); run each alone"
            )
