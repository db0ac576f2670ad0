"""Running the LM with one block's output replaced: the spliced and ablated forwards of the evaluation.

    layer_of = check_saes(model, saes)        {hookpoint: block index}, each SAE checked against the model
    splicer = Splicer(model, layers, mode)    mode "suffix", "full", or "auto" (suffix where the model allows)
    with splicer.recording():                 a clean forward records every hooked block's output
        clean_logits = splicer.forward(ids)
    splicer.check_suffix(ids, clean_logits, required)      first batch: the suffix replays the clean logits
    splicer.check_splice(layer, hidden, ids, required)     first batch, per hooked layer: a spliced suffix
                                                           equals a full forward (returns the full logits)
    splicer.logits(layer, hidden, ids)                     the logits with block `layer`'s output := hidden

Cost per batch, with L blocks, hooked layers i ∈ S and "head" = final norm + unembedding:
    pass 1 (x̄)              blocks 0 .. max(S), stopping there (`block_means`)
    pass 2 (clean)          one full forward: every hookpoint's x and x̂, and the clean logits
    3 variants per hookpoint (SAE, zero, mean): blocks i+1 .. L−1 and the head only, called with the
                            arguments that the clean forward gave them (masks, rotary tables, positions)
i.e. (max(S)+1) + L + 3·Σ_{i∈S}(L−1−i) blocks and 1 + 3·|S| heads, where a naive evaluation runs
1 + 3·|S| full forwards. This suffix path is used for models whose final norm is known (Llama-like
`model.norm`, GPT-NeoX, GPT-2), after checking on the first batch that it reproduces the clean logits
and, for each hooked layer, the logits of one spliced variant (one extra full forward per hookpoint);
otherwise every variant is a full forward with a hook that replaces the block's output.
"""

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import EvalError
from .models import StopForward, find_blocks, hidden_size, hidden_state, hookpoint_layer, submodule

# The final norm after the block list, per block-list path (see models.BLOCK_LIST_PATHS).
FINAL_NORMS = {
    "model.layers": "model.norm",  # Llama, Mistral, Qwen, SmolLM2; Gemma 2's logit soft-cap fails the check
    "gpt_neox.layers": "gpt_neox.final_layer_norm",
    "transformer.h": "transformer.ln_f",
}


def check_saes(model: nn.Module, saes: Mapping[str, Any]) -> dict[str, int]:
    """{hookpoint: block index}, after checking that the model has each hookpoint and each SAE fits it."""
    if not saes:
        raise EvalError("no SAEs to evaluate")
    _, blocks = find_blocks(model)
    n_layers, width = len(blocks), hidden_size(model)
    layer_of = {}
    for h, sae in saes.items():
        i = hookpoint_layer(h)
        if i is None or not 0 <= i < n_layers:
            raise EvalError(
                f"hookpoint {h!r} is not in the model: {type(model).__name__} has hookpoints layers.0 .. "
                f"layers.{n_layers - 1} (the outputs of its blocks)"
            )
        if sae.d_in != width:
            raise EvalError(
                f"the SAE for {h} has d_in={sae.d_in}, but the model's residual stream at {h} has width "
                f"{width}: it was trained on another model"
            )
        layer_of[h] = i
    return layer_of


class Splicer:
    """The LM's logits with the output of block i replaced by a given hidden state.

    "suffix" mode: during the clean forward, record the (args, kwargs) each block after the shallowest
    hooked one was called with; a variant then calls blocks i+1 .. L-1 with those arguments and its own
    hidden state, then the final norm and the unembedding. "full" mode: a whole forward with a hook that
    replaces block i's output.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], mode: str):
        self.model = model
        path, self.blocks = find_blocks(model)
        self.layers = sorted(set(layers))
        self.norm = submodule(model, FINAL_NORMS[path]) if path in FINAL_NORMS else None
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        known = self.norm is not None and self.head is not None
        if mode == "suffix" and not known:
            raise EvalError(
                f"splice='suffix' needs a known final norm and unembedding, which {type(model).__name__} "
                "does not have here; use splice='auto' or 'full'"
            )
        self.mode = "suffix" if mode != "full" and known else "full"
        self.outputs: dict[int, Tensor] = {}
        self.inputs: dict[int, tuple[tuple, dict]] = {}

    @contextlib.contextmanager
    def recording(self, stop_after: int | None = None) -> Iterator[None]:
        """Within the context a forward fills `outputs` (hooked blocks) and, in suffix mode, `inputs`.

        With `stop_after`, the forward stops right after that block (`forward` then returns None).
        """
        self.outputs.clear()
        self.inputs.clear()
        handles = []

        def keep_output(i: int):
            def hook(_module, _args, output):
                self.outputs[i] = hidden_state(output)
                if i == stop_after:
                    raise StopForward

            return hook

        def keep_inputs(j: int):
            def hook(_module, args, kwargs):
                # Everything but the hidden state itself, which each variant brings: less memory held.
                if args:
                    self.inputs[j] = ((None, *args[1:]), kwargs)
                else:
                    self.inputs[j] = ((), {k: v for k, v in kwargs.items() if k != "hidden_states"})

            return hook

        try:
            for i in self.layers:
                handles.append(self.blocks[i].register_forward_hook(keep_output(i)))
            if self.mode == "suffix" and stop_after is None:
                for j in range(self.layers[0] + 1, len(self.blocks)):
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

    def logits(self, layer: int, hidden: Tensor, input_ids: Tensor) -> Tensor:
        """Logits with block `layer`'s output replaced by `hidden` (after a recorded clean forward)."""
        if self.mode == "full":
            return self._full_logits(layer, hidden, input_ids)
        for j in range(layer + 1, len(self.blocks)):
            args, kwargs = self.inputs[j]
            if args:
                hidden = hidden_state(self.blocks[j](hidden, *args[1:], **kwargs))
            else:
                hidden = hidden_state(self.blocks[j](hidden_states=hidden, **kwargs))
        return self.head(self.norm(hidden))

    def _full_logits(self, layer: int, hidden: Tensor, input_ids: Tensor) -> Tensor:
        def replace(_module, _args, output):
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = self.blocks[layer].register_forward_hook(replace)
        try:
            return self.model(input_ids=input_ids, use_cache=False).logits
        finally:
            handle.remove()

    def check_suffix(self, input_ids: Tensor, clean_logits: Tensor, required: bool) -> None:
        """The suffix path must reproduce the clean logits from the clean hidden state (first batch only).

        A model that does something between the last block and the logits that is not replayed here (logit
        soft-capping, a logit scale, ...) fails this check, and the evaluation falls back to full forwards.
        """
        layer = self.layers[0]
        replay = self.logits(layer, self.outputs[layer], input_ids)
        self._compare(replay, clean_logits, required, "")

    def check_splice(self, layer: int, hidden: Tensor, input_ids: Tensor, required: bool) -> Tensor:
        """The suffix logits with block `layer`'s output := `hidden` (a perturbed one) must equal a full
        forward's (first batch only, after `check_suffix`); returns the full forward's logits, correct in
        either case, so that the caller can use them for that variant and the check costs one forward.

        The clean check cannot see state that the blocks pass to each other outside the residual stream and
        the recorded arguments (a shared KV cache, something a block caches on a module that a later block
        reads): replayed from a clean forward, such state still holds the clean values. A perturbed output
        shows it; the evaluation then falls back to full forwards.
        """
        # The replay first, as the variants run it: right after the clean forward, whose state it inherits.
        replay = self.logits(layer, hidden, input_ids) if self.mode == "suffix" else None
        full = self._full_logits(layer, hidden, input_ids)
        if replay is not None:
            self._compare(replay, full, required, f" with layers.{layer} spliced")
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


def block_means(
    splicer: Splicer,
    layer_of: Mapping[str, int],
    batches: Iterable[Tensor],
    exclude: Tensor,
    bar: Any,
) -> tuple[dict[str, Tensor], int]:
    """({hookpoint: mean block output over the non-excluded tokens}, float64 on the CPU; their number).

    `batches` are [B, T] token ids on the model's device; each forward stops after the deepest hooked block.
    """
    sums: dict[str, Tensor] = {}
    n_tokens = 0
    with torch.no_grad():
        for ids in batches:
            keep = ~torch.isin(ids, exclude)
            with splicer.recording(stop_after=max(layer_of.values())):
                splicer.forward(ids)
            for h, i in layer_of.items():
                part = splicer.outputs[i][keep].double().sum(0).cpu()
                sums[h] = sums[h] + part if h in sums else part
            n_tokens += int(keep.sum())
            bar.update()
    return {h: s / max(n_tokens, 1) for h, s in sums.items()}, n_tokens
