"""Running the LM with one block's output replaced (sae_core.splice), on tiny float64 models."""

import pytest
import torch

from sae_core.errors import EvalError
from sae_core.models import find_blocks
from sae_core.splice import Splicer, block_means
from tests.support.tiny import shared_cache_model, tiny_model


class NoBar:
    def update(self):
        pass


def count_block_calls(model):
    calls = [0] * len(find_blocks(model)[1])
    for i, block in enumerate(find_blocks(model)[1]):
        block.register_forward_hook(lambda _m, _a, _o, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_recording_with_stop_early_runs_no_block_above_the_deepest_hookpoint():
    model = tiny_model("llama", n_layers=4, d=16).double()
    calls = count_block_calls(model)
    splicer = Splicer(model, ["layers.0", "layers.1"], "auto")
    ids = torch.randint(3, 300, (2, 8))
    with torch.no_grad(), splicer.recording(stop_early=True):
        assert splicer.forward(ids) is None
    assert calls == [1, 1, 0, 0] and sorted(splicer.outputs) == ["layers.0", "layers.1"]
    # The mean pass stops there too, and counts only the tokens that are not excluded.
    means, n_tokens = block_means(
        splicer, {"layers.1": "layers.1"}, [ids], torch.tensor([ids[0, 0].item()]), NoBar()
    )
    assert calls == [2, 2, 0, 0] and n_tokens == int((ids != ids[0, 0]).sum())
    assert means["layers.1"].dtype == torch.float64 and means["layers.1"].shape == (16,)


ATTENTION = {"llama": "self_attn", "neox": "attention", "gpt2": "attn"}


@pytest.mark.parametrize("kind", ["llama", "neox", "gpt2"])
@pytest.mark.parametrize("module", ["", ".mlp", ".attention"])
def test_suffix_logits_equal_a_full_forward_with_the_module_output_replaced(kind, module):
    # A block output replays blocks 2.. ; a module inside block 1 re-runs block 1 with its output replaced.
    model = tiny_model(kind, n_layers=3, d=16).double()
    ids = torch.randint(3, 300, (2, 8))
    h = "layers.1" + module.replace("attention", ATTENTION[kind])
    suffix, full = Splicer(model, [h, "layers.2"], "suffix"), Splicer(model, [h, "layers.2"], "full")
    assert (suffix.mode, full.mode) == ("suffix", "full") and suffix.replays(h)
    with torch.no_grad():
        for splicer in (suffix, full):
            with splicer.recording():
                clean = splicer.forward(ids)
        suffix.check_suffix(ids, clean, required=True)  # replays the clean logits
        hidden = suffix.outputs[h] * 0.5
        checked = suffix.check_splice(h, hidden, ids, required=True)  # and a perturbed splice
        assert suffix.mode == "suffix" and torch.equal(checked, full.logits(h, hidden, ids))
        torch.testing.assert_close(suffix.logits(h, hidden, ids), checked, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(suffix.logits(h, hidden, ids), clean)


def test_a_module_before_the_blocks_takes_full_forwards():
    model = tiny_model("llama", n_layers=2, d=16).double()
    splicer = Splicer(model, ["embed_tokens", "layers.0"], "suffix")
    assert splicer.replays("layers.0") and not splicer.replays("embed_tokens")
    assert Splicer(model, ["embed_tokens"], "auto").mode == "full"


def test_suffix_mode_without_a_known_final_norm_is_an_eval_error():
    model = tiny_model("llama", n_layers=2, d=16)
    model.model.norm = None  # as if the final norm lived elsewhere
    with pytest.raises(EvalError, match="needs a known final norm and unembedding"):
        Splicer(model, ["layers.0"], "suffix")
    assert Splicer(model, ["layers.0"], "auto").mode == "full"


def test_a_perturbed_splice_catches_state_passed_outside_the_residual_stream():
    model = shared_cache_model(n_layers=3, d=16).double()
    ids = torch.randint(3, 300, (2, 8))

    def recorded(mode):
        splicer = Splicer(model, ["layers.0"], mode)
        with splicer.recording():
            clean = splicer.forward(ids)
        splicer.check_suffix(ids, clean, required=True)  # the clean replay cannot see the cache
        return splicer, splicer.outputs["layers.0"] * 0.5

    with torch.no_grad():
        strict, hidden = recorded("suffix")
        replayed = strict.logits(
            "layers.0", hidden, ids
        )  # block 2 reads block 1's clean input, cached by then
        with pytest.raises(EvalError, match="does not reproduce its logits with layers.0 spliced"):
            strict.check_splice("layers.0", hidden, ids, required=True)
        auto, hidden = recorded("auto")
        with pytest.warns(UserWarning, match="using a full forward per spliced variant instead"):
            full = auto.check_splice("layers.0", hidden, ids, required=False)
        assert auto.mode == "full" and torch.equal(auto.logits("layers.0", hidden, ids), full)
        assert not torch.allclose(replayed, full)
