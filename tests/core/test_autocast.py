"""`torch.autocast` around an SAE: the fused encoder takes autocast's dtype; decode and losses stay fp32."""

import contextlib

import pytest
import torch

from sae_core import Sae, SaeConfig, TrainConfig
from sae_core.errors import ConfigError
from sae_core.kernels import encoder_compute_dtype, topk_encode

BF16_AUTOCAST = ("cpu", torch.bfloat16)


def forward_and_grads(sae, x, dead_mask, *, region=None, backward_in_region=True, **kwargs):
    """One forward of (fvu + auxk) and its backward; the region (an autocast context or nothing) encloses
    the forward, and also the backward when `backward_in_region`."""
    sae.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with region if region is not None else contextlib.nullcontext():
        out = sae(x, dead_mask, **kwargs)
        loss = out.fvu + out.auxk_loss
        if backward_in_region:
            loss.backward()
    if not backward_in_region:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    grads["x"] = x.grad.clone()
    return out, grads


@pytest.fixture
def sae_and_batch():
    torch.manual_seed(0)
    sae = Sae(32, SaeConfig(num_latents=128, k=8))
    x = torch.randn(96, 32) * 3
    dead = torch.zeros(sae.num_latents, dtype=torch.bool)
    dead[::3] = True  # AuxK on, so its products and gradients are covered too
    return sae, x, dead


def assert_identical(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    for name, t_a, t_b in zip(out_a._fields, out_a, out_b):
        assert (t_a is None and t_b is None) or torch.equal(t_a, t_b), name
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("backward_in_region", [True, False])
def test_autocast_bf16_equals_compute_dtype_bf16_and_differs_from_fp32(sae_and_batch, backward_in_region):
    sae, x, dead = sae_and_batch
    autocast = forward_and_grads(
        sae, x, dead, region=torch.autocast(*BF16_AUTOCAST), backward_in_region=backward_in_region
    )
    explicit = forward_and_grads(sae, x, dead, compute_dtype=torch.bfloat16)
    fp32 = forward_and_grads(sae, x, dead)

    assert_identical(autocast, explicit)
    # bf16 products really happened: the encoder's activations and the loss moved away from fp32's.
    assert not torch.equal(autocast[0].latent_acts, fp32[0].latent_acts)
    assert autocast[0].fvu.item() != fp32[0].fvu.item()
    assert not torch.equal(autocast[1]["encoder.weight"], fp32[1]["encoder.weight"])
    # The decode and the losses stay in the parameters' dtype, as with compute_dtype.
    assert {t.dtype for t in autocast[0] if t is not None and t.is_floating_point()} == {torch.float32}
    assert {g.dtype for g in autocast[1].values()} == {torch.float32}


def test_explicit_compute_dtype_wins_over_autocast(sae_and_batch):
    sae, x, dead = sae_and_batch
    fp32_in_autocast = forward_and_grads(
        sae, x, dead, region=torch.autocast(*BF16_AUTOCAST), compute_dtype=torch.float32
    )
    assert_identical(fp32_in_autocast, forward_and_grads(sae, x, dead))


def test_without_autocast_the_encoder_is_unchanged(sae_and_batch):
    """No autocast, or a disabled one, computes in the input's dtype: the same as compute_dtype=float32."""
    sae, x, dead = sae_and_batch
    plain = forward_and_grads(sae, x, dead)
    assert_identical(plain, forward_and_grads(sae, x, dead, compute_dtype=torch.float32))
    disabled = torch.autocast(*BF16_AUTOCAST, enabled=False)
    assert_identical(plain, forward_and_grads(sae, x, dead, region=disabled))


def test_topk_encode_under_autocast_equals_compute_dtype():
    torch.manual_seed(0)
    x, w, b = torch.randn(40, 16), torch.randn(64, 16), torch.randn(64)
    dead = torch.arange(0, 64, 4)
    with torch.autocast(*BF16_AUTOCAST):
        got = topk_encode(x, w, b, 5, dead, 6)
    want = topk_encode(x, w, b, 5, dead, 6, compute_dtype=torch.bfloat16)
    for name, g, t in zip(got._fields, got, want):
        assert torch.equal(g, t), name


def test_auto_compute_dtype_is_exact_on_cpu_and_explicit_settings_are_kept():
    assert encoder_compute_dtype("auto", "cpu") is None
    assert encoder_compute_dtype("float32", "cpu") is None
    assert encoder_compute_dtype(None, "cpu") is None  # configs saved before "auto" existed
    assert encoder_compute_dtype("bfloat16", "cpu") is torch.bfloat16
    assert encoder_compute_dtype("float16", "cuda") is torch.float16
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if torch.cuda.is_available():
        assert encoder_compute_dtype("auto", "cuda:0") is expected


def test_a_typo_in_autocast_is_a_one_line_error():
    with pytest.raises(
        ConfigError, match="autocast must be one of auto, bfloat16, float16, float32, got 'bf61'"
    ):
        TrainConfig(autocast="bf61")
