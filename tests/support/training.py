"""Training on tiny data: trainers built in-process, and real torchrun launches of the CLI (gloo, CPU)."""

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae_core import SaeConfig, SaeTrainer, TrainConfig
from tests.support.processes import free_port
from tests.support.tiny import child_env, tiny_model


def token_data(n_seq=32, seq_len=16, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n_seq, seq_len), generator=g)
    ids[:, 0] = 0  # BOS, excluded by default
    return ids


class Tok:
    bos_token_id, pad_token_id, eos_token_id = 0, 2, 1


def make_trainer(tmp_path, model=None, data=None, run_name="run", resume=False, **kw):
    cfg = TrainConfig(
        SaeConfig(expansion_factor=4, k=4),
        **{"batch_size": 4, "lr_warmup_steps": 2, "save_dir": str(tmp_path), "run_name": run_name, **kw},
    )
    return SaeTrainer(
        cfg,
        data if data is not None else token_data(),
        model or tiny_model(),
        tokenizer=Tok(),
        resume=resume,
        progress=False,
    )


def params(trainer):
    return {f"{h}/{n}": p.detach().clone() for h, s in trainer.saes.items() for n, p in s.named_parameters()}


COMMON = [
    "--device",
    "cpu",
    "--ctx_len",
    "32",
    "--expansion_factor",
    "4",
    "--k",
    "4",
    "--lr_warmup_steps",
    "2",
    # Runs are compared across rank counts, whose gradient sums add in different orders: Adam turns that
    # rounding into parameter differences proportional to the LR (the tiny models' default is 0.036).
    "--lr",
    "1e-3",
    "--shuffle_seed",
    "none",
    "--log_every",
    "1",
]


def env():
    return child_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


def torchrun(nproc: int, *extra: str, entry: Sequence[str] = ("-m", "sae_core")) -> list[str]:
    """torchrun on `nproc` local ranks with a free rendezvous port; `entry` is what each rank runs."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        *entry,
        *extra,
    ]


def run(cmd, timeout=240) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    return p


def check(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]


def sae_params(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for hook in sorted(p for p in run_dir.iterdir() if (p / "sae.safetensors").exists()):
        for k, v in load_file(hook / "sae.safetensors").items():
            out[f"{hook.name}/{k}"] = v
    return out
