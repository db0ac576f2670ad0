"""`python -m sae_core.export`: our SAEs in SAELens's format, loaded by the real sae-lens package."""

import json

import pytest
import torch

from sae_core import Sae, SaeConfig
from sae_core.errors import ConfigError
from sae_core.export import export_run, main, transformer_lens_hook

D = 16


def write_run(run_dir, hookpoints=("layers.1", "layers.1.mlp")) -> dict[str, Sae]:
    """A run folder of random SAEs (non-zero biases) and its run.json, as training leaves it."""
    saes = {}
    for i, h in enumerate(hookpoints):
        torch.manual_seed(i)
        sae = Sae(D, SaeConfig(num_latents=64, k=5), hookpoint=h)
        with torch.no_grad():
            sae.encoder.bias.normal_(0, 0.1)
            sae.b_dec.normal_(0, 0.5)
        sae.save_to_disk(run_dir / h, input_scale=2.0)  # saved SAEs take raw activations
        saes[h] = Sae.load_from_disk(run_dir / h)
    (run_dir / "run.json").write_text(json.dumps({"model": "tiny", "dataset": "embedded", "seq_len": 32}))
    return saes


def test_saelens_loads_the_export_and_reconstructs_as_we_do(tmp_path, capsys):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is in the test extra: pip install -e .[test]")
    ours = write_run(tmp_path / "run")
    main([str(tmp_path / "run"), "--format", "saelens", "--out", str(tmp_path / "out")])
    assert "blocks.1.hook_mlp_out" in capsys.readouterr().out
    x = torch.randn(200, D) * 3
    for h, sae in ours.items():
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "out" / h))
        assert type(theirs).__name__ == "TopKSAE" and theirs.cfg.metadata.hook_name == transformer_lens_hook(
            h
        )
        with torch.no_grad():
            enc = sae.encode(x)
            dense = torch.zeros(200, sae.num_latents).scatter_(1, enc.indices, enc.acts)
            torch.testing.assert_close(theirs.encode(x), dense, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(theirs(x), sae.decode(enc.acts, enc.indices), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(theirs(x), x, atol=1e-2)  # a real reconstruction, not the identity


def test_transformer_lens_names_and_refusals(tmp_path):
    assert transformer_lens_hook("layers.3") == transformer_lens_hook("layer_3") == "blocks.3.hook_resid_post"
    assert transformer_lens_hook("layers.3.self_attn") == "blocks.3.hook_attn_out"
    assert transformer_lens_hook("embed_tokens") == "hook_embed"
    assert transformer_lens_hook("layers.3.mlp.act_fn") is None
    write_run(tmp_path / "run", hookpoints=("layers.0", "layers.0.input_layernorm"))
    with pytest.raises(ConfigError, match="TransformerLens has no hook for layers.0.input_layernorm"):
        export_run(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    written = export_run(tmp_path / "run", tmp_path / "out", hook_names="module")
    cfg = json.loads((written[1] / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "layers.0.input_layernorm" and cfg["k"] == 5 and cfg["d_sae"] == 64
    with pytest.raises(ConfigError, match="already exists and is not an empty folder"):
        export_run(tmp_path / "run", tmp_path / "out")


def test_a_transcoder_is_refused_before_any_file_is_written(tmp_path):
    # sae-lens 6.54's Transcoder/SkipTranscoder encode with ReLU (JumpReLU variants with a threshold): no TopK
    # transcoder exists, so an export would silently change the outputs.
    write_run(tmp_path / "run", hookpoints=("layers.0",))
    tc = Sae(D, SaeConfig(num_latents=64, k=5, transcode=True), hookpoint="layers.1.mlp", d_out=8)
    tc.save_to_disk(tmp_path / "run" / "layers.1.mlp")
    with pytest.raises(ConfigError, match="layers.1.mlp: a TopK transcoder has no SAELens equivalent"):
        export_run(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert len(export_run(tmp_path / "run", tmp_path / "out", hookpoints="layers.0")) == 1


def test_non_finite_weights_are_refused_before_any_file_is_written(tmp_path):
    from safetensors.torch import load_file, save_file

    write_run(tmp_path / "run")
    path = tmp_path / "run" / "layers.1.mlp" / "sae.safetensors"
    tensors = load_file(str(path))
    tensors["W_dec"][3, 1] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(
        ConfigError, match="the SAE for layers.1.mlp has non-finite values in W_dec: not exported"
    ):
        export_run(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()
