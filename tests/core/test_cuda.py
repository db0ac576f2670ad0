"""The CUDA path against the CPU path: kernels, the SAE, the trainer, resume, evaluation and the CLI.

Skipped where there is no GPU (CI); `bash benchmarks/gpu.sh` runs this file on a GPU machine.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sae_core import Sae, SaeConfig, kernels
from sae_core.evaluate import evaluate
from sae_core.kernels import sparse_decode, topk_encode
from tests.support.reference import dense_decode
from tests.support.tiny import child_env, tiny_model
from tests.support.training import make_trainer, params, token_data

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would make every CUDA fp32 product differ from the CPU's at the 1e-3 level."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("method", ["csr", "index_add", "embedding_bag"])
def test_encoder_with_auxk_matches_plain_autograd_on_cuda(method, monkeypatch):
    monkeypatch.setitem(kernels.GRAD_W_METHOD, "cuda", method)
    g = torch.Generator(device=CUDA).manual_seed(0)
    n, d, m, k, k_aux = 300, 48, 512, 8, 16
    x = torch.randn(n, d, device=CUDA, generator=g).requires_grad_()
    w = torch.randn(m, d, device=CUDA, generator=g).requires_grad_()
    b = torch.randn(m, device=CUDA, generator=g).requires_grad_()
    dead = torch.randperm(m, device=CUDA, generator=g)[:100]
    up, up_aux = torch.randn(n, k, device=CUDA, generator=g), torch.randn(n, k_aux, device=CUDA, generator=g)

    def sorted_pairs(acts, idx):
        order = idx.argsort(dim=1)
        return acts.gather(1, order), idx.gather(1, order)

    out = topk_encode(x, w, b, k, dead, k_aux)
    acts, idx = sorted_pairs(out.acts, out.indices)
    aux, aux_idx = sorted_pairs(out.aux_acts, out.aux_indices)
    ((acts * up).sum() + (aux * up_aux).sum()).backward()
    got = [t.grad.clone() for t in (x, w, b)]

    for t in (x, w, b):
        t.grad = None
    pre = F.relu(x @ w.T + b)
    ref, ref_idx = sorted_pairs(*pre.topk(k, dim=1))
    ref_aux, pos = pre[:, dead].topk(k_aux, dim=1)
    ref_aux, ref_aux_idx = sorted_pairs(ref_aux, dead[pos])
    ((ref * up).sum() + (ref_aux * up_aux).sum()).backward()
    assert torch.equal(idx, ref_idx) and torch.equal(aux_idx, ref_aux_idx)
    torch.testing.assert_close(acts, ref)
    torch.testing.assert_close(aux, ref_aux)
    for mine, t in zip(got, (x, w, b)):
        torch.testing.assert_close(mine, t.grad, rtol=1e-4, atol=1e-4)


def test_sparse_decode_matches_dense_on_cuda():
    g = torch.Generator(device=CUDA).manual_seed(0)
    acts, idx = (
        torch.rand(200, 8, device=CUDA, generator=g),
        torch.randint(0, 256, (200, 8), device=CUDA, generator=g),
    )
    w, b = torch.randn(256, 32, device=CUDA, generator=g), torch.randn(32, device=CUDA, generator=g)
    torch.testing.assert_close(
        sparse_decode(acts, idx, w, b), dense_decode(acts, idx, w, b), rtol=1e-5, atol=1e-5
    )


def test_the_same_seed_gives_the_same_sae_on_cpu_and_cuda():
    torch.manual_seed(3)
    cpu = Sae(32, SaeConfig(expansion_factor=4, k=4))
    torch.manual_seed(3)
    gpu = Sae(32, SaeConfig(expansion_factor=4, k=4), device=CUDA)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        if name == "W_dec":  # row normalisation rounds differently on the GPU
            torch.testing.assert_close(q.cpu(), p, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(q.cpu(), p), name


def test_sae_forward_and_gradients_equal_the_cpu_ones():
    torch.manual_seed(0)
    cpu = Sae(64, SaeConfig(expansion_factor=8, k=16))
    gpu = Sae(64, SaeConfig(expansion_factor=8, k=16), device=CUDA)
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(500, 64) * 3 + 1
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::3] = True
    outs = []
    for sae, dev in ((cpu, "cpu"), (gpu, CUDA)):
        out = sae(x.to(dev), dead.to(dev))
        (out.fvu + out.auxk_loss / 32).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].fvu.cpu(), outs[0].fvu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1].auxk_loss.cpu(), outs[0].auxk_loss, rtol=1e-4, atol=1e-6)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_follows_the_model_device_and_matches_the_cpu_run(tmp_path):
    data = token_data(n_seq=64, vocab=40)
    cpu = make_trainer(tmp_path, data=data, run_name="cpu", lr=3e-3, log_every=1)
    assert cpu.ctx.device.type == "cpu"  # a CPU model on a GPU machine stays on the CPU
    cpu.fit()
    gpu = make_trainer(
        tmp_path,
        model=tiny_model().to(CUDA),
        data=data,
        run_name="gpu",
        lr=3e-3,
        log_every=1,
        profile=True,  # run.json records the CUDA peak only when profiling
        autocast="float32",  # the exact path, compared with the CPU's ("auto" would be bf16 on the GPU)
    )
    assert gpu.ctx.device.type == "cuda"
    gpu.fit()
    assert all(p.is_cuda for s in gpu.saes.values() for p in s.parameters())
    lines = {
        r: [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("cpu", "gpu")
    }
    assert len(lines["cpu"]) == len(lines["gpu"]) == 16
    fvus = [k for k in lines["cpu"][0] if k.startswith("fvu/")]
    for key in fvus:
        # Same init, same data: the first step (before any update) agrees to float rounding. After it, Adam's
        # first updates are ~lr * sign(grad), so gradients that are ~0 flip with summation order and the runs
        # part a little; both must still learn to the same level.
        assert lines["gpu"][0][key] == pytest.approx(lines["cpu"][0][key], rel=1e-4), key
        assert lines["gpu"][-1][key] == pytest.approx(lines["cpu"][-1][key], rel=0.05), key
        assert lines["gpu"][-1][key] < 0.95 * lines["gpu"][0][key], key
    run = json.loads((tmp_path / "gpu" / "run.json").read_text())
    assert run["peak_memory_mb_per_rank"][0]["cuda"] > 0


def test_resume_on_cuda_reaches_the_uninterrupted_parameters(tmp_path):
    data = token_data(n_seq=48)
    full = make_trainer(tmp_path, model=tiny_model().to(CUDA), data=data, run_name="full")
    full.fit()
    part = make_trainer(tmp_path, model=tiny_model().to(CUDA), data=data, run_name="cut", save_every=1)
    part.fit(max_steps=5)
    resumed = make_trainer(tmp_path, model=tiny_model().to(CUDA), data=data, run_name="cut", resume=True)
    assert resumed.step == 5
    resumed.fit()
    a, b = params(full), params(resumed)
    for key in a:  # CUDA index_add is atomic, so summation order (not the result) may differ
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_evaluate_on_cuda_equals_evaluate_on_cpu():
    torch.manual_seed(0)
    model = tiny_model(d=32).float()
    sae = Sae(32, SaeConfig(expansion_factor=4, k=8), hookpoint="layers.1")
    ids = token_data(n_seq=6, seq_len=24)
    on_cpu = evaluate(model, {"layers.1": sae}, ids, exclude_tokens=[0]).hookpoints["layers.1"]
    gpu_sae = Sae(32, SaeConfig(expansion_factor=4, k=8), device=CUDA, hookpoint="layers.1")
    gpu_sae.load_state_dict(sae.state_dict())
    on_gpu = evaluate(model.to(CUDA), {"layers.1": gpu_sae}, ids, exclude_tokens=[0]).hookpoints["layers.1"]
    for key in ("fvu", "mse", "cosine", "l0", "ce_clean", "ce_sae", "kl", "delta_ce"):
        assert on_gpu[key] == pytest.approx(on_cpu[key], rel=1e-3, abs=1e-5), key


def test_cli_trains_and_evaluates_on_cuda(tmp_path, tiny_model_dir, tiny_text_file):
    env = child_env()
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_core",
            str(tiny_model_dir),
            str(tiny_text_file),
            "--device",
            "cuda",
            "--ctx_len",
            "32",
            "--batch_size",
            "4",
            "--expansion_factor",
            "2",
            "--k",
            "4",
            "--max_tokens",
            "1024",
            "--lr_warmup_steps",
            "1",
            "--save_dir",
            str(tmp_path),
            "--run_name",
            "r",
            "--autocast",
            "bfloat16",
            "--profile",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["peak_memory_mb_per_rank"][0]["cuda"] > 0
    sae = Sae.load_from_disk(tmp_path / "r" / "layers.1", device="cuda")
    assert sae.W_dec.is_cuda
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_core.evaluate",
            str(tiny_model_dir),
            str(tmp_path / "r"),
            "--device",
            "cuda",
            "--max_tokens",
            "256",
            "--batch_size",
            "4",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "eval" / "report.json").read_text())
    assert all(0 < m["fvu"] < 2 and m["kl"] >= 0 for m in report["hookpoints"].values())
