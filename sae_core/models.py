"""Language models: loading them, naming their hookpoints, and reading the residual stream with hooks.

Hookpoint `layers.<i>` is the output of decoder block i, i.e. the residual stream after block i. The blocks
live in `model.layers` (Llama, Mistral, Qwen, SmolLM2), `gpt_neox.layers` (Pythia) or `transformer.h` (GPT-2).
"""

import contextlib
import fnmatch
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .embedded import embedded_model_path, is_embedded_model
from .errors import ConfigError, ModelLoadError
from .utils import first_line, natural_key

BLOCK_LIST_PATHS = ("model.layers", "gpt_neox.layers", "transformer.h", "model.decoder.layers", "layers")


def load_model(
    name: str | None,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    load_in_8bit: bool = False,
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a causal LM by Hub id, local folder, or the embedded default (None, 'embedded',
    'smollm2-135m')."""
    from transformers import AutoModelForCausalLM  # heavy: only loading a model needs it

    if name is None or is_embedded_model(name):
        path = str(embedded_model_path())
    else:
        path = name
    kwargs: dict = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if isinstance(dtype, str) and dtype != "auto":
        dtype = resolve_dtype(dtype)
    if load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": str(device)}
    kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        where = "a local folder" if os.path.exists(path) else "a local folder nor a reachable Hub model id"
        raise ModelLoadError(
            f"cannot load model {name!r}: it is not {where} with a config.json and weights "
            f"({first_line(e)}); pass a Hub id such as EleutherAI/pythia-160m, "
            "a folder written by save_pretrained, or 'smollm2-135m'"
        ) from None
    except ValueError as e:
        raise ModelLoadError(f"cannot load model {name!r}: {first_line(e)}") from None
    if not load_in_8bit:
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def module_device(module: Any, default: torch.device | str = "cpu") -> torch.device:
    """The device of a module's first parameter; `default` for a module without parameters (or a
    non-module)."""
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
    return torch.device(default)


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "bf16": "bfloat16",
        "half": "float16",
        "float": "float32",
    }
    dt = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dt


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and list of the model's transformer blocks."""
    for path in BLOCK_LIST_PATHS:
        mod = submodule(model, path)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    # Fallback: the longest ModuleList in the model is almost always the block stack.
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ModelLoadError(f"cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=lambda nm: len(nm[1]))


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    raise ModelLoadError(f"cannot read the hidden size from {type(cfg).__name__}")


def max_context(model: nn.Module) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


# ------------------------------------------------------------------------------------------------------------
# Hookpoint names: the one place that knows how they are spelled, parsed and found in a folder.
#
# `layers.<i>` is the output of block i. EleutherAI's oldest repos name the same folder `layer_<i>`: both are
# read, only the first is written. A folder of SAEs holds one sub-folder per hookpoint: <hookpoint>/{cfg.json,
# sae.safetensors}.

CFG_FILE = "cfg.json"
SAE_FILE = "sae.safetensors"
HOOKPOINT_FILES = (CFG_FILE, SAE_FILE)
_LAYER_HOOKPOINT = re.compile(r"layers\.(\d+)|layer_(\d+)")


def all_hookpoints(model: nn.Module) -> list[str]:
    _, blocks = find_blocks(model)
    return [f"layers.{i}" for i in range(len(blocks))]


def select_hookpoints(
    model: nn.Module, *, layers: Sequence[int] = (), layer_stride: int = 1, hookpoints: Sequence[str] = ()
) -> list[str]:
    """Resolve the training selection: explicit layers, glob patterns, or every `layer_stride`-th layer."""
    names = all_hookpoints(model)
    n = len(names)
    if hookpoints:
        chosen: list[str] = []
        for pat in hookpoints:
            matches = [h for h in names if fnmatch.fnmatchcase(h, pat)]
            if not matches:
                raise ConfigError(
                    f"hookpoint {pat!r} matches nothing; this model has hookpoints layers.0 .. layers.{n - 1}"
                )
            chosen += [m for m in matches if m not in chosen]
        return sorted(chosen, key=layer_index)
    if layers:
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ConfigError(f"layer index {bad[0]} out of range: this model has {n} layers (0 .. {n - 1})")
        return [f"layers.{i}" for i in sorted(set(layers))]
    return names[::layer_stride]


def hookpoint_layer(name: str) -> int | None:
    """The block index of a hookpoint named 'layers.10' or 'layer_10' (10); None for any other name."""
    match = _LAYER_HOOKPOINT.fullmatch(name)
    return int(match.group(1) or match.group(2)) if match else None


def layer_index(hookpoint: str) -> int:
    """The block index of a hookpoint ('layers.10' or 'layer_10' -> 10); a ConfigError for any other name."""
    index = hookpoint_layer(hookpoint)
    if index is None:
        raise ConfigError(
            f"hookpoint {hookpoint!r} does not name a block: expected layers.<i> (or layer_<i>)"
        )
    return index


def hookpoint_aliases(pattern: str) -> list[str]:
    """A hookpoint name or glob and its other spelling: 'layers.3' <-> 'layer_3', 'layers.*' <-> 'layer_*'."""
    if pattern.startswith("layers."):
        return [pattern, "layer_" + pattern[len("layers.") :]]
    if pattern.startswith("layer_"):
        return [pattern, "layers." + pattern[len("layer_") :]]
    return [pattern]


def matches_hookpoint(name: str, pattern: str) -> bool:
    """Whether the hookpoint `name` matches the glob `pattern` in either spelling."""
    return any(fnmatch.fnmatchcase(name, alias) for alias in hookpoint_aliases(pattern))


def list_hookpoints(folder: str | os.PathLike[str]) -> list[str]:
    """The hookpoint folders of `folder` (sub-folders holding a cfg.json), in natural order (layers.2 before
    layers.10). Hidden folders are left out: they are temporary copies being written or swapped."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / CFG_FILE).is_file()]
    return sorted(names, key=natural_key)


def submodule(model: nn.Module, path: str) -> Any:
    """The attribute at the dotted `path` under `model` (e.g. "model.norm"); None where a part is missing."""
    mod: Any = model
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


class StopForward(Exception):
    """Raised by a hook after the deepest block a caller needs: the layers above it are not run."""


def hidden_state(block_output: Any) -> Tensor:
    """A block's hidden state: blocks return a tensor, or a tuple whose first element is it."""
    return block_output[0] if isinstance(block_output, tuple) else block_output


@contextlib.contextmanager
def capture_residuals(model: nn.Module, hookpoints: Sequence[str], stop_early: bool = True) -> Iterator[dict]:
    """Within the context, a forward pass fills the yielded dict {hookpoint: [B, T, d] tensor}.

    With `stop_early`, the forward stops right after the deepest hooked block (use `run_until_captured`).
    """
    _, blocks = find_blocks(model)
    acts: dict[str, Tensor] = {}
    deepest = max(layer_index(h) for h in hookpoints)
    handles = []

    def make_hook(name: str, last: bool):
        def hook(_module, _inputs, output):
            acts[name] = hidden_state(output)
            if last and stop_early:
                raise StopForward

        return hook

    for h in hookpoints:
        i = layer_index(h)
        handles.append(blocks[i].register_forward_hook(make_hook(h, i == deepest)))
    try:
        yield acts
    finally:
        for handle in handles:
            handle.remove()


def run_until_captured(model: nn.Module, input_ids: Tensor, **kwargs) -> None:
    """Forward `input_ids` through the model, swallowing the early stop of `capture_residuals`."""
    try:
        model(input_ids=input_ids, use_cache=False, **kwargs)
    except StopForward:
        pass


def special_token_ids(tokenizer) -> list[int]:
    """Default tokens excluded from SAE training and metrics: BOS (its residual norm is an outlier), and pad
    only when it differs from EOS. A pad that is the EOS token (SmolLM2, and any tokenizer given pad = eos)
    is the document separator inside packed rows: a real token the SAEs must learn."""
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = {bos, pad if pad != eos else None}
    return sorted(i for i in ids if i is not None)
