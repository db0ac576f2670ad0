"""The TopK sparse autoencoder (Gao et al. 2024): a model that saves and loads itself.

    pre     = ReLU(W_enc (x - b_dec) + b_enc)          # [N, M], the only dense product
    z       = TopK(pre, k)                             # k (value, index) pairs per token
    x_hat   = sum_j z_j W_dec[idx_j] + b_dec           # sparse decode, rows of W_dec at unit norm

Losses (definitions in docs/metrics.md): FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, and AuxK,
which reconstructs the detached residual from the top k_aux pre-activations of dead latents (no b_dec)
so that dead latents receive gradient again.

A transcoder (cfg.transcode, as in EleutherAI sparsify) encodes a module's input and predicts its output:

    pre     = ReLU(W_enc x + b_enc)                    # no b_dec: it lives in the output space
    y_hat   = sum_j z_j W_dec[idx_j] + b_dec (+ x W_skip^T with cfg.skip_connection)

with W_dec [M, d_out] starting at zero and free (not kept at unit norm), and FVU against the output y.
"""

import fnmatch
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from .config import SaeConfig
from .download import download_saes
from .errors import ConfigError, SaeLoadError
from .kernels import EncoderOutput, sparse_decode, topk_encode, triton_kernels
from .models import (
    CFG_FILE,
    SAE_FILE,
    hookpoint_aliases,
    hookpoint_layer,
    list_hookpoints,
)
from .utils import atomic_write_bytes, atomic_write_json, first_line
from .version import __version__

TENSOR_NAMES = ("encoder.weight", "encoder.bias", "W_dec", "b_dec", "W_skip")


class ForwardOutput(NamedTuple):
    sae_out: Tensor  # [N, d] reconstruction
    latent_acts: Tensor  # [N, k] values of the active latents
    latent_indices: Tensor  # [N, k] their indices
    fvu: Tensor  # scalar, fraction of variance unexplained (fp32)
    auxk_loss: Tensor  # scalar, AuxK loss (0 when no latent is dead)
    # scalar, FVU of the reconstruction from the top 4k latents (forward(multi_topk=True) only)
    multi_topk_fvu: Tensor | None = None


class Sae(nn.Module):
    def __init__(
        self,
        d_in: int,
        cfg: SaeConfig | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        decoder: bool = True,
        hookpoint: str | None = None,
        d_out: int | None = None,
    ):
        super().__init__()
        if not isinstance(d_in, int) or d_in <= 0:
            raise ConfigError(f"d_in must be a positive integer (the model's hidden size), got {d_in!r}")
        self.cfg = cfg = cfg if cfg is not None else SaeConfig()
        d_out = d_in if d_out is None else d_out
        if not isinstance(d_out, int) or d_out <= 0 or (d_out != d_in and not cfg.transcode):
            raise ConfigError(f"d_out={d_out!r}: an autoencoder's output width is its d_in={d_in}")
        self.d_in, self.d_out = d_in, d_out
        self.hookpoint = hookpoint
        # The trainer's k while --k_decay_steps decays it (None: cfg.k); cfg.k, the one saved, stays final.
        self.k_override: int | None = None
        num_latents = cfg.latents_for(d_in)

        # Initialised on the CPU in float32, then moved: the same seed gives the same SAE on every device.
        self.encoder = nn.Linear(d_in, num_latents).to(device=device, dtype=dtype)
        self.encoder.bias.data.zero_()
        # An SAE's decoder starts as the (row-normalised) transpose of the encoder, as in Gao et al.; a
        # transcoder's at zero, as in sparsify (its output space is not its input's).
        dtype = self.encoder.weight.dtype
        self.W_dec = None
        if decoder and cfg.transcode:
            self.W_dec = nn.Parameter(torch.zeros(num_latents, d_out, dtype=dtype, device=device))
        elif decoder:
            self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
            if cfg.normalize_decoder:
                self.set_decoder_norm_to_unit_norm()
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        # sparsify's layout: y_hat += x @ W_skip.T, so W_skip is [d_out, d_in].
        self.W_skip = (
            nn.Parameter(torch.zeros(d_out, d_in, dtype=dtype, device=device))
            if cfg.skip_connection
            else None
        )

    # ---------------------------------------------------------------- properties
    @property
    def k(self) -> int:
        """Latents active per token in `encode`."""
        return self.cfg.k if self.k_override is None else self.k_override

    @property
    def num_latents(self) -> int:
        return self.encoder.out_features

    @property
    def k_aux(self) -> int:
        """Number of dead latents used by AuxK per token (Gao et al.: d_in / 2; the output width's half for
        a transcoder, as sparsify)."""
        return max(self.d_out // 2, 1)

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether training keeps the decoder rows at unit norm (never for a transcoder, as in sparsify)."""
        return self.cfg.normalize_decoder and not self.cfg.transcode

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    # ---------------------------------------------------------------- the model
    def encode(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
        k: int | None = None,
    ) -> EncoderOutput:
        """Top-k latents of x ([..., d_in] -> acts, indices of shape [N, k]; `k` defaults to self.k); AuxK
        picks when dead_mask is set."""
        x = x.reshape(-1, self.d_in).to(self.dtype)
        source = x if self.cfg.transcode else x - self.b_dec
        w, b, k = self.encoder.weight, self.encoder.bias, self.k if k is None else k
        fused = triton_kernels(self.cfg.kernels)
        if fused is not None:  # takes the dead mask itself: no nonzero, no host sync
            return fused.topk_encode(source, w, b, k, dead_mask, self.k_aux, compute_dtype)
        dead_idx = dead_mask.nonzero().squeeze(1) if dead_mask is not None else None
        return topk_encode(source, w, b, k, dead_idx, self.k_aux, compute_dtype)

    def decode(self, acts: Tensor, indices: Tensor) -> Tensor:
        """Reconstruction from sparse latents (acts and indices of shape [N, k])."""
        if self.W_dec is None:
            raise RuntimeError("this SAE was loaded with decoder=False; reload it with the decoder to decode")
        return self._sparse_decode()(acts, indices, self.W_dec, self.b_dec)

    def _sparse_decode(self):
        fused = triton_kernels(self.cfg.kernels)
        return fused.sparse_decode if fused is not None else sparse_decode

    def skip(self, x: Tensor) -> Tensor | float:
        """The skip connection's term of the output, x W_skip^T (0 without one): decode + skip = forward."""
        return x.reshape(-1, self.d_in).to(self.dtype) @ self.W_skip.T if self.W_skip is not None else 0.0

    def forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        *,
        target: Tensor | None = None,
        total_variance: Tensor | float | None = None,
        residual_variance: Tensor | float | None = None,
        compute_dtype: torch.dtype | None = None,
        multi_topk: bool = False,
    ) -> ForwardOutput:
        """Encode, decode and compute the losses against `target` (default x; a transcoder's module output).

        `compute_dtype` (e.g. bfloat16) runs the encoder's dense product in that dtype; without it, an
        enclosing `torch.autocast` for x's device sets it (the same result). Decode and losses stay in the
        SAE's dtype.
        `total_variance` is the denominator of FVU; by default the variance of x around its own mean.
        `residual_variance` is the denominator of AuxK, which predicts the residual e = x - x_hat: by default
        the variance of e around its own mean, as in Gao et al.'s code.
        The trainer passes 1.0 and the previous step's FVU (so both losses are sums of squares in units of the
        input's variance) and divides by the variance of the whole global batch at the optimizer step, so that
        micro-batches, accumulation steps and ranks add up to exactly one big batch.
        `multi_topk` also returns the FVU of the reconstruction from the top 4k latents (Gao et al. §5.3),
        with the same denominator: the encoder keeps 4k latents and the top k are the largest k of those.
        """
        x = x.reshape(-1, self.d_in).to(self.dtype)
        if target is None and self.d_out != self.d_in:
            raise ConfigError(
                f"this transcoder maps width {self.d_in} to {self.d_out}: pass target= (the module's output)"
            )
        y = x if target is None else target.reshape(-1, self.d_out).to(self.dtype)
        wide = aux_out = None
        fused = triton_kernels(self.cfg.kernels)
        if multi_topk:  # one dense product: the top k are the largest k of the top 4k
            wide = self.encode(x, dead_mask, compute_dtype, k=min(4 * self.k, self.num_latents))
            acts, pos = wide.acts.topk(self.k, dim=1, sorted=False)
            enc = wide._replace(acts=acts, indices=wide.indices.gather(1, pos))
            sae_out = self.decode(enc.acts, enc.indices) + self.skip(x)
        elif fused is not None and self.W_dec is not None:
            # Encoder and decoder in one autograd Function: one fused sparse backward for both.
            source = x if self.cfg.transcode else x - self.b_dec
            w, b = self.encoder.weight, self.encoder.bias
            step = fused.encode_decode(source, w, b, self.W_dec, self.k, dead_mask, self.k_aux, compute_dtype)
            enc = EncoderOutput(step.acts, step.indices, step.aux_acts, step.aux_indices)
            sae_out = step.out + self.b_dec + self.skip(x)
            aux_out = step.aux_out
        else:
            enc = self.encode(x, dead_mask, compute_dtype)
            sae_out = self.decode(enc.acts, enc.indices) + self.skip(x)

        e = (y - sae_out).float()
        if total_variance is None:
            yf = y.float()
            total_variance = (yf - yf.mean(0)).pow(2).sum()
        fvu = e.pow(2).sum() / total_variance

        n_aux = enc.aux_indices.shape[1]
        if n_aux > 0:
            if aux_out is None:
                aux_out = self._sparse_decode()(enc.aux_acts, enc.aux_indices, self.W_dec)  # no b_dec
            if fused is None:
                scale = min(int(dead_mask.sum()) / self.k_aux, 1.0)
            else:  # the same, without a host sync (its AuxK slots beyond the dead latents hold 0)
                scale = (dead_mask.sum() / self.k_aux).clamp(max=1.0)
            residual = e.detach()
            if residual_variance is None:
                residual_variance = (residual - residual.mean(0)).pow(2).sum()
            auxk_loss = scale * (aux_out.float() - residual).pow(2).sum() / residual_variance
        else:
            auxk_loss = fvu.new_zeros(())
        multi_topk_fvu = None
        if wide is not None:
            wide_out = self.decode(wide.acts, wide.indices) + self.skip(x)
            multi_topk_fvu = (y - wide_out).float().pow(2).sum() / total_variance
        return ForwardOutput(sae_out, enc.acts, enc.indices, fvu, auxk_loss, multi_topk_fvu)

    # ---------------------------------------------------------------- decoder constraints
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        assert self.W_dec is not None, "decoder needed"
        eps = torch.finfo(self.W_dec.dtype).eps
        norm = torch.norm(self.W_dec.data, dim=1, keepdim=True)
        self.W_dec.data /= norm + eps

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the radial part of each decoder row's gradient (the rows stay on the unit sphere)."""
        assert self.W_dec is not None and self.W_dec.grad is not None, "decoder gradient needed"
        w, g = self.W_dec.data, self.W_dec.grad
        # Row-wise dot products as a batched 1 x d by d x 1 product, then an in-place update: no M x d
        # temporaries (they cost more than the arithmetic: ~0.1 s of a 1.3 s CPU step at M=18432, d=576).
        parallel = torch.bmm(g.unsqueeze(1), w.unsqueeze(2)).view(-1, 1)
        g.addcmul_(parallel, w, value=-1)

    # ---------------------------------------------------------------- saving and loading
    def cfg_dict(self) -> dict[str, Any]:
        d = {**self.cfg.to_dict(), "d_in": self.d_in}
        del d["kernels"]  # how this process computes, not what the SAE is: saved SAEs load with the default
        if self.cfg.transcode:
            d["d_out"] = self.d_out  # ours only: sparsify's transcoders have d_out = d_in
        if self.hookpoint is not None:
            d["hookpoint"] = self.hookpoint
            d["stream"] = (
                f"transcoder: input of the module {self.hookpoint} -> its output (first tensor of a tuple)"
                if self.cfg.transcode
                else "residual stream after the block (output of the decoder layer)"
                if hookpoint_layer(self.hookpoint) is not None
                else f"output of the module {self.hookpoint} (first tensor of a tuple)"
            )
        d["sae_core_version"] = __version__
        return d

    def save_to_disk(self, path: str | os.PathLike, input_scale: float = 1.0) -> None:
        """Write `path/cfg.json` and `path/sae.safetensors`, each atomically (temp file, then rename).

        `input_scale`: the SAE was trained on activations multiplied by it. The saved SAE takes raw
        activations: TopK and ReLU commute with a positive scale, so dividing both biases by it gives latents
        1/scale as large and a reconstruction of the raw activations, with the same weight matrices (decoder
        rows stay unit norm).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            "encoder.weight": self.encoder.weight.data,
            "encoder.bias": self.encoder.bias.data / input_scale,
            "b_dec": self.b_dec.data / input_scale,
        }
        if self.W_dec is not None:
            tensors["W_dec"] = self.W_dec.data
        if self.W_skip is not None:  # unchanged by input_scale: both of its sides scale alike
            tensors["W_skip"] = self.W_skip.data
        blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": "pt"})
        atomic_write_bytes(path / SAE_FILE, blob)
        cfg = self.cfg_dict()
        if input_scale != 1.0:
            cfg["input_scale_folded"] = input_scale  # informational: loaders need nothing
        atomic_write_json(path / CFG_FILE, cfg)

    @classmethod
    def load_from_disk(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        *,
        decoder: bool = True,
    ) -> "Sae":
        """Load an SAE folder (cfg.json + sae.safetensors). The stored dtype is kept unless `dtype` is
        given."""
        path = Path(path)
        cfg_path, sae_path = path / CFG_FILE, path / SAE_FILE
        if not path.is_dir():
            raise SaeLoadError(
                f"{path}: no such SAE folder (expected a folder with {CFG_FILE} and {SAE_FILE})"
            )
        cfg_dict = read_cfg(cfg_path)
        try:
            cfg = SaeConfig.from_dict(cfg_dict)
        except (TypeError, ValueError) as e:
            raise SaeLoadError(f"{cfg_path}: invalid SAE configuration: {e}") from None
        d_in = cfg_dict.get("d_in")
        if not isinstance(d_in, int) or d_in <= 0:
            raise SaeLoadError(f"{cfg_path}: 'd_in' must be a positive integer, got {d_in!r}")
        d_out = cfg_dict.get("d_out", d_in)  # sparsify writes none: its transcoders keep the width
        if not isinstance(d_out, int) or d_out <= 0 or (d_out != d_in and not cfg.transcode):
            raise SaeLoadError(
                f"{cfg_path}: 'd_out' must be d_in={d_in} or, for a transcoder, a positive "
                f"integer, got {d_out!r}"
            )
        if cfg_dict.get("activation", "topk") != "topk":  # sparsify's groupmax
            raise SaeLoadError(
                f"{cfg_path}: activation {cfg_dict['activation']!r} is not supported (only TopK SAEs load)"
            )
        if not sae_path.is_file():
            raise SaeLoadError(f"{sae_path}: file missing (an SAE folder holds {CFG_FILE} and {SAE_FILE})")
        try:
            tensors = load_file(str(sae_path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise SaeLoadError(
                f"{sae_path}: not a valid safetensors file (corrupt or truncated?): {first_line(e)}"
            ) from None

        m = cfg.latents_for(d_in)
        expected = {"encoder.weight": (m, d_in), "encoder.bias": (m,), "b_dec": (d_out,)}
        if decoder:
            expected["W_dec"] = (m, d_out)
        if cfg.skip_connection:
            expected["W_skip"] = (d_out, d_in)
        for name, shape in expected.items():
            if name not in tensors:
                raise SaeLoadError(f"{sae_path}: tensor '{name}' missing (found {sorted(tensors)})")
            if tuple(tensors[name].shape) != shape:
                raise SaeLoadError(
                    f"{sae_path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                    f"but {cfg_path.name} (d_in={d_in}, d_out={d_out}, {m} latents) implies {shape}"
                )
        stored = tensors["encoder.weight"].dtype
        sae = cls(
            d_in,
            cfg,
            device="meta",
            dtype=stored,
            decoder=decoder,
            hookpoint=cfg_dict.get("hookpoint"),
            d_out=d_out,
        )
        sae.load_state_dict({k: v for k, v in tensors.items() if k in expected}, assign=True)
        sae = sae.to(device=device, dtype=dtype or stored)
        return sae

    @classmethod
    def load_from_hub(
        cls,
        name: str,
        layer: int | None = None,
        hookpoint: str | None = None,
        *,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        decoder: bool = True,
        endpoint: str | None = None,
        token: str | None = None,
    ) -> "Sae":
        """Load one SAE from a Hub repo (or a local folder of hookpoint folders) by layer or hookpoint name.

        `layer=10` finds `layers.10` or, in EleutherAI's older repos, `layer_10`.
        """
        if (layer is None) == (hookpoint is None):
            raise ConfigError(
                "give exactly one of layer=<int> or hookpoint=<name>, e.g. layer=10 or hookpoint='layers.10'"
            )
        candidates = hookpoint_aliases(f"layers.{layer}") if layer is not None else [hookpoint]
        root = download_saes(name, candidates, revision=revision, endpoint=endpoint, token=token)
        for c in candidates:
            if (root / c).is_dir():
                return cls.load_from_disk(root / c, device=device, dtype=dtype, decoder=decoder)
        raise SaeLoadError(
            f"{name}: no SAE folder named {' or '.join(candidates)} (found {list_hookpoints(root)})"
        )

    @classmethod
    def load_many_from_hub(
        cls,
        name: str,
        pattern: str | None = None,
        *,
        layers: list[int] | None = None,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        decoder: bool = True,
        endpoint: str | None = None,
        token: str | None = None,
    ) -> "dict[str, Sae]":
        """Load every SAE of a Hub repo or local folder, optionally filtered by a glob `pattern` or `layers`.

        Returns a dict from hookpoint folder name to SAE, in natural order (layers.2 before layers.10).
        """
        patterns = None
        if pattern is not None:
            patterns = [pattern]
        elif layers is not None:
            patterns = [p for i in layers for p in hookpoint_aliases(f"layers.{i}")]
        root = download_saes(name, patterns, revision=revision, endpoint=endpoint, token=token)
        return cls.load_many_from_disk(root, patterns, device=device, dtype=dtype, decoder=decoder)

    @classmethod
    def load_many_from_disk(
        cls,
        path: str | os.PathLike,
        patterns: list[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        decoder: bool = True,
    ) -> "dict[str, Sae]":
        root = Path(path)
        names = list_hookpoints(root)
        if patterns:
            names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not names:
            found = list_hookpoints(root)
            what = f" matching {patterns}" if patterns else ""
            raise SaeLoadError(f"{root}: no SAE folders{what} (found {found or 'none'})")
        return {n: cls.load_from_disk(root / n, device=device, dtype=dtype, decoder=decoder) for n in names}


def read_cfg(cfg_path: Path) -> dict[str, Any]:
    """Read a cfg.json, with one-line errors that name the file."""
    if not cfg_path.is_file():
        raise SaeLoadError(f"{cfg_path}: file missing (an SAE folder holds {CFG_FILE} and {SAE_FILE})")
    try:
        d = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaeLoadError(f"{cfg_path}: not valid JSON (corrupt or truncated?): {e}") from None
    if not isinstance(d, dict):
        raise SaeLoadError(f"{cfg_path}: expected a JSON object, got {type(d).__name__}")
    return d
