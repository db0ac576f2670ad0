"""Running the LM with one hookpoint's output replaced: the spliced and ablated forwards of the evaluation.

    layer_of = check_saes(model, saes)        {hookpoint: splicer key}, each SAE checked against the model
    splicer = Splicer(model, hookpoints, mode)   "suffix", "full", or "auto" (suffix where the model allows)
    with splicer.recording():                 a clean forward records every hooked module's output
        clean_logits = splicer.forward(ids)
    splicer.check_suffix(ids, clean_logits, required)      first batch: the suffix replays the clean logits
    splicer.check_splice(hookpoint, hidden, ids, required) first batch, per hookpoint: a spliced suffix
                                                           equals a full forward (returns the full logits)
    splicer.logits(hookpoint, hidden, ids)                 the logits with the hookpoint's output := hidden

Cost per batch, with L blocks, hooked layers i ∈ S and "head" = final norm + unembedding:
    pass 1 (x̄)              blocks 0 .. max(S), stopping there (`block_means`)
    pass 2 (clean)          one full forward: every hookpoint's x and x̂, and the clean logits
    3 variants per hookpoint (SAE, zero, mean): blocks i+1 .. L−1 and the head only, called with the
                            arguments that the clean forward gave them (masks, rotary tables, positions)
i.e. (max(S)+1) + L + 3·Σ_{i∈S}(L−1−i) blocks and 1 + 3·|S| heads, where a naive evaluation runs
1 + 3·|S| full forwards. This suffix path is used for the block outputs `layers.<i>` of models whose final
norm is known (Llama-like `model.norm`, GPT-NeoX, GPT-2), after checking on the first batch that it
reproduces the clean logits and, for each hooked layer, the logits of one spliced variant (one extra full
forward per hookpoint); otherwise every variant is a full forward with a hook that replaces the module's
output. A hookpoint inside block i (`layers.3.mlp`) re-runs block i from its recorded input with the
module's output replaced, then the same suffix (checked on the first batch like a block output); one before
the blocks (`embed_tokens`) always takes full forwards.
"""

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, EvalError
from .models import (
    StopForward,
    find_blocks,
    hidden_size,
    hidden_state,
    hookpoint_layer,
    hookpoint_module,
    module_input,
    module_io_widths,
    submodule,
)

# A module inside block i: layers.<i>.<path>.
_INNER = re.compile(r"layers\.(\d+)\..+")

# The final norm after the block list, per block-list path (see models.BLOCK_LIST_PATHS).
FINAL_NORMS = {
    "model.layers": "model.norm",  # Llama, Mistral, Qwen, SmolLM2; Gemma 2's logit soft-cap fails the check
    "gpt_neox.layers": "gpt_neox.final_layer_norm",
    "transformer.h": "transformer.ln_f",
}


def check_saes(model: nn.Module, saes: Mapping[str, Any]) -> dict[str, str]:
    """{hookpoint: hookpoint}, the keys of `Splicer`, after checking that the model has each hookpoint and
    each SAE fits it."""
    if not saes:
        raise EvalError("no SAEs to evaluate")
    width = hidden_size(model)
    for h, sae in saes.items():
        try:
            hookpoint_module(model, h)
            if transcodes(sae):
                check_transcoder(model, h, sae)
                continue
        except ConfigError as e:
            raise EvalError(str(e)) from None
        if sae.d_in != width:
            raise EvalError(
                f"the SAE for {h} has d_in={sae.d_in}, but the model's residual stream at {h} has width "
                f"{width}: it was trained on another model"
            )
    return {h: h for h in saes}


def transcodes(sae: Any) -> bool:
    """Whether an SAE is a transcoder (it predicts its module's output from the module's input)."""
    return bool(getattr(getattr(sae, "cfg", None), "transcode", False))


def check_transcoder(model: nn.Module, hookpoint: str, sae: Any) -> None:
    """The transcoder's widths are those of the module's input and output."""
    d_in, d_out = module_io_widths(model, [hookpoint])[hookpoint]
    if (sae.d_in, sae.d_out) != (d_in, d_out):
        raise EvalError(
            f"the transcoder for {hookpoint} maps width {sae.d_in} -> {sae.d_out}, but the module there maps "
            f"{d_in} -> {d_out}: it was trained on another model or module"
        )


class Splicer:
    """The LM's logits with the output of a hookpoint's module replaced by a given hidden state.

    "suffix" mode: during the clean forward, record the (args, kwargs) each block from the shallowest hooked
    one on was called with. A variant at a block output `layers.<i>` then calls blocks i+1 .. L-1 with those
    arguments and its own hidden state, then the final norm and the unembedding; a variant at a module inside
    block i (`layers.<i>.mlp`) first calls block i on its recorded input with a hook that replaces the
    module's output, then the same suffix. "full" mode, and a module outside the blocks (`embed_tokens`) in
    either mode: a whole forward with a hook that replaces the module's output.
    """

    def __init__(
        self, model: nn.Module, hookpoints: Sequence[str], mode: str, transcoded: Sequence[str] = ()
    ):
        self.model = model
        # Hookpoints of transcoders: their modules' inputs are recorded too (`module_inputs`).
        self.transcoded = set(transcoded)
        path, self.blocks = find_blocks(model)
        self.modules = {h: hookpoint_module(model, h) for h in dict.fromkeys(hookpoints)}
        # The hookpoints a suffix can replay, by the first block it runs: i+1 after the output of block i,
        # i for a module inside block i (that block is re-run with the module's output replaced).
        self.first_block = {}
        for h in self.modules:
            layer = hookpoint_layer(h)
            if layer is not None:
                self.first_block[h] = layer + 1
            elif (inner := _INNER.fullmatch(h)) and int(inner.group(1)) < len(self.blocks):
                self.first_block[h] = int(inner.group(1))
        self.norm = submodule(model, FINAL_NORMS[path]) if path in FINAL_NORMS else None
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        known = self.norm is not None and self.head is not None
        if mode == "suffix" and not known:
            raise EvalError(
                f"splice='suffix' needs a known final norm and unembedding, which {type(model).__name__} "
                "does not have here; use splice='auto' or 'full'"
            )
        self.mode = "suffix" if mode != "full" and known and self.first_block else "full"
        # Blocks re-run for a module inside them: their recorded inputs keep the hidden state too.
        self.rerun = {i for h, i in self.first_block.items() if hookpoint_layer(h) is None}
        self.outputs: dict[str, Tensor] = {}
        self.module_inputs: dict[str, Tensor] = {}
        self.inputs: dict[int, tuple[tuple, dict]] = {}

    def replays(self, hookpoint: str) -> bool:
        """Whether a variant at `hookpoint` runs as a suffix (else as a full forward)."""
        return self.mode == "suffix" and hookpoint in self.first_block

    @contextlib.contextmanager
    def recording(self, stop_early: bool = False) -> Iterator[None]:
        """Within the context a forward fills `outputs` (hooked modules), `module_inputs` (those of
        transcoders) and, in suffix mode, `inputs` (of the blocks).

        With `stop_early`, the forward stops as soon as every hooked module has run (`forward` then returns
        None).
        """
        self.outputs.clear()
        self.module_inputs.clear()
        self.inputs.clear()
        handles = []

        def keep_output(h: str):
            def hook(_module, args, kwargs, output):
                if h in self.transcoded:
                    self.module_inputs[h] = module_input(args, kwargs)
                self.outputs[h] = hidden_state(output)
                if stop_early and len(self.outputs) == len(self.modules):
                    raise StopForward

            return hook

        def keep_inputs(j: int):
            def hook(_module, args, kwargs):
                # Everything but the hidden state itself, which each variant brings (less memory held),
                # unless the block is re-run from its own input.
                if j in self.rerun:
                    self.inputs[j] = (args, kwargs)
                elif args:
                    self.inputs[j] = ((None, *args[1:]), kwargs)
                else:
                    self.inputs[j] = ((), {k: v for k, v in kwargs.items() if k != "hidden_states"})

            return hook

        try:
            for h, module in self.modules.items():
                handles.append(module.register_forward_hook(keep_output(h), with_kwargs=True))
            if self.mode == "suffix" and not stop_early:
                for j in range(min(self.first_block.values()), len(self.blocks)):
                    handles.append(self.blocks[j].register_forward_pre_hook(keep_inputs(j), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, input_ids: Tensor) -> Tensor | None:
        """Forward the LM (inside `recording`): its logits, or None when stopped early."""
        try:
            return self.model(input_ids=input_ids, use_cache=False).logits
        except StopForward:
            return None

    def logits(self, hookpoint: str, hidden: Tensor, input_ids: Tensor) -> Tensor:
        """Logits with `hookpoint`'s output replaced by `hidden` (after a recorded clean forward)."""
        if not self.replays(hookpoint):
            return self._full_logits(hookpoint, hidden, input_ids)
        first = self.first_block[hookpoint]
        if hookpoint_layer(hookpoint) is None:  # a module inside block `first`: re-run that block
            args, kwargs = self.inputs[first]
            handle = self.modules[hookpoint].register_forward_hook(_replacing(hidden))
            try:
                hidden = hidden_state(self.blocks[first](*args, **kwargs))
            finally:
                handle.remove()
            first += 1
        for j in range(first, len(self.blocks)):
            args, kwargs = self.inputs[j]
            if args:
                hidden = hidden_state(self.blocks[j](hidden, *args[1:], **kwargs))
            else:
                hidden = hidden_state(self.blocks[j](**{**kwargs, "hidden_states": hidden}))
        return self.head(self.norm(hidden))

    def _full_logits(self, hookpoint: str, hidden: Tensor, input_ids: Tensor) -> Tensor:
        handle = self.modules[hookpoint].register_forward_hook(_replacing(hidden))
        try:
            return self.model(input_ids=input_ids, use_cache=False).logits
        finally:
            handle.remove()

    def check_suffix(self, input_ids: Tensor, clean_logits: Tensor, required: bool) -> None:
        """The suffix path must reproduce the clean logits from the clean hidden state (first batch only).

        A model that does something between the last block and the logits that is not replayed here (logit
        soft-capping, a logit scale, ...) fails this check, and the evaluation falls back to full forwards.
        """
        first = min(self.first_block, key=self.first_block.__getitem__)
        replay = self.logits(first, self.outputs[first], input_ids)
        self._compare(replay, clean_logits, required, "")

    def check_splice(self, hookpoint: str, hidden: Tensor, input_ids: Tensor, required: bool) -> Tensor:
        """The suffix logits with `hookpoint`'s output := `hidden` (a perturbed one) must equal a full
        forward's (first batch only, after `check_suffix`); returns the full forward's logits, correct in
        either case, so that the caller can use them for that variant and the check costs one forward.

        The clean check cannot see state that the blocks pass to each other outside the residual stream and
        the recorded arguments (a shared KV cache, something a block caches on a module that a later block
        reads): replayed from a clean forward, such state still holds the clean values. A perturbed output
        shows it; the evaluation then falls back to full forwards.
        """
        # The replay first, as the variants run it: right after the clean forward, whose state it inherits.
        replay = self.logits(hookpoint, hidden, input_ids) if self.replays(hookpoint) else None
        full = self._full_logits(hookpoint, hidden, input_ids)
        if replay is not None:
            self._compare(replay, full, required, f" with {hookpoint} spliced")
        return full

    def _compare(self, replay: Tensor, expected: Tensor, required: bool, what: str) -> None:
        err = (replay - expected).abs().max().item()
        if err <= 1e-4 * max(expected.abs().max().item(), 1e-6):
            return
        name = type(self.model).__name__
        msg = f"the suffix forward of {name} does not reproduce its logits{what} (max error {err:.3g})"
        if required:
            raise EvalError(msg + "; use splice='auto' or 'full'")
        warnings.warn(msg + "; using a full forward per spliced variant instead", stacklevel=4)
        self.mode = "full"


def _replacing(hidden: Tensor):
    """A forward hook that replaces a module's output (the first element of a tuple) by `hidden`."""

    def replace(_module, _args, output):
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return replace


def block_means(
    splicer: Splicer,
    layer_of: Mapping[str, str],
    batches: Iterable[Tensor],
    exclude: Tensor,
    bar: Any,
) -> tuple[dict[str, Tensor], int]:
    """({hookpoint: mean output over the non-excluded tokens}, float64 on the CPU; their number).

    `layer_of` maps each hookpoint to its `splicer` key (`check_saes`). `batches` are [B, T] token ids on
    the model's device; each forward stops as soon as every hooked module has run.
    """
    sums: dict[str, Tensor] = {}
    n_tokens = 0
    with torch.no_grad():
        for ids in batches:
            keep = ~torch.isin(ids, exclude)
            with splicer.recording(stop_early=True):
                splicer.forward(ids)
            for h, key in layer_of.items():
                part = splicer.outputs[key][keep].double().sum(0).cpu()
                sums[h] = sums[h] + part if h in sums else part
            n_tokens += int(keep.sum())
            bar.update()
    return {h: s / max(n_tokens, 1) for h, s in sums.items()}, n_tokens
