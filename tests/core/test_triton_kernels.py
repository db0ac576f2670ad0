"""sae_core/triton_kernels.py against the torch kernels it stands in for (sae_core/kernels.py): values and
gradients.

Without a GPU the kernels run under Triton's interpreter, which must be switched on before triton is first
imported in the process (triton's own jit functions, tl.topk among them, are built at its import): this module
sets TRITON_INTERPRET=1 at import, which pytest does at collection, before any test runs. Should triton have
been imported without it all the same, the checks run again in a fresh process (test_in_fresh_process). On a
GPU machine nothing is interpreted: the same tests run compiled on CUDA tensors. The interpreter is slow
(~0.1 s per program of a top-k), hence tiny shapes and tiles (BLOCKS) that still cross every tile edge.
"""

import os
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # left set: triton's lazily imported parts assert it stays so
triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' on Linux)")

from sae_core import Sae, SaeConfig, SaeTrainer, TrainConfig, kernels  # noqa: E402
from sae_core import triton_kernels as tk  # noqa: E402
from sae_core.errors import ConfigError  # noqa: E402
from sae_core.fused_optim import fused_decoder_kernels, step_with_fused_decoder  # noqa: E402
from sae_core.optim import SaeOptimizer, ScheduleFreeAdam  # noqa: E402
from sae_core.run import parse_run_config  # noqa: E402
from tests.support.tiny import child_env, tiny_model  # noqa: E402
from tests.support.training import Tok, params, token_data  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# False where triton was imported before this module without the interpreter (then only the fresh-process
# test runs).
READY = ON_GPU or type(triton.language.topk).__name__ == "InterpretedFunction"
needs_kernels = pytest.mark.skipif(
    not READY, reason="triton was imported uninterpreted: test_in_fresh_process runs this test"
)
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles smaller than the shapes, which are not multiples of them: every kernel crosses tile edges."""
    small = {"tokens": 4, "d": 8, "slots": 4, "entries": 4, "latents": 16}
    for name, size in small.items():
        monkeypatch.setitem(tk.BLOCKS, name, size)
    if ON_GPU:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the torch reference must be exact fp32
        yield
        torch.backends.cuda.matmul.allow_tf32 = old
    else:
        yield


def generator(seed: int = 0) -> torch.Generator:
    """A CPU generator: the same data on CPU and GPU (the GPU run has the ties the CPU run has, no others)."""
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


# ------------------------------------------------------------------------------------------------ top-k
def check_topk(got_vals, got_idx, pre, ref_vals, n_valid, candidates=None):
    """got_* are a valid top-k of pre: torch's values after the ReLU, largest first, at the first n_valid
    slots distinct indices (among `candidates`) that hold them (ties may pick other indices than torch's)."""
    torch.testing.assert_close(got_vals, ref_vals.float().relu(), rtol=0, atol=0)
    assert torch.equal(got_vals, got_vals.sort(dim=1, descending=True).values)
    idx = got_idx[:, :n_valid]
    torch.testing.assert_close(pre.float().gather(1, idx).relu(), got_vals[:, :n_valid], rtol=0, atol=0)
    assert all(row.unique().numel() == n_valid for row in idx)
    if candidates is not None:
        assert candidates[idx].all()


@needs_kernels
@pytest.mark.parametrize(
    "dtype, n_dead", [(torch.float32, 5), (torch.float32, 0), (torch.bfloat16, 20)], ids=str
)
def test_topk_with_relu_and_auxk_matches_torch(dtype, n_dead):
    g = generator()
    n, m, k, k_aux = 3, 37, 6, 8  # tiles of 32 latents (4 x the padded k_aux), the last one partial
    pre = randn(n, m, g=g, dtype=dtype)
    pre[0, 20:35] = 0.5  # ties across the tile edge at 32
    pre[1] = -pre[1].abs()
    pre[1, [7, 30]] = 1.0  # two positive pre-activations, k = 6: four zeros after the ReLU
    dead = torch.zeros(m, dtype=torch.bool, device=DEVICE)
    dead[torch.randperm(m, generator=g).to(DEVICE)[:n_dead]] = True

    acts, idx, aux, aux_idx = tk.topk_relu(pre, k, dead, k_aux)

    check_topk(acts, idx, pre, pre.topk(k, dim=1).values, k)
    assert acts[1, :2].tolist() == [1.0, 1.0] and sorted(idx[1, :2].tolist()) == [7, 30]
    assert (acts[1, 2:] == 0).all()
    # AuxK: the top k_aux among the dead latents only; slots beyond them hold 0.
    assert aux.shape == aux_idx.shape == (n, k_aux)
    ref_aux = torch.zeros(n, k_aux, device=DEVICE)
    if n_dead:
        top = pre[:, dead].topk(min(k_aux, n_dead), dim=1).values.float()
        ref_aux[:, : top.shape[1]] = top
    check_topk(aux, aux_idx, pre, ref_aux, min(k_aux, n_dead), candidates=dead)


@needs_kernels
def test_topk_without_auxk_and_merging_over_several_rounds():
    g = generator(1)
    pre = randn(2, 150, g=g)  # 10 tiles of 16 -> 40 candidates, then two merge rounds (16 each)
    acts, idx, aux, aux_idx = tk.topk_relu(pre, 3)
    check_topk(acts, idx, pre, pre.topk(3, dim=1).values, 3)
    assert aux.shape == aux_idx.shape == (2, 0)


# ------------------------------------------------------------------------------------------------ gathers
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_decode_and_its_gradients_match_torch(dtype):
    g = generator(2)
    n, k, m, d = 7, 5, 23, 19
    idx = torch.randint(0, m, (n, k), generator=g).to(DEVICE)
    idx[0, 1] = idx[0, 0]  # a latent twice in one token
    idx[1:, 4] = idx[0, 0]  # and one latent in many tokens: a long segment
    leaves = [randn(n, k, g=g).abs(), randn(m, d, g=g, dtype=dtype), randn(d, g=g, dtype=dtype)]
    upstream = randn(n, d, g=g, dtype=dtype)
    results = []
    for decode in (kernels.sparse_decode, tk.sparse_decode):
        acts, w, b = (t.detach().clone().requires_grad_() for t in leaves)
        out = decode(acts, idx, w, b)
        out.backward(upstream)
        results.append((out, acts.grad, w.grad, b.grad))
    for ref, got in zip(*results):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, **TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_encoder_gradients_match_the_torch_backward(dtype):
    """The sparse backward from the same selections as kernels._encoder_grads (the torch path's)."""
    g = generator(3)
    n, k, m, d = 6, 5, 29, 19
    ids = torch.randint(0, m, (n, k), generator=g).to(DEVICE)
    ids[:, 0] = 4  # one latent selected by every token
    vals, x, w = randn(n, k, g=g, dtype=dtype), randn(n, d, g=g, dtype=dtype), randn(m, d, g=g, dtype=dtype)
    # In fp32 (the CPU's sparse product has no bf16 kernel), rounded to the dtype as the kernels' sums are.
    ref_x, ref_w = kernels._encoder_grads(ids, vals.float(), x.float(), w.float(), need_x=True, need_w=True)
    ref_b = torch.zeros(m, device=DEVICE).index_add_(0, ids.reshape(-1), vals.float().reshape(-1))
    ref_x, ref_w, ref_b = ref_x.to(dtype), ref_w.to(dtype), ref_b.to(dtype)
    got_w, got_b = tk.segment_sum(ids, vals, x, m, with_sums=True)
    got_x = tk.gather_sum(vals, ids, w)
    for got, ref in ((got_x, ref_x), (got_w, ref_w), (got_b, ref_b)):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, **TOL[dtype])
    unselected = torch.ones(m, dtype=torch.bool, device=DEVICE)
    unselected[ids.reshape(-1)] = False
    assert (got_w[unselected] == 0).all() and (got_b[unselected] == 0).all()


def encoder_results(encode, x, w, b, k, dead, k_aux, compute_dtype, up, up_aux):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    out = encode(x, w, b, k, dead, k_aux, compute_dtype)
    # The torch path lists the selections in no particular order: compare them sorted by latent index.
    order, aux_order = out.indices.argsort(dim=1), out.aux_indices.argsort(dim=1)
    acts, aux = out.acts.gather(1, order), out.aux_acts.gather(1, aux_order)
    ((acts * up).sum() + (aux * up_aux[:, : aux.shape[1]]).sum()).backward()
    return {
        "acts": acts,
        "idx": out.indices.gather(1, order),
        "aux": aux,
        "aux_idx": out.aux_indices.gather(1, aux_order),
        "grad_x": x.grad,
        "grad_w": w.grad,
        "grad_b": b.grad,
    }


@needs_kernels
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16], ids=str)
def test_topk_encode_forward_and_backward_match_torch(compute_dtype):
    g = generator(4)
    n, d, m, k, k_aux = 3, 19, 37, 4, 6
    x, w, b = randn(n, d, g=g), randn(m, d, g=g), randn(m, g=g)
    dead = torch.zeros(m, dtype=torch.bool, device=DEVICE)
    dead[torch.randperm(m, generator=g).to(DEVICE)[:20]] = True  # more dead latents than k_aux
    up, up_aux = randn(n, k, g=g), randn(n, k_aux, g=g)
    dead_idx = dead.nonzero().squeeze(1)
    ref = encoder_results(kernels.topk_encode, x, w, b, k, dead_idx, k_aux, compute_dtype, up, up_aux)
    got = encoder_results(tk.topk_encode, x, w, b, k, dead, k_aux, compute_dtype, up, up_aux)
    assert torch.equal(got["idx"], ref["idx"]) and torch.equal(got["aux_idx"], ref["aux_idx"])
    for name in ("acts", "aux", "grad_x", "grad_w", "grad_b"):
        # Identical selections: the forward values are the same product's, the gradients sums in fp32.
        torch.testing.assert_close(got[name], ref[name], **TOL[torch.float32], msg=name)


def encode_decode_results(fused: bool, leaves, k, dead, k_aux, compute_dtype, weights, use_aux_out=True):
    """Outputs and gradients of encode + decode (+ AuxK's decode) under a loss weighing each output and each
    latent's activation by its index (so that the order of the selections does not matter)."""
    x, w_enc, b_enc, w_dec = (t.detach().clone().requires_grad_() for t in leaves)
    up, up_aux, per_latent, per_aux_latent = weights
    if fused:
        step = tk.encode_decode(x, w_enc, b_enc, w_dec, k, dead, k_aux, compute_dtype)
        out, acts, idx, aux_out, aux_acts, aux_idx = step
    else:
        enc = kernels.topk_encode(x, w_enc, b_enc, k, dead.nonzero().squeeze(1), k_aux, compute_dtype)
        acts, idx, aux_acts, aux_idx = enc
        out = kernels.sparse_decode(acts, idx, w_dec)
        aux_out = kernels.sparse_decode(aux_acts, aux_idx, w_dec) if aux_idx.shape[1] else None
    loss = (out * up).sum() + (acts * per_latent[idx]).sum() + (aux_acts * per_aux_latent[aux_idx]).sum()
    if aux_out is not None and use_aux_out:
        loss = loss + (aux_out * up_aux).sum()
    loss.backward()
    if aux_out is None:  # the torch path has no AuxK slot without dead latents: the same as a zero output
        aux_out = torch.zeros_like(out)
    return {
        "out": out,
        "aux_out": aux_out,
        **{f"grad_{i}": t.grad for i, t in enumerate((x, w_enc, b_enc, w_dec))},
    }


@needs_kernels
@pytest.mark.parametrize(
    "compute_dtype, n_dead, d_out",
    [(None, 20, 19), (None, 0, 19), (None, 3, 11), (torch.bfloat16, 20, 19)],
    ids=["fp32", "fp32-no-dead", "fp32-few-dead-transcoder", "bf16"],
)
def test_fused_backward_matches_torch_encode_then_decode(compute_dtype, n_dead, d_out):
    """One fused backward (both weight gradients from one sort, the input gradient, the latents' gradients)
    against the torch encoder and decoder: AuxK with more dead latents than k_aux, none, and fewer than k_aux
    (the Triton AuxK slots beyond them hold 0); a transcoder's output width; uneven tiles everywhere."""
    g = generator(7)
    n, d, m, k, k_aux = 5, 19, 37, 4, 6
    leaves = (randn(n, d, g=g), randn(m, d, g=g), randn(m, g=g), randn(m, d_out, g=g))
    dead = torch.zeros(m, dtype=torch.bool, device=DEVICE)
    dead[torch.randperm(m, generator=g).to(DEVICE)[:n_dead]] = True
    weights = (randn(n, d_out, g=g), randn(n, d_out, g=g), randn(m, g=g), randn(m, g=g))
    ref = encode_decode_results(False, leaves, k, dead, k_aux, compute_dtype, weights)
    got = encode_decode_results(True, leaves, k, dead, k_aux, compute_dtype, weights)
    for name, want in ref.items():
        assert got[name].dtype == want.dtype, name
        torch.testing.assert_close(got[name], want, **TOL[torch.float32], msg=name)
    assert (got["aux_out"].abs().sum() > 0) == (n_dead > 0)


@needs_kernels
def test_fused_backward_without_a_gradient_on_auxk_output():
    """AuxK selected latents, but the loss does not use its reconstruction (only its activations): AuxK's
    slots must add nothing to the decoder's gradient."""
    g = generator(9)
    n, d, m, k, k_aux = 5, 19, 37, 4, 6
    leaves = (randn(n, d, g=g), randn(m, d, g=g), randn(m, g=g), randn(m, d, g=g))
    dead = torch.zeros(m, dtype=torch.bool, device=DEVICE)
    dead[torch.randperm(m, generator=g).to(DEVICE)[:20]] = True
    weights = (randn(n, d, g=g), randn(n, d, g=g), randn(m, g=g), randn(m, g=g))
    ref = encode_decode_results(False, leaves, k, dead, k_aux, None, weights, use_aux_out=False)
    got = encode_decode_results(True, leaves, k, dead, k_aux, None, weights, use_aux_out=False)
    for name, want in ref.items():
        torch.testing.assert_close(got[name], want, **TOL[torch.float32], msg=name)


@needs_kernels
@pytest.mark.parametrize("n_dead", [0, 3])
def test_sae_step_with_triton_kernels_matches_torch(n_dead, monkeypatch):
    """The whole forward (FVU, AuxK with no dead latent and with fewer than k_aux) and every gradient."""
    monkeypatch.setitem(tk.BLOCKS, "latents", 64)  # one tile: tile edges are tested above, this is the wiring
    g = generator(5)
    x = randn(4, 16, g=g)
    dead = torch.zeros(48, dtype=torch.bool, device=DEVICE)
    dead[torch.randperm(48, generator=g).to(DEVICE)[:n_dead]] = True
    results = []
    for name in ("torch", "triton"):
        torch.manual_seed(0)
        sae = Sae(16, SaeConfig(num_latents=48, k=4, kernels=name), device=DEVICE)
        out = sae(x, dead)
        (out.fvu + out.auxk_loss).backward()
        results.append((out.fvu, out.auxk_loss, *(p.grad for p in sae.parameters())))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (results[1][1] > 0) == (n_dead > 0)


# -------------------------------------------------------------------------------------------- decoder step
@needs_kernels
def test_fused_decoder_step_matches_radial_removal_schedule_free_adam_and_renormalisation():
    g = generator(6)
    m, d = 5, 19  # rows of 19 columns in tiles of 32
    sae_like = torch.nn.Linear(d, m, bias=False).to(DEVICE)  # its weight plays W_dec
    w = sae_like.weight
    with torch.no_grad():
        w /= w.norm(dim=1, keepdim=True)
    opt = ScheduleFreeAdam([w], lr=0.05)
    for step in range(3):  # the third step is compared: the state holds z and a non-zero second moment
        w.grad = randn(m, d, g=g)
        if step < 2:
            opt.step()
            continue
        group = opt.param_groups[0]
        y, z, v, grad = (
            t.detach().clone() for t in (w, opt.state[w]["z"], opt.state[w]["exp_avg_sq"], w.grad)
        )
        # The torch path, as the trainer runs it.
        parallel = (w.grad * w).sum(1, keepdim=True)
        w.grad -= parallel * w
        opt.step()
        with torch.no_grad():
            w /= w.norm(dim=1, keepdim=True) + torch.finfo(w.dtype).eps
        beta1, beta2 = group["betas"]
        c, bias2 = opt.step_coefficients(group)
        tk.decoder_schedule_free_step(
            y,
            grad,
            z,
            v,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            c=c,
            bias2=bias2,
        )
        torch.testing.assert_close(y, w.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z, opt.state[w]["z"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, opt.state[w]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def unit_rows(m, d, g):
    w = randn(m, d, g=g)
    return w / w.norm(dim=1, keepdim=True)


@needs_kernels
@pytest.mark.parametrize("optimizer", ["schedule_free_adam", "adam"])
def test_step_with_fused_decoder_matches_the_torch_optimizer_step(optimizer):
    """fused_optim.step_with_fused_decoder against what the trainer's torch path does (radial removal, the
    optimizer's step, renormalisation) over three steps; the other parameters take the torch step; the state
    keeps torch's layout."""
    g = generator(8)
    m, d = 6, 19
    start = {"W_dec": unit_rows(m, d, g), "b_dec": randn(d, g=g)}
    grads = [{name: randn(*t.shape, g=g) for name, t in start.items()} for _ in range(3)]
    results = []
    for fused in (False, True):
        sae = torch.nn.Module()
        sae.W_dec, sae.b_dec = (torch.nn.Parameter(start[name].clone()) for name in ("W_dec", "b_dec"))
        sae.unit_norm_decoder, sae.cfg = True, SaeConfig(kernels="triton" if fused else "torch")
        opt = SaeOptimizer(optimizer, sae, lr=0.05)
        assert (fused_decoder_kernels(sae, opt) is not None) == fused
        for step_grads in grads:
            for name, grad in step_grads.items():
                getattr(sae, name).grad = grad.clone()
            if fused:
                step_with_fused_decoder(opt, sae.W_dec, tk)
            else:
                sae.W_dec.grad -= (sae.W_dec.grad * sae.W_dec).sum(1, keepdim=True) * sae.W_dec.detach()
                opt.step()
                with torch.no_grad():
                    sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
            opt.zero_grad()
        results.append((sae, opt.state_dict()))
    (ref, ref_state), (got, got_state) = results
    for name in ("W_dec", "b_dec"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-6)
    for i, state in ref_state["state"].items():
        assert got_state["state"][i].keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(got_state["state"][i][key], value, rtol=1e-5, atol=1e-7, msg=key)


@needs_kernels
def test_training_with_triton_kernels_gives_the_torch_weights(tmp_path, monkeypatch):
    """Three trainer steps on a tiny model (schedule-free Adam, the default; AuxK on from the second step)
    with --kernels triton (the fused encode/decode backward and the fused decoder step) end at the weights
    --kernels torch reaches (Adam's: test_step_with_fused_decoder_matches_the_torch_optimizer_step).
    """
    for name, size in {"tokens": 16, "d": 32, "slots": 8, "entries": 16, "latents": 128}.items():
        monkeypatch.setitem(tk.BLOCKS, name, size)  # the interpreter's cost is per program: few, large tiles
    weights, metrics = [], []
    for kernels_setting in ("torch", "triton"):
        cfg = TrainConfig(
            SaeConfig(expansion_factor=4, k=4, kernels=kernels_setting),
            batch_size=2,
            lr_warmup_steps=1,
            save_dir=str(tmp_path),
            run_name=kernels_setting,
        )
        data = token_data(n_seq=16, seq_len=8)  # 14 tokens a step (BOS excluded): 42 top-k programs in all
        model = tiny_model(n_layers=1).to(DEVICE)  # the trainer follows the model's device
        trainer = SaeTrainer(cfg, data, model, tokenizer=Tok(), progress=False)
        metrics.append(trainer.fit(max_steps=3))
        weights.append(params(trainer))
    assert metrics[1]["auxk/layers.0"] > 0 and metrics[1]["skipped_steps"] == 0
    torch.testing.assert_close(metrics[1]["fvu/layers.0"], metrics[0]["fvu/layers.0"], rtol=1e-5, atol=0)
    assert weights[0].keys() == weights[1].keys()
    for name, ref in weights[0].items():
        torch.testing.assert_close(weights[1][name], ref, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------------ errors
def test_kernels_setting_is_checked_and_not_saved(tmp_path):
    with pytest.raises(ConfigError, match="kernels must be one of auto, torch, triton"):
        SaeConfig(kernels="cuda")
    with pytest.raises(ConfigError, match="--shard_latents runs the torch kernels only"):
        TrainConfig(SaeConfig(kernels="triton"), shard_latents=2)
    assert parse_run_config(["some-model", "--kernels", "triton"]).sae.kernels == "triton"
    sae = Sae(8, SaeConfig(num_latents=16, k=2, kernels="triton"))
    sae.save_to_disk(tmp_path)
    loaded = Sae.load_from_disk(tmp_path)
    assert loaded.cfg.kernels == "auto" and "kernels" not in sae.cfg_dict()


def test_triton_on_a_cpu_tensor_without_the_interpreter_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(tk, "INTERPRETED", False)
    sae = Sae(8, SaeConfig(num_latents=16, k=2, kernels="triton"))
    with pytest.raises(ConfigError, match="runs on CUDA tensors .* use --kernels torch") as e:
        sae(torch.randn(3, 8))
    assert "\n" not in str(e.value)


def test_triton_missing_is_a_one_line_error(monkeypatch):
    import sae_core

    monkeypatch.setitem(sys.modules, "sae_core.triton_kernels", None)  # what `import` does when it is absent
    monkeypatch.delattr(sae_core, "triton_kernels")
    with pytest.raises(ConfigError, match=r"--kernels triton needs the triton package .*--kernels torch"):
        kernels.triton_kernels("triton")
    assert kernels.triton_kernels("auto") is None and kernels.triton_kernels("torch") is None


@pytest.mark.skipif(READY, reason="the kernels ran in this process")
def test_in_fresh_process():
    """triton was imported before this module without the interpreter: run the checks where it is not."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=child_env(TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
