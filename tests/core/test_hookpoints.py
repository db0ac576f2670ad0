"""Hookpoints on any module of the decoder stack: names, selection, capture, training, evaluation, loading."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sae_core import ConfigError, Sae, SaeConfig
from sae_core.evaluate import evaluate
from sae_core.models import (
    capture_residuals,
    find_blocks,
    hookpoint_module,
    hookpoint_modules,
    hookpoint_seed,
    run_until_captured,
    select_hookpoints,
)
from tests.support.tiny import tiny_model
from tests.support.training import make_trainer, token_data

D = 32


def test_module_paths_are_named_in_the_decoder_stack_with_the_block_list_spelled_layers():
    llama = tiny_model("llama", n_layers=2, d=D)
    names = hookpoint_modules(llama)
    assert names["layers.1.mlp"] is llama.model.layers[1].mlp
    assert names["embed_tokens"] is llama.model.embed_tokens and "layers" not in names  # a ModuleList
    gpt2 = tiny_model("gpt2", n_layers=2, d=D)
    assert hookpoint_module(gpt2, "layers.1.mlp") is gpt2.transformer.h[1].mlp  # GPT-2's h.1.mlp
    assert hookpoint_module(gpt2, "layers.1") is gpt2.transformer.h[1]
    assert hookpoint_module(gpt2, "layer_1") is gpt2.transformer.h[1]
    assert hookpoint_module(gpt2, "h.1.mlp") is gpt2.transformer.h[1].mlp  # sparsify's folder name
    with pytest.raises(ConfigError, match="'h.1.nothing' is not in the model"):
        hookpoint_module(gpt2, "h.1.nothing")


def test_globs_select_modules_one_dotted_part_at_a_time():
    model = tiny_model("llama", n_layers=3, d=D)
    assert select_hookpoints(model, hookpoints=["layers.*"]) == ["layers.0", "layers.1", "layers.2"]
    assert select_hookpoints(model, hookpoints=["layers.*.mlp"]) == [f"layers.{i}.mlp" for i in range(3)]
    assert select_hookpoints(model, hookpoints=["layers.[12].self_attn", "embed_tokens", "layer_0"]) == [
        "embed_tokens",
        "layers.0",
        "layers.1.self_attn",
        "layers.2.self_attn",
    ]


def test_a_glob_that_matches_nothing_lists_real_module_paths():
    model = tiny_model("llama", n_layers=3, d=D)
    with pytest.raises(
        ConfigError, match=r"matches nothing.*layers.0 .. layers.2.*layers.0.mlp.*embed_tokens"
    ):
        select_hookpoints(model, hookpoints=["blocks.*.mlp"])


def test_a_module_not_of_the_model_width_is_refused_with_its_name_and_shape():
    model = tiny_model("llama", n_layers=2, d=D)  # intermediate size 2 * D
    with pytest.raises(
        ConfigError, match=r"'layers.0.mlp.act_fn' outputs shape \[1, 2, 64\].*\[batch, tokens, 32\]"
    ):
        select_hookpoints(model, hookpoints=["layers.*.mlp.act_fn"])
    with pytest.raises(ConfigError, match=r"'rotary_emb' outputs shape"):  # (cos, sin) of the head width
        select_hookpoints(model, hookpoints=["rotary_emb"])


@pytest.mark.parametrize("kind", ["llama", "neox", "gpt2"])
def test_capture_reads_the_module_output_and_stops_after_the_last_needed_module(kind):
    model = tiny_model(kind, n_layers=4, d=D)
    _, blocks = find_blocks(model)
    calls = []
    handle = blocks[2].register_forward_hook(lambda *a: calls.append(1))
    mlp = hookpoint_module(model, "layers.1.mlp")
    expected = {}
    reference = mlp.register_forward_hook(lambda _m, _a, out: expected.setdefault("mlp", out))
    ids = token_data(2, 8)
    with torch.no_grad(), capture_residuals(model, ["layers.0", "layers.1.mlp"]) as acts:
        run_until_captured(model, ids)
    handle.remove(), reference.remove()
    assert calls == [] and set(acts) == {"layers.0", "layers.1.mlp"}
    assert torch.equal(acts["layers.1.mlp"], expected["mlp"]) and acts["layers.1.mlp"].shape == (2, 8, D)


def test_one_capture_context_serves_several_forwards_with_fresh_outputs_of_every_module():
    # The dict keeps the previous forward's outputs: the early stop must wait for this forward's deepest
    # module, not stop at the first one because the deeper one is still in the dict from the last batch.
    model = tiny_model("llama", n_layers=3, d=D)
    first, second = token_data(2, 8, seed=1), token_data(2, 8, seed=2)
    with torch.no_grad(), capture_residuals(model, ["layers.0", "layers.2"]) as acts:
        run_until_captured(model, first)
        run_until_captured(model, second)
        reused = dict(acts)
    with torch.no_grad(), capture_residuals(model, ["layers.0", "layers.2"]) as acts:
        run_until_captured(model, second)
    for h in ("layers.0", "layers.2"):
        assert torch.equal(reused[h], acts[h]), h


def test_seeds_of_blocks_are_unchanged_and_sub_modules_get_their_own():
    assert hookpoint_seed("layers.3") == hookpoint_seed("layer_3") == 3
    assert len({hookpoint_seed(h) for h in ("layers.3", "layers.3.mlp", "layers.3.self_attn")}) == 3


def test_training_on_sub_modules_writes_folders_named_by_module_path_that_load_back(tmp_path):
    model = tiny_model("llama", n_layers=3, d=D)
    trainer = make_trainer(tmp_path, model, hookpoints=["layers.*.mlp", "embed_tokens"], max_tokens=64 * 15)
    assert trainer.hookpoints == ["embed_tokens", "layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    trainer.fit()
    run = tmp_path / "run"
    saes = Sae.load_many_from_disk(run, ["layers.*.mlp"])
    assert list(saes) == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
    for h, sae in saes.items():
        cfg = json.loads((run / h / "cfg.json").read_text())
        assert cfg["hookpoint"] == h and cfg["stream"].startswith(f"output of the module {h}")
        torch.testing.assert_close(sae.W_dec, trainer.saes[h].W_dec)


def reference_kl(model, hookpoint, sae, ids):
    """KL(clean || spliced) with a full forward and a hook on the module: the evaluation's own definition."""
    module = hookpoint_module(model, hookpoint)

    def replace(_m, _a, out):
        x = out[0] if isinstance(out, tuple) else out
        x_hat = sae(x.reshape(-1, D)).sae_out.reshape(x.shape)
        return (x_hat, *out[1:]) if isinstance(out, tuple) else x_hat

    with torch.no_grad():
        clean = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
        handle = module.register_forward_hook(replace)
        spliced = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
        handle.remove()
    p, q = F.log_softmax(clean, -1), F.log_softmax(spliced, -1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean").item()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_evaluation_splices_at_the_sub_module(kind):
    model = tiny_model(kind, n_layers=3, d=D).double()
    torch.manual_seed(1)
    saes = {
        h: Sae(D, SaeConfig(num_latents=64, k=8), dtype=torch.float64) for h in ("layers.0", "layers.1.mlp")
    }
    ids = torch.randint(3, 300, (4, 12))
    report = evaluate(model, saes, ids, exclude_tokens=[], batch_size=2)
    assert report.settings["splice"] == "suffix"  # the MLP's variants re-run block 1, then blocks 2..
    full = evaluate(model, saes, ids, exclude_tokens=[], batch_size=2, splice="full")
    for h in saes:
        assert report.hookpoints[h]["kl"] == pytest.approx(reference_kl(model, h, saes[h], ids), rel=1e-6)
        assert report.hookpoints[h]["kl"] == pytest.approx(full.hookpoints[h]["kl"], rel=1e-9)
        assert report.hookpoints[h]["kl"] > 0


def test_eleuther_sub_module_folders_load_from_disk_and_as_a_hub_folder(tmp_path):
    # sparsify 1.x writes one folder per module path, cfg.json with its own keys (kept here as extras).
    m = 4 * D
    for h in ("layers.1.mlp", "layers.1.self_attn", "layers.1"):
        (tmp_path / h).mkdir()
        cfg = {
            "expansion_factor": 4,
            "normalize_decoder": True,
            "num_latents": 0,
            "k": 8,
            "multi_topk": False,
        }
        cfg |= {"skip_connection": False, "transcode": False, "d_in": D}
        (tmp_path / h / "cfg.json").write_text(json.dumps(cfg))
        tensors = {"encoder.weight": torch.randn(m, D), "encoder.bias": torch.zeros(m)}
        tensors |= {"W_dec": torch.randn(m, D), "b_dec": torch.zeros(D)}
        save_file(tensors, str(tmp_path / h / "sae.safetensors"))
    saes = Sae.load_many_from_disk(tmp_path, ["layers.1.*"])
    assert sorted(saes) == ["layers.1.mlp", "layers.1.self_attn"] and saes["layers.1.mlp"].num_latents == m
    one = Sae.load_from_hub(str(tmp_path), hookpoint="layers.1.mlp")
    assert one.d_in == D and one.cfg.k == 8


def test_a_cache_of_sub_modules_trains_and_selects_with_the_same_globs(tmp_path):
    from sae_core import SaeTrainer, TrainConfig
    from sae_core.cache import ActivationCache, write_cache
    from tests.support.training import Tok

    model = tiny_model("llama", n_layers=3, d=D)
    hookpoints = ["layers.*.mlp", "layers.0"]
    write_cache(
        model, Tok(), token_data(), tmp_path / "c", hookpoints=hookpoints, dtype="float32", progress=False
    )
    cache = ActivationCache(tmp_path / "c")
    assert cache.select_hookpoints(hookpoints=["layers.*"]) == ["layers.0"]
    assert cache.select_hookpoints(hookpoints=["layers.*.mlp"]) == [f"layers.{i}.mlp" for i in range(3)]
    sae_cfg = SaeConfig(expansion_factor=4, k=4)
    cfg = TrainConfig(
        sae_cfg, batch_size=4, save_dir=str(tmp_path), run_name="r", hookpoints=["layers.1.mlp"]
    )
    trainer = SaeTrainer(cfg, cache, None, progress=False)
    trainer.fit()
    assert (tmp_path / "r" / "layers.1.mlp" / "sae.safetensors").is_file()
