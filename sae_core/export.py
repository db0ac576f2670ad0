"""Export a run's SAEs to another library's on-disk format.

    python -m sae_core.export RUN_DIR --format saelens --out DIR [--hookpoints GLOB] [--hook_names module]

SAELens (sae-lens 6.x) reads one folder per SAE, `DIR/<hookpoint>/{cfg.json, sae_weights.safetensors}`,
with `sae_lens.SAE.load_from_disk(DIR/<hookpoint>)`. Its TopK SAE computes the same function as ours:

    ours     z = TopK(ReLU(W (x - b_dec) + b_enc)),    x_hat = z W_dec + b_dec    W = encoder.weight [M, d]
    SAELens  z = ReLU(TopK((x - b_dec) W_enc + b_enc)), x_hat = z W_dec + b_dec    W_enc [d, M] = W^T

(ReLU and TopK commute: when fewer than k pre-activations are positive, the remaining picks are 0 either way.)
cfg.json is SAELens's 6.x config (`architecture: "topk"`, `apply_b_dec_to_input: true`, no activation
normalisation: our saved SAEs already take raw activations) with `metadata.hook_name`, the TransformerLens
hook that reads the same activations (`layers.3` -> `blocks.3.hook_resid_post`), or with
`--hook_names module` our module path itself.
"""

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from .errors import ConfigError
from .heldout import read_run_json
from .models import hookpoint_layer
from .sae import Sae
from .utils import atomic_write_bytes, atomic_write_json, exit_on_bad_input
from .version import __version__

FORMATS = ("saelens",)
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_CFG_FILE = "cfg.json"
# The SAELens config version written: 6.x configs are read as they are (older ones are converted on load).
SAELENS_FORMAT_VERSION = "6.0.0"

# Module paths inside a block and the TransformerLens hook that reads the same output.
_TL_BLOCK_HOOKS = {
    "mlp": "hook_mlp_out",
    "self_attn": "hook_attn_out",  # Llama, Mistral, Qwen, SmolLM2
    "attn": "hook_attn_out",  # GPT-2
    "attention": "hook_attn_out",  # GPT-NeoX (Pythia)
}
_TL_EMBED_HOOKS = ("embed_tokens", "wte", "embed_in")  # -> hook_embed
_SUB_MODULE = re.compile(r"layers\.(\d+)\.(\w+)")


def transformer_lens_hook(hookpoint: str) -> str | None:
    """The TransformerLens hook name of a hookpoint ('layers.3' -> 'blocks.3.hook_resid_post',
    'layers.3.mlp' -> 'blocks.3.hook_mlp_out'); None for a module TransformerLens has no hook for."""
    layer = hookpoint_layer(hookpoint)
    if layer is not None:
        return f"blocks.{layer}.hook_resid_post"
    match = _SUB_MODULE.fullmatch(hookpoint)
    if match and match.group(2) in _TL_BLOCK_HOOKS:
        return f"blocks.{match.group(1)}.{_TL_BLOCK_HOOKS[match.group(2)]}"
    if hookpoint in _TL_EMBED_HOOKS:
        return "hook_embed"
    return None


def saelens_files(sae: Sae, hook_name: str, run: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, cfg.json) of one SAE in SAELens's format."""
    if sae.W_dec is None:
        raise ConfigError("an SAE loaded without its decoder cannot be exported; load it with decoder=True")
    if sae.cfg.transcode or sae.W_skip is not None:
        raise ConfigError(
            f"{sae.hookpoint or 'this SAE'}: a TopK transcoder has no SAELens equivalent (sae-lens 6's "
            "transcoders are ReLU/JumpReLU, which would change its outputs); use the EleutherAI layout, "
            "which sparsify loads"
        )
    tensors = {
        "W_enc": sae.encoder.weight.data.T,
        "b_enc": sae.encoder.bias.data,
        "W_dec": sae.W_dec.data,
        "b_dec": sae.b_dec.data,
    }
    tensors = {name: t.detach().float().contiguous().cpu() for name, t in tensors.items()}
    bad = [name for name, t in tensors.items() if not t.isfinite().all()]
    if bad:
        raise ConfigError(
            f"the SAE for {sae.hookpoint} has non-finite values in {', '.join(bad)}: not exported"
        )
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # not trained by SAELens
        "model_name": run.get("model"),
        "hook_name": hook_name,
        "hook_head_index": None,
        "context_size": run.get("seq_len"),
        "dataset_path": run.get("dataset"),
        "model_from_pretrained_kwargs": {},
        "sae_core_hookpoint": sae.hookpoint,
        "sae_core_version": __version__,
    }
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.num_latents,
        "k": sae.cfg.k,
        "rescale_acts_by_decoder_norm": False,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    return tensors, cfg


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    fmt: str = "saelens",
    hookpoints: str | None = None,
    hook_names: str = "transformer_lens",
) -> list[Path]:
    """Write every SAE of `run_dir` (or those matching the glob `hookpoints`) to `out` in format `fmt`;
    returns the folders written. `out` must be new or empty: an export never overwrites files."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if hook_names not in ("transformer_lens", "module"):
        raise ConfigError(f"hook_names must be 'transformer_lens' or 'module', got {hook_names!r}")
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder; pass a run folder holding <hookpoint>/cfg.json files")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty folder; choose a new output folder")
    saes = Sae.load_many_from_disk(run_dir, [hookpoints] if hookpoints else None)
    names = {h: transformer_lens_hook(h) if hook_names == "transformer_lens" else h for h in saes}
    missing = [h for h, name in names.items() if name is None]
    if missing:
        raise ConfigError(
            f"TransformerLens has no hook for {', '.join(missing)}; pass --hook_names module to name the "
            "SAEs by their module path, or --hookpoints to export others"
        )
    run = read_run_json(run_dir / "run.json")  # model, dataset, context: SAELens's metadata
    # Every SAE checked (finite, decoder present) before the first file is written.
    files = {h: saelens_files(sae, names[h], run) for h, sae in saes.items()}
    written = []
    for h, (tensors, cfg) in files.items():
        folder = out / h
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / SAELENS_WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
        atomic_write_json(folder / SAELENS_CFG_FILE, cfg)
        written.append(folder)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sae_core.export", description="Export a run's SAEs to another library's format."
    )
    p.add_argument("run_dir", help="a run folder (or any folder of <hookpoint>/cfg.json + sae.safetensors)")
    p.add_argument("--format", choices=FORMATS, required=True, help="the target format")
    p.add_argument("--out", required=True, help="output folder (new or empty); one sub-folder per hookpoint")
    p.add_argument("--hookpoints", default=None, help="glob of the hookpoints to export (default: all)")
    p.add_argument(
        "--hook_names",
        choices=("transformer_lens", "module"),
        default="transformer_lens",
        help="metadata.hook_name: the TransformerLens hook (blocks.3.hook_resid_post) or our module path",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_bad_input():
        written = export_run(
            args.run_dir, args.out, fmt=args.format, hookpoints=args.hookpoints, hook_names=args.hook_names
        )
    for folder in written:
        cfg = json.loads((folder / SAELENS_CFG_FILE).read_text())
        print(f"wrote {folder} (hook_name {cfg['metadata']['hook_name']})")


if __name__ == "__main__":
    main()
