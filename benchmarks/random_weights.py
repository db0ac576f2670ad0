"""Save a model with the architecture of CONFIG_DIR and random weights, with CONFIG_DIR's tokenizer.

    python benchmarks/random_weights.py CONFIG_DIR OUT_DIR [--dtype bfloat16]

For throughput runs on a machine the real weights cannot reach (a GPU machine with no network): the speed of
the LM forward and of the SAE steps does not depend on the weights' values. Its FVUs mean nothing.
"""

import argparse
import shutil
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config_dir", type=Path, help="folder with config.json and the tokenizer files")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(args.config_dir)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out_dir)
    for f in args.config_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, args.out_dir / f.name)
    print(f"{args.out_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M random parameters")


if __name__ == "__main__":
    main()
