"""Language models: loading them, naming their hookpoints, and reading module outputs with hooks.

Hookpoint `layers.<i>` is the output of decoder block i, i.e. the residual stream after block i. The blocks
live in `model.layers` (Llama, Mistral, Qwen, SmolLM2), `gpt_neox.layers` (Pythia) or `transformer.h` (GPT-2).
Any other module inside the decoder stack is a hookpoint too, named by its path in the stack with the block
list spelled `layers` (`layers.3.mlp`, `layers.3.self_attn`, `embed_tokens`; GPT-2's `h.3.mlp` is
`layers.3.mlp`); its SAE reads the module's output (the first element of a tuple).
"""

import contextlib
import fnmatch
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .embedded import embedded_model_path, is_embedded_model
from .errors import ConfigError, ModelLoadError
from .utils import first_line, missing_local_path, natural_key

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
        if missing := missing_local_path(path):
            raise ModelLoadError(f"cannot load model {name!r}: {missing}")
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
    """The residual hookpoints layers.0 .. layers.<L-1>: the outputs of the blocks."""
    _, blocks = find_blocks(model)
    return [f"layers.{i}" for i in range(len(blocks))]


def hookpoint_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every hookpoint of the model, {name: module}, in module order: each module of the decoder stack (the
    module that holds the block list) under its path there, the block list spelled `layers`.

    Containers (ModuleList, ModuleDict) are left out: they have no output of their own.
    """
    path, blocks = find_blocks(model)
    stack_path, _, list_name = path.rpartition(".")
    stack = submodule(model, stack_path) if stack_path else model
    modules: dict[str, nn.Module] = {}
    for name, module in stack.named_modules():
        if not name or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        if name == list_name or name.startswith(list_name + "."):
            name = "layers" + name[len(list_name) :]
        modules[name] = module
    return modules


def canonical_hookpoint(model: nn.Module, hookpoint: str) -> str:
    """Our spelling of a hookpoint given in the model's own (GPT-2's `h.3.mlp` -> `layers.3.mlp`)."""
    own = find_blocks(model)[0].rpartition(".")[2]
    if hookpoint == own or hookpoint.startswith(own + "."):
        return "layers" + hookpoint[len(own) :]
    return hookpoint


def hookpoint_module(model: nn.Module, hookpoint: str) -> nn.Module:
    """The module whose output hookpoint `hookpoint` names; a ConfigError listing real ones if none.

    The model's own spelling of its block list works too (GPT-2's `h.3.mlp`, as sparsify names its folders).
    """
    path, blocks = find_blocks(model)
    ours = canonical_hookpoint(model, hookpoint)
    index = hookpoint_layer(ours)
    if index is not None and 0 <= index < len(blocks):
        return blocks[index]
    module = hookpoint_modules(model).get(ours)
    if module is None:
        raise ConfigError(f"hookpoint {hookpoint!r} is not in the model; {_hookpoint_examples(model)}")
    return module


def match_module_path(name: str, pattern: str) -> bool:
    """Whether the module path `name` matches the glob `pattern`, one dotted part at a time: `*` never crosses
    a dot, so `layers.*` is the blocks and `layers.*.mlp` their MLPs."""
    parts, pattern_parts = name.split("."), pattern.split(".")
    return len(parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(part, pat) for part, pat in zip(parts, pattern_parts, strict=True)
    )


def selects_hookpoint(pattern: str, name: str) -> bool:
    """Whether a selection glob picks hookpoint `name`: `match_module_path` in either spelling (layer_3)."""
    return any(match_module_path(name, alias) for alias in hookpoint_aliases(pattern))


def _hookpoint_examples(model: nn.Module) -> str:
    n = len(find_blocks(model)[1])
    names = [h for h in hookpoint_modules(model) if hookpoint_layer(h) is None]
    first_block = [h for h in names if h.startswith("layers.0.") and h.count(".") == 2]
    outside = [h for h in names if not h.startswith("layers.")]
    examples = ", ".join((first_block + outside)[:8])
    return (
        f"this model has hookpoints layers.0 .. layers.{n - 1} (the block outputs) and module paths such as "
        f"{examples} (globs: layers.*.mlp)"
    )


def select_hookpoints(
    model: nn.Module,
    *,
    layers: Sequence[int] = (),
    layer_stride: int = 1,
    hookpoints: Sequence[str] = (),
    transcode: bool = False,
) -> list[str]:
    """Resolve the training selection: explicit layers, glob patterns, or every `layer_stride`-th layer.

    Patterns are module paths with globs (see `match_module_path`); a module other than a block is checked
    with one short forward (`check_hookpoint_outputs`), except for transcoders, whose widths the caller
    measures (`transcoder_widths`).
    """
    names = all_hookpoints(model)
    n = len(names)
    if hookpoints:
        modules = list(hookpoint_modules(model))
        chosen: list[str] = []
        for pat in hookpoints:
            matches = [h for h in modules if selects_hookpoint(pat, h)]
            if not matches:
                raise ConfigError(f"hookpoint {pat!r} matches nothing; {_hookpoint_examples(model)}")
            chosen += [m for m in matches if m not in chosen]
        chosen.sort(key=modules.index)
        if not transcode and any(hookpoint_layer(h) is None for h in chosen):
            check_hookpoint_outputs(model, chosen)
        return chosen
    if layers:
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ConfigError(f"layer index {bad[0]} out of range: this model has {n} layers (0 .. {n - 1})")
        return [f"layers.{i}" for i in sorted(set(layers))]
    return names[::layer_stride]


def check_hookpoint_outputs(model: nn.Module, hookpoints: Sequence[str]) -> None:
    """Refuse a hookpoint whose module does not output a [batch, tokens, hidden size] tensor (e.g. an MLP's
    activation function, of the intermediate width): one forward of two tokens shows each output's shape.

    SAEs of one run share the model's width (d_in); a module of another width is refused rather than given
    an SAE of its own width.
    """
    width = hidden_size(model)
    probe = torch.zeros(1, 2, dtype=torch.long, device=module_device(model))
    with torch.no_grad(), capture_residuals(model, hookpoints) as acts:
        run_until_captured(model, probe)
    for h in hookpoints:
        if h not in acts:
            raise ConfigError(f"hookpoint {h!r}: its module did not run in the model's forward pass")
        out = acts[h]
        if not isinstance(out, Tensor):
            raise ConfigError(
                f"hookpoint {h!r} outputs a {type(out).__name__}, not a tensor; pick a module whose output "
                f"(or the first element of its output tuple) is a [batch, tokens, {width}] tensor"
            )
        if out.ndim != 3 or out.shape[-1] != width:
            raise ConfigError(
                f"hookpoint {h!r} outputs shape {list(out.shape)} for 1 sequence of 2 tokens, but an SAE "
                f"here reads [batch, tokens, {width}] (the model's hidden size); pick a module of that "
                "width, e.g. layers.*.mlp or layers.*.self_attn"
            )


def module_io_widths(model: nn.Module, hookpoints: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{hookpoint: (input width, output width)} of the modules, for transcoders: their input (first
    positional argument, or `hidden_states`) and output (first tensor of a tuple), from one forward of two
    tokens. Refuses a module whose input or output is not a [batch, tokens, width] tensor."""
    probe = torch.zeros(1, 2, dtype=torch.long, device=module_device(model))
    inputs: dict[str, Any] = {}
    with torch.no_grad(), capture_residuals(model, hookpoints, inputs=inputs) as outputs:
        run_until_captured(model, probe)
    widths: dict[str, tuple[int, int]] = {}
    for h in hookpoints:
        if h not in outputs:
            raise ConfigError(f"hookpoint {h!r}: its module did not run in the model's forward pass")
        for what, value in (("input", inputs.get(h)), ("output", outputs[h])):
            if not isinstance(value, Tensor) or value.ndim != 3:
                shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ConfigError(
                    f"--transcode: the {what} of hookpoint {h!r} is {shape}, not a [batch, tokens, width] "
                    "tensor; a transcoder needs a module that takes and returns hidden states, e.g. "
                    "layers.*.mlp"
                )
        widths[h] = (inputs[h].shape[-1], outputs[h].shape[-1])
    return widths


def transcoder_widths(model: nn.Module, hookpoints: Sequence[str]) -> tuple[int, int]:
    """(d_in, d_out) of one run's transcoders on these modules (`module_io_widths`), which must agree."""
    widths = module_io_widths(model, hookpoints)
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"{h}: {i} -> {o}" for h, (i, o) in widths.items())
        raise ConfigError(f"--transcode: one run's modules must share their widths, got {shown}")
    return widths[hookpoints[0]]


def hookpoint_layer(name: str) -> int | None:
    """The block index of a hookpoint named 'layers.10' or 'layer_10' (10); None for any other name."""
    match = _LAYER_HOOKPOINT.fullmatch(name)
    return int(match.group(1) or match.group(2)) if match else None


def hookpoint_seed(hookpoint: str) -> int:
    """A number that seeds a hookpoint's SAE: the block index for `layers.<i>` (as always), a stable hash of
    the name for any other module (a sub-module never shares its block's initialisation)."""
    index = hookpoint_layer(hookpoint)
    return index if index is not None else zlib.crc32(hookpoint.encode()) % 1_000_003


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
    """Raised by a hook after the last module a caller needs: the layers above it are not run."""


def hidden_state(block_output: Any) -> Tensor:
    """A module's hidden state: modules return a tensor, or a tuple whose first element is it."""
    return block_output[0] if isinstance(block_output, tuple) else block_output


def module_input(args: tuple, kwargs: dict) -> Any:
    """What a module was called with that a transcoder encodes: its first positional argument, else its
    `hidden_states` keyword (None if neither)."""
    return args[0] if args else kwargs.get("hidden_states")


@contextlib.contextmanager
def capture_residuals(
    model: nn.Module,
    hookpoints: Sequence[str],
    stop_early: bool = True,
    *,
    inputs: dict[str, Any] | None = None,
) -> Iterator[dict]:
    """Within the context, a forward pass fills the yielded dict {hookpoint: output}, a [B, T, d] tensor for a
    block or any module checked by `check_hookpoint_outputs`; and `inputs`, when given, with each hooked
    module's input (`module_input`), for transcoders, in the same forward.

    With `stop_early`, the forward stops as soon as every hooked module has run (use `run_until_captured`).
    """
    acts: dict[str, Tensor] = {}
    wanted = set(hookpoints)
    ran: set[str] = set()  # hooked modules that ran in the current forward (acts keeps the previous ones)
    handles = []

    def make_hook(name: str):
        def hook(_module, args, kwargs, output):
            if inputs is not None:
                inputs[name] = module_input(args, kwargs)
            acts[name] = hidden_state(output)
            ran.add(name)
            if stop_early and wanted.issubset(ran):
                raise StopForward

        return hook

    modules = {h: hookpoint_module(model, h) for h in hookpoints}
    try:
        handles.append(model.register_forward_pre_hook(lambda _module, _inputs: ran.clear()))
        for h, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(h), with_kwargs=True))
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
