"""The SAE model: kernels against plain PyTorch, losses, decoder constraints, saving and loading."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sae_core import ConfigError, Sae, SaeConfig, SaeLoadError, kernels
from sae_core.kernels import sparse_decode, topk_encode
from sae_core.models import hookpoint_aliases, hookpoint_layer, layer_index, list_hookpoints
from tests.support.reference import dense_decode
from tests.support.tiny import child_env


def reference_encode(x, w, b, k):
    pre = F.relu(x @ w.T + b)
    return pre.topk(k, dim=1)


def test_sparse_decode_matches_dense():
    torch.manual_seed(0)
    acts, idx = torch.rand(50, 4), torch.randint(0, 64, (50, 4))
    w, b = torch.randn(64, 16), torch.randn(16)
    torch.testing.assert_close(
        sparse_decode(acts, idx, w, b), dense_decode(acts, idx, w, b), rtol=1e-5, atol=1e-5
    )


def test_fused_encoder_forward_and_sparse_backward_match_plain_autograd():
    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    upstream = torch.randn(40, 5)

    acts, idx, _, _ = topk_encode(x, w, b, 5)
    order = acts.argsort(dim=1, descending=True)
    acts, idx = acts.gather(1, order), idx.gather(1, order)
    (acts * upstream).sum().backward()
    got = [t.grad.clone() for t in (x, w, b)]

    for t in (x, w, b):
        t.grad = None
    ref_acts, ref_idx = reference_encode(x, w, b, 5)
    (ref_acts * upstream).sum().backward()
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(acts, ref_acts)
    for g, t in zip(got, (x, w, b)):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)


def test_encoder_in_token_blocks_equals_one_block_with_auxk(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    dead = torch.arange(0, 64, 3)
    results = []
    for elements in (1 << 40, 64 * 7):  # everything at once; blocks of 7 tokens (the last one has 5)
        monkeypatch.setattr(kernels, "ENCODE_BLOCK_ELEMENTS", elements)
        out = topk_encode(x, w, b, 5, dead, 6)
        (out.acts.sum() + (out.aux_acts * 2).sum()).backward()
        results.append([out.acts, out.indices, out.aux_acts, out.aux_indices, x.grad, w.grad, b.grad])
        x.grad = w.grad = b.grad = None
    for one, blocked in zip(*results):  # indices equal; values up to the BLAS's blocking of the sums
        torch.testing.assert_close(blocked, one, rtol=1e-5, atol=1e-6)
    assert results[0][3].unique().tolist() and set(results[0][3].unique().tolist()) <= set(dead.tolist())


def test_fvu_is_one_for_mean_predictor_and_zero_for_perfect():
    torch.manual_seed(0)
    sae = Sae(8, SaeConfig(num_latents=8, k=8))
    x = torch.randn(100, 8) + 3.0
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.b_dec.copy_(x.mean(0))
    assert sae(x).fvu.item() == pytest.approx(1.0, rel=1e-5)
    with torch.no_grad():  # identity SAE on non-negative data: encoder = decoder = I, no bias
        xp = x.clamp_min(0.01)
        sae.encoder.weight.copy_(torch.eye(8))
        sae.W_dec.copy_(torch.eye(8))
        sae.b_dec.zero_()
    assert sae(xp).fvu.item() == pytest.approx(0.0, abs=1e-10)


def test_auxk_gradient_reaches_dead_latents_and_excludes_b_dec():
    torch.manual_seed(0)
    sae = Sae(16, SaeConfig(expansion_factor=4, k=2))
    with torch.no_grad():
        sae.b_dec.copy_(torch.full((16,), 5.0))  # a large b_dec would dominate the aux recon if it were added
    x = torch.randn(64, 16) + 5.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[32:] = True
    out = sae(x, dead)
    assert out.auxk_loss.item() > 0

    # Recompute AuxK by hand: top k_aux of the dead latents' pre-activations, decoded without b_dec.
    pre = F.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    vals, pos = pre[:, 32:].topk(min(sae.k_aux, 32), dim=1)
    aux_recon = dense_decode(vals, pos + 32, sae.W_dec)
    e = (x - out.sae_out).detach()
    # Normalised by the variance of the residual it predicts (Gao et al.'s code), not by the input's.
    expected = min(32 / sae.k_aux, 1.0) * (aux_recon - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert out.auxk_loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # The trainer's form: sums of squares over a given denominator.
    given = sae(x, dead, total_variance=1.0, residual_variance=0.25).auxk_loss
    assert given.item() == pytest.approx(
        min(32 / sae.k_aux, 1.0) * (aux_recon - e).pow(2).sum().item() / 0.25, rel=1e-4
    )

    sae.zero_grad()
    out.auxk_loss.backward()
    enc_grad = sae.encoder.weight.grad
    assert enc_grad[32:].abs().sum() > 0, "AuxK gradient must reach the dead latents' encoder rows"
    assert enc_grad[:32].abs().sum() == 0, "AuxK must not train live latents"
    assert sae.b_dec.grad.abs().sum() > 0  # through the encoder input x - b_dec


def test_decoder_rows_stay_unit_norm_after_steps():
    torch.manual_seed(0)
    sae = Sae(16, SaeConfig(expansion_factor=2, k=4))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(5):
        x = torch.randn(128, 16)
        sae(x).fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        radial = (sae.W_dec.grad * sae.W_dec).sum(1)
        assert radial.abs().max() < 1e-5
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32), rtol=1e-5, atol=1e-5)


def test_training_on_structured_sparse_data_drives_fvu_far_below_one():
    torch.manual_seed(0)
    d, n_feat = 32, 64
    feats = F.normalize(torch.randn(n_feat, d), dim=1)

    def batch(n=512):
        coef = torch.rand(n, n_feat) * (torch.rand(n, n_feat) < 4 / n_feat)
        return coef @ feats + 0.5

    sae = Sae(d, SaeConfig(num_latents=128, k=8))
    with torch.no_grad():
        sae.b_dec.copy_(batch().mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    first = None
    for _ in range(400):
        out = sae(batch())
        first = first if first is not None else out.fvu.item()
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
    final = sae(batch()).fvu.item()
    assert final < 0.1 < first


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sparse_feature_data(d=32, n_feat=64, sample_seed=0, device="cpu"):
    """Batches of sparse non-negative combinations of n_feat fixed random unit directions, plus an offset."""
    feats = F.normalize(torch.randn(n_feat, d, generator=torch.Generator().manual_seed(1234)), dim=1)
    g = torch.Generator().manual_seed(sample_seed)

    def batch(n=512):
        coef = torch.rand(n, n_feat, generator=g) * (torch.rand(n, n_feat, generator=g) < 4 / n_feat)
        return (coef @ feats + 0.5).to(device)

    return batch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["csr", "index_add", "embedding_bag"])
def test_both_weight_gradient_methods_give_the_plain_autograd_gradient(device, method, monkeypatch):
    monkeypatch.setitem(kernels.GRAD_W_METHOD, torch.device(device).type, method)
    torch.manual_seed(0)
    x = torch.randn(64, 16, device=device, requires_grad=True)
    w = torch.randn(128, 16, device=device, requires_grad=True)
    b = torch.randn(128, device=device, requires_grad=True)
    up = torch.randn(64, 6, device=device)
    acts, idx, _, _ = topk_encode(x, w, b, 6)
    order = idx.argsort(dim=1)
    (acts.gather(1, order) * up).sum().backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref, ref_idx = reference_encode(x, w, b, 6)
    order = ref_idx.argsort(dim=1)
    (ref.gather(1, order) * up).sum().backward()
    for mine, t in zip(got, (x, w, b)):
        torch.testing.assert_close(mine, t.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_encoder_trains_to_within_one_percent_of_fp32_fvu(device):
    """--autocast bfloat16 is only offered because it is accurate enough: same data, same init, same steps."""
    final = {}
    for compute in (None, torch.bfloat16):
        batch = sparse_feature_data(device=device)
        torch.manual_seed(1)
        sae = Sae(32, SaeConfig(num_latents=128, k=8), device=device)
        with torch.no_grad():
            sae.b_dec.copy_(batch().mean(0))
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        for _ in range(600):
            out = sae(batch(), compute_dtype=compute)
            out.fvu.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            sae.set_decoder_norm_to_unit_norm()
        test = sparse_feature_data(sample_seed=99, device=device)(4096)
        with torch.no_grad():
            final[compute] = sae(test).fvu.item()
    assert final[None] < 0.2
    assert abs(final[torch.bfloat16] - final[None]) <= 0.01 * final[None], final


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    sae = Sae(16, SaeConfig(expansion_factor=2, k=4), hookpoint="layers.3")
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_()
    sae.save_to_disk(tmp_path / "layers.3")
    cfg = json.loads((tmp_path / "layers.3" / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["hookpoint"] == "layers.3" and cfg["k"] == 4
    loaded = Sae.load_from_disk(tmp_path / "layers.3")
    for (n1, p1), (n2, p2) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert loaded.dtype == torch.float32
    assert Sae.load_from_disk(tmp_path / "layers.3", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_load_many_sorts_naturally_filters_and_reads_both_namings(tmp_path):
    for name in ("layers.10", "layers.2", "layer_1"):
        Sae(8, SaeConfig(expansion_factor=1, k=2)).save_to_disk(tmp_path / name)
    many = Sae.load_many_from_hub(str(tmp_path))
    assert list(many) == ["layer_1", "layers.2", "layers.10"]
    assert list(Sae.load_many_from_hub(str(tmp_path), pattern="layers.*")) == ["layers.2", "layers.10"]
    assert Sae.load_from_hub(str(tmp_path), layer=1).d_in == 8  # old `layer_1` folder found by index
    assert Sae.load_from_hub(str(tmp_path), hookpoint="layers.10").num_latents == 8
    with pytest.raises((SaeLoadError, FileNotFoundError), match="layers.99"):
        Sae.load_many_from_hub(str(tmp_path), pattern="layers.99")


def test_hookpoint_names_have_one_definition_of_both_spellings():
    # The index, the aliases and the folder listing used to be written three times and disagreed:
    # models.layer_index crashed on `layer_3`, sae.hookpoint_layer also took `layer.3`/`layers_3`.
    assert [hookpoint_layer(n) for n in ("layers.10", "layer_10", "layer.10", "layers_10", "blocks.1")] == [
        10,
        10,
        None,
        None,
        None,
    ]
    assert layer_index("layer_3") == layer_index("layers.3") == 3
    with pytest.raises(ConfigError, match="does not name a block"):
        layer_index("embed_tokens")
    assert hookpoint_aliases("layers.*") == ["layers.*", "layer_*"]
    assert hookpoint_aliases("layer_3") == ["layer_3", "layers.3"] and hookpoint_aliases("mlp") == ["mlp"]


def test_a_hidden_staging_folder_is_not_an_sae(tmp_path):
    # sae.list_hookpoints used to list `.layers.3.tmp-*` (a folder being written or swapped); hub's copy did
    # not.
    Sae(8, SaeConfig(expansion_factor=1, k=2)).save_to_disk(tmp_path / "layers.3")
    Sae(8, SaeConfig(expansion_factor=1, k=2)).save_to_disk(tmp_path / ".layers.3.tmp-x1")
    (tmp_path / "layers.4").mkdir()  # no cfg.json: not an SAE either
    assert list_hookpoints(tmp_path) == ["layers.3"]
    assert list(Sae.load_many_from_disk(tmp_path)) == ["layers.3"]


def test_loading_an_sae_imports_neither_the_publisher_nor_the_card(tmp_path):
    Sae(8, SaeConfig(expansion_factor=1, k=2)).save_to_disk(tmp_path / "layers.1")
    code = (
        "import sys\n"
        "from sae_core import Sae\n"
        f"Sae.load_from_hub({str(tmp_path)!r}, layer=1)\n"
        "print(sorted(m for m in ('sae_core.hub', 'sae_core.card', 'yaml') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cfg_extra_keys_are_tolerated(tmp_path):
    Sae(8, SaeConfig(expansion_factor=1, k=2)).save_to_disk(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg["multi_topk"] = False
    cfg["some_future_key"] = 1
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    assert Sae.load_from_disk(tmp_path / "s").cfg.k == 2


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda p: (p / "sae.safetensors").write_bytes((p / "sae.safetensors").read_bytes()[:100]),
            "sae.safetensors",
        ),
        (lambda p: (p / "sae.safetensors").write_bytes(b"not a safetensors file at all"), "sae.safetensors"),
        (lambda p: (p / "cfg.json").write_text('{"k": 2, "d_in": '), "cfg.json: not valid JSON"),
        (lambda p: (p / "cfg.json").write_text('{"k": 2, "expansion_factor": 1, "d_in": 9}'), "implies"),
        (lambda p: (p / "cfg.json").write_text('{"k": 2, "expansion_factor": 1}'), "'d_in' must be"),
        (lambda p: (p / "sae.safetensors").unlink(), "file missing"),
        (lambda p: (p / "cfg.json").write_text('{"k": -1, "d_in": 8}'), "invalid SAE configuration"),
    ],
)
def test_damaged_files_give_one_line_errors_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "layers.0"
    Sae(8, SaeConfig(expansion_factor=1, k=2)).save_to_disk(path)
    damage(path)
    with pytest.raises(SaeLoadError, match=message) as err:
        Sae.load_from_disk(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_config_rejects_bad_values_and_positional_hidden_size():
    with pytest.raises(TypeError, match="positional argument"):  # kw_only: SaeConfig(hidden_size) is refused
        SaeConfig(576)
    with pytest.raises(ConfigError, match="k must be a positive"):
        SaeConfig(k=0)
    with pytest.raises(ConfigError, match="expansion_factor must be"):
        SaeConfig(expansion_factor=0)
    with pytest.raises(ConfigError, match="exceeds num_latents"):
        SaeConfig(num_latents=16, k=32)
    with pytest.raises(ConfigError, match="exceeds the 8 latents"):
        Sae(8, SaeConfig(expansion_factor=1, k=9))
    assert SaeConfig(num_latents=100, expansion_factor=4).latents_for(8) == 100  # num_latents wins
