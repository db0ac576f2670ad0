"""End-to-end losses (--loss_fn kl|ce, Braun et al. 2024): train the SAEs on what their reconstructions do to
the LM's next-token predictions rather than on the reconstruction error alone.

One batch, in micro_acc_steps chunks of its sequences (each chunk its own forward and backward):

    kl only: log p_clean = log_softmax(LM(ids))              a full forward without gradient
    LM(ids) with a hook on every hookpoint's module that replaces its output, at the kept tokens, by its
        SAE's reconstruction (a transcoder's prediction); excluded tokens (BOS, pad) keep the module's output
    loss = sum over positions t whose token t and t+1 are both kept (as the evaluation counts them) of
           kl: sum_v p_clean(v) (log p_clean(v) - log p_spliced(v))      ce: -log p_spliced(token t+1)
    loss.backward()                                           through the frozen LM into every SAE

Every hookpoint is spliced in the same forward, as EleutherAI sparsify does: a deeper SAE encodes the output
of an LM whose shallower modules already carry their SAEs' reconstructions, and the gradient of the one loss
reaches all of them. The trainer divides the summed gradient by the number of loss positions of the whole
step (all batches, all ranks) at the optimizer step, so accumulation and data parallelism give the update of
one big batch.

AuxK keeps its definition and normaliser (trainer.py) and is added to the gradient: total = loss / positions
+ auxk_alpha * AuxK. Its gradient is taken on its own (`AuxGradients`) so that it reaches only the SAE whose
dead latents it trains, never a shallower SAE through that SAE's input.
"""

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import eval_mode
from .models import hidden_state, hookpoint_module, module_input

# reconstruct(hookpoint, module input or output at the kept tokens, module output there) -> what replaces
# the module's output there ([kept tokens, d_out]); the trainer's callback runs the SAE and keeps its metrics.
Reconstruct = Callable[[str, Tensor, Tensor], Tensor]


def loss_positions(ids: Tensor, excluded: Tensor) -> tuple[Tensor, Tensor]:
    """(kept tokens [B, T], loss positions [B, T-1]): a position t counts when token t and the token t+1 it
    predicts are both kept (the evaluation's rule for CE and KL)."""
    keep = ~torch.isin(ids, excluded.to(ids.device))
    return keep, keep[:, :-1] & keep[:, 1:]


def next_token_kl(clean_logp: Tensor, logits: Tensor, positions: Tensor) -> Tensor:
    """Sum over `positions` of KL(p_clean || p): `clean_logp` [positions, V] already selected, `logits` of the
    spliced forward [B, T, V]."""
    logp = F.log_softmax(logits[:, :-1][positions].float(), dim=-1)
    return (clean_logp.exp() * (clean_logp - logp)).sum()


def next_token_ce(logits: Tensor, ids: Tensor, positions: Tensor) -> Tensor:
    """Sum over `positions` of the cross-entropy of the next token."""
    return F.cross_entropy(logits[:, :-1][positions].float(), ids[:, 1:][positions], reduction="sum")


@contextlib.contextmanager
def spliced(
    modules: Mapping[str, nn.Module], keep: Tensor, reconstruct: Reconstruct, transcode: bool
) -> Iterator[None]:
    """Within the context, a forward replaces each module's output (the first tensor of a tuple) at the
    `keep` tokens by `reconstruct(hookpoint, x, y)`, x being the module's input for a transcoder, else its
    output y."""

    def hook_for(hookpoint: str):
        def hook(_module, args, kwargs, output):
            y = hidden_state(output)
            mask = keep.to(y.device)
            x = module_input(args, kwargs) if transcode else y
            out = y.clone()
            out[mask] = reconstruct(hookpoint, x[mask], y[mask]).to(y.dtype)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    handles = [m.register_forward_hook(hook_for(h), with_kwargs=True) for h, m in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class EndToEndLoss:
    """The spliced forward and backward of one batch for `loss_fn` "kl" or "ce". Freezes the model
    (requires_grad False on every parameter: the gradient passes through it, none is stored)."""

    def __init__(
        self, model: nn.Module, loss_fn: str, hookpoints: list[str], transcode: bool, micro_acc_steps: int
    ):
        if loss_fn not in ("kl", "ce"):
            raise ValueError(f"not an end-to-end loss: {loss_fn!r}")
        self.model, self.loss_fn, self.transcode = model, loss_fn, transcode
        self.micro_acc_steps = micro_acc_steps
        self.modules = {h: hookpoint_module(model, h) for h in hookpoints}
        model.requires_grad_(False)

    def batch(self, ids: Tensor, excluded: Tensor, reconstruct: Reconstruct) -> tuple[float, int]:
        """Forward and backward one batch of token ids [B, T] (on the model's device), in micro_acc_steps
        chunks of sequences; returns (the loss summed over its positions, their number)."""
        total, count = 0.0, 0
        for chunk in ids.chunk(self.micro_acc_steps):
            keep, positions = loss_positions(chunk, excluded)
            with eval_mode(self.model):
                clean_logp = None
                if self.loss_fn == "kl":
                    with torch.no_grad():
                        clean = self.model(input_ids=chunk, use_cache=False).logits
                        clean_logp = F.log_softmax(clean[:, :-1][positions].float(), dim=-1)
                        del clean
                with spliced(self.modules, keep, reconstruct, self.transcode):
                    logits = self.model(input_ids=chunk, use_cache=False).logits
            if clean_logp is not None:
                loss = next_token_kl(clean_logp, logits, positions)
            else:
                loss = next_token_ce(logits, chunk, positions)
            del logits
            if loss.requires_grad:  # not when every position of the chunk is excluded
                loss.backward()
            total += loss.item()
            count += int(positions.sum())
        return total, count


class AuxGradients:
    """AuxK's gradient of each SAE, accumulated apart from the end-to-end gradient (which is rescaled at the
    optimizer step) and restricted to that SAE's own parameters."""

    def __init__(self) -> None:
        self.grads: dict[str, list[Tensor | None]] = {}

    def add(self, hookpoint: str, sae: nn.Module, loss: Tensor) -> None:
        if not loss.requires_grad:  # no dead latent
            return
        params = list(sae.parameters())
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        held = self.grads.setdefault(hookpoint, [None] * len(params))
        for i, g in enumerate(grads):
            if g is not None:
                held[i] = g if held[i] is None else held[i] + g

    @torch.no_grad()
    def merge(self, hookpoint: str, sae: nn.Module, scale: float) -> None:
        """Each parameter's .grad := its end-to-end gradient x `scale` + its AuxK gradient (then dropped)."""
        held = self.grads.pop(hookpoint, None)
        for i, p in enumerate(sae.parameters()):
            if p.grad is not None:
                p.grad.mul_(scale)
            aux = held[i] if held is not None else None
            if aux is not None:
                p.grad = aux if p.grad is None else p.grad.add_(aux)
