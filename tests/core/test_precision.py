"""--tf32: set only on CUDA, only while training steps, and put back after."""

import torch

from sae_core.precision import tf32_matmuls
from sae_core.run import parse_run_config
from tests.support.training import make_trainer, params


def test_tf32_is_set_on_cuda_only_inside_and_restored():
    before = torch.backends.cuda.matmul.allow_tf32  # the flag exists (and may be set) without a GPU
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with tf32_matmuls(True, "cuda:0"):
            assert torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        with tf32_matmuls(True, torch.device("cpu")):
            assert not torch.backends.cuda.matmul.allow_tf32  # CPU: nothing is set
        torch.backends.cuda.matmul.allow_tf32 = True
        with tf32_matmuls(False, "cuda"):
            assert not torch.backends.cuda.matmul.allow_tf32  # off means exact, whatever the process set
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_tf32_on_a_cpu_run_changes_nothing(tmp_path):
    assert parse_run_config(["some-model", "--tf32", "true"]).tf32 is True
    assert parse_run_config(["some-model"]).tf32 is False
    weights = []
    for tf32 in (False, True):
        trainer = make_trainer(tmp_path, run_name=f"tf32-{tf32}", tf32=tf32)
        trainer.fit(max_steps=2)
        weights.append(params(trainer))
    for name, ref in weights[0].items():
        assert torch.equal(weights[1][name], ref), name
