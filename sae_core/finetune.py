"""--finetune: start training from existing SAEs (a run folder, a folder of hookpoint folders, or a Hub repo),
as sparsify's `finetune` does.

Each SAE a rank trains is loaded from its hookpoint's folder of the source, after checking that the source has
that hookpoint and an SAE of the same shape: input and output widths, latents, autoencoder or transcoder,
skip connection or not. k may differ (it does not change the shape). The loaded weights replace the fresh
ones, and the trainer does not re-centre b_dec on the first step's mean; optimizer state and dead-latent
counters start afresh.
"""

from collections.abc import Mapping

from .download import download_saes
from .errors import ConfigError
from .models import hookpoint_aliases
from .sae import Sae
from .utils import first_line


def describe(sae: Sae) -> str:
    """An SAE's shape in words, as the mismatch error shows it."""
    kind = f"a transcoder {sae.d_in} -> {sae.d_out}" if sae.cfg.transcode else f"an SAE of d_in={sae.d_in}"
    skip = " with a skip connection" if sae.W_skip is not None else ""
    return f"{kind}, {sae.num_latents} latents{skip}"


def start_from(saes: Mapping[str, Sae], source: str) -> None:
    """Copy into every SAE of `saes` ({hookpoint: Sae}) the weights of the SAE of its hookpoint in `source`;
    a one-line ConfigError names a hookpoint the source lacks or a shape that differs."""
    if not saes:
        return
    try:
        root = download_saes(source, list(saes))  # from the Hub, only these hookpoints' folders
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError(f"--finetune {source}: {first_line(e)}") from None
    for hookpoint, sae in saes.items():
        folder = next(root / name for name in hookpoint_aliases(hookpoint) if (root / name).is_dir())
        start = Sae.load_from_disk(folder, device=sae.device, dtype=sae.dtype)
        if describe(start) != describe(sae):
            raise ConfigError(
                f"--finetune {source}: the SAE for {hookpoint} is {describe(start)}, but this run trains "
                f"{describe(sae)}; set --expansion_factor/--num_latents, --transcode and --skip_connection "
                "to match it"
            )
        sae.load_state_dict(start.state_dict())
