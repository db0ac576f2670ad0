"""Command line: `python -m sae_core [MODEL] [DATASET] [--flags]`, or `torchrun ... -m sae_core ...`.

Every field of SaeConfig, TrainConfig and RunConfig is a flag, with its help text. With no MODEL the
embedded SmolLM2-135M is trained on the embedded Python-documentation corpus, with a small demo budget.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import types
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any

from .config import ConfigError, SaeConfig, TrainConfig, opt
from .utils import first_line, release_free_memory


@dataclass
class RunConfig(TrainConfig):
    """TrainConfig plus where the model and the data come from."""

    model: str | None = opt(None, "Hub id or local folder of a causal LM; default: the embedded SmolLM2-135M.")
    dataset: str | None = opt(
        None, "Hub id, local file/folder, or saved (tokenized) dataset; default: the embedded corpus."
    )
    split: str = opt("train", "Dataset split.")
    text_column: str = opt("text", "Column holding the text.")
    data_args: str = opt("", "Extra load_dataset arguments as key=value,key=value (e.g. name=wikitext-2-raw-v1).")
    ctx_len: int = opt(2048, "Tokens per training sequence.")
    max_examples: int | None = opt(None, "Use at most this many documents of the dataset.")
    shuffle_seed: int | None = opt(42, "Shuffle documents with this seed before tokenizing (None: keep order).")
    data_preprocessing_num_proc: int | None = opt(None, "Processes for tokenization (default: half the cores).")
    hf_token: str | None = opt(None, "Hugging Face token (default: HF_TOKEN); never logged or saved.")
    revision: str | None = opt(None, "Model revision (branch, tag or commit).")
    dtype: str = opt("float32", "Dtype of the language model: float32, bfloat16, float16.")
    attn_implementation: str | None = opt(None, "Attention implementation passed to transformers (e.g. eager, sdpa).")
    load_in_8bit: bool = opt(False, "Load the language model in 8 bit with bitsandbytes (works on CPU too).")
    trust_remote_code: bool = opt(False, "Allow model code from the Hub to run (off unless asked).")
    device: str | None = opt(None, "cpu or cuda (default: cuda when available).")
    backend: str | None = opt(None, "torch.distributed backend (default: nccl on GPU, gloo on CPU).")
    resume: bool = opt(False, "Continue the run in save_dir/run_name from its newest checkpoint.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ctx_len < 2:
            raise ConfigError(f"ctx_len must be at least 2, got {self.ctx_len}")

    def public_dict(self) -> dict[str, Any]:
        """The config as saved and logged: without secrets."""
        d = self.to_dict()
        d.pop("hf_token", None)
        return d


# Used when no MODEL is given: a run that finishes in minutes on a laptop CPU. Explicit flags still win.
DEMO_DEFAULTS = {
    "ctx_len": 256,
    "batch_size": 8,
    "layer_stride": 8,
    "expansion_factor": 16,
    "max_tokens": 120_000,
    "lr_warmup_steps": 5,
    # Gao et al.'s default LR suits runs of millions of tokens; for 60 steps a larger one reaches a far lower
    # FVU (measured on layers.8: 0.56 at the default 2.7e-4, 0.19 at 2e-3).
    "lr": 2e-3,
    "save_every": 20,
    "run_name": "smollm2-135m-demo",
}

_SAE_FIELDS = {f.name for f in fields(SaeConfig)}


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_optional(inner):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else inner(text)

    parse.__name__ = inner.__name__
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and 'did you mean' for mistyped flags."""

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:"):
            bad = message.split(":", 1)[1].split()
            hints = []
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            for b in bad:
                close = difflib.get_close_matches(b.split("=")[0], flags, n=1)
                hints.append(f"{b} (did you mean {close[0]}?)" if close else b)
            message = "unrecognized arguments: " + ", ".join(hints)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_field(parser: argparse.ArgumentParser, f) -> None:
    help_text = f.metadata.get("help", "")
    tp = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing), {})
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    default = f.default if f.default is not MISSING else None
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    shown = f" (default: {default})" if f.default is not MISSING else ""
    if tp is bool:
        kw.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
    elif origin is list:
        kw.update(nargs="*", type=args[0] if args else str, metavar=(args[0].__name__.upper() if args else "X"))
        shown = ""
    else:
        conv = _parse_optional(tp) if optional else tp
        kw.update(type=conv, metavar=tp.__name__.upper())
    parser.add_argument(f"--{f.name}", help=help_text + shown, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m sae_core",
        description="Train TopK sparse autoencoders on the residual stream of a Hugging Face language model. "
        "With no MODEL, trains on the embedded SmolLM2-135M and Python-docs corpus (a short demo run).",
    )
    parser.add_argument("model", nargs="?", default=argparse.SUPPRESS, help="Hub id or local folder of a causal LM.")
    parser.add_argument("dataset", nargs="?", default=argparse.SUPPRESS, help="Hub id, local data file/folder.")
    sae_group = parser.add_argument_group("SAE")
    for f in fields(SaeConfig):
        _add_field(sae_group, f)
    train_group = parser.add_argument_group("training")
    for f in fields(RunConfig):
        if f.name in ("sae", "model", "dataset"):
            continue
        _add_field(train_group, f)
    return parser


def parse_run_config(argv: list[str] | None = None) -> RunConfig:
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    sae_kw = {k: ns.pop(k) for k in list(ns) if k in _SAE_FIELDS}
    if ns.get("model") is None:
        for k, v in DEMO_DEFAULTS.items():
            if k in _SAE_FIELDS:
                sae_kw.setdefault(k, v)
            else:
                ns.setdefault(k, v)
    try:
        return RunConfig(sae=SaeConfig(**sae_kw), **ns)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def run(cfg: RunConfig) -> dict[str, float]:
    """Load model and data, then train (the CLI's body; also usable from Python)."""
    from transformers import AutoTokenizer

    from .data import prepare_dataset
    from .distributed import barrier, destroy, init_distributed
    from .embedded import EMBEDDED_MODEL_NAME, embedded_model_path, is_embedded_model
    from .models import ModelLoadError, load_model, max_context
    from .trainer import SaeTrainer

    token = cfg.hf_token or os.environ.get("HF_TOKEN")
    ctx = init_distributed(cfg.device, cfg.backend)
    try:
        model_name = cfg.model or EMBEDDED_MODEL_NAME
        model_path = str(embedded_model_path()) if is_embedded_model(model_name) else model_name
        if ctx.enabled and ctx.local_rank != 0:
            barrier(ctx)  # let local rank 0 convert/download first
        # The model first: an unknown name fails there with the clearest message, after one round of retries.
        model = load_model(
            model_path, dtype=cfg.dtype, device=ctx.device, attn_implementation=cfg.attn_implementation,
            load_in_8bit=cfg.load_in_8bit, revision=cfg.revision, token=token,
            trust_remote_code=cfg.trust_remote_code,
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path, revision=cfg.revision, token=token,
                                                      trust_remote_code=cfg.trust_remote_code)
        except OSError as e:
            raise ModelLoadError(f"cannot load the tokenizer of {model_name!r}: {first_line(e)}") from None
        limit = max_context(model)
        if limit is not None and cfg.ctx_len > limit:
            raise ConfigError(f"ctx_len={cfg.ctx_len} exceeds the model's maximum context of {limit} tokens")
        data = prepare_dataset(
            cfg.dataset, tokenizer, ctx_len=cfg.ctx_len, split=cfg.split, text_column=cfg.text_column,
            data_args=cfg.data_args, max_examples=cfg.max_examples, shuffle_seed=cfg.shuffle_seed,
            num_proc=cfg.data_preprocessing_num_proc, token=token,
        ).sequences
        if ctx.enabled and ctx.local_rank == 0:
            barrier(ctx)
        release_free_memory()
        cfg.run_name = cfg.run_name or _default_run_name(model_name)
        run_info = {"model": model_name, "dataset": cfg.dataset or "embedded", "config": cfg.public_dict()}
        trainer = SaeTrainer(cfg, data, model, tokenizer=tokenizer, dist_ctx=ctx, resume=cfg.resume,
                             run_info=run_info)
        if ctx.is_main:
            print(
                f"training {len(trainer.hookpoints)} SAEs ({', '.join(trainer.hookpoints)}) on {model_name}: "
                f"{trainer.num_latents} latents, k={cfg.sae.k}, {trainer.total_steps} steps -> {trainer.run_dir}",
                flush=True,
            )
        metrics = trainer.fit()
        if ctx.is_main:
            print(f"saved SAEs to {trainer.run_dir}", flush=True)
        return metrics
    finally:
        destroy()


def _default_run_name(model_name: str) -> str:
    return model_name.rstrip("/").split("/")[-1].replace(" ", "_") or "run"


def main(argv: list[str] | None = None) -> None:
    from .checkpoint import CheckpointError
    from .data import DatasetLoadError
    from .models import ModelLoadError
    from .sae import SaeLoadError

    cfg = parse_run_config(argv)
    try:
        run(cfg)
    except (ConfigError, ModelLoadError, DatasetLoadError, SaeLoadError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; resume with --resume")


if __name__ == "__main__":
    main()
