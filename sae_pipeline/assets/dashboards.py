"""latent_dashboards: sae_core's latent dashboards of one model x stride, on the evaluation's held-out tokens.

Materialised on request (the UI's Materialize, or a job selecting it), not by automation: it is for people
looking at the SAEs, and nothing downstream waits for it.
"""

import html
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from sae_core.sweep import sweep_variants

from ..partitions import model_stride_partitions
from ..resources import GPU_POOL, ArtefactStore, ModelRegistry
from ..versions import DASHBOARDS_CODE_VERSION
from .common import fail_step_on_bad_input, model_and_stride, trained_run_dir
from .evaluation import sae_evaluation

PREVIEW_ROWS = 10  # most frequent latents per hookpoint in the metadata table


class DashboardsConfig(dg.Config):
    """Which latents, on how many tokens."""

    top_firing: int | None = Field(default=50, gt=0, description="The N most frequent latents per SAE.")
    latents: str | None = Field(
        default=None, description="Latent ids and ranges instead, e.g. '0:200' or '3,17' (top_firing unset)."
    )
    max_tokens: int | None = Field(default=None, gt=0, description="Held-out tokens (default: the eval's).")


@dg.asset(
    partitions_def=model_stride_partitions,
    deps=[sae_evaluation],
    group_name="sae",
    code_version=DASHBOARDS_CODE_VERSION,
    kinds={"pytorch"},
    pool=GPU_POOL,
    description="Per-latent dashboards (top contexts, quantile samples, density, histogram, logit lens) of "
    "the trained SAEs on held-out tokens (sae_core.dashboard): "
    "<root>/dashboards/<model>/stride-<s>/index.html and JSON. Publish them with python -m sae_core.hub "
    "--dashboard_dir.",
)
def latent_dashboards(
    context: dg.AssetExecutionContext,
    config: DashboardsConfig,
    registry: ModelRegistry,
    artefacts: ArtefactStore,
) -> dg.MaterializeResult:
    from sae_core.dashboard import build_dashboards
    from sae_core.utils import atomic_write_bytes

    key, entry = model_and_stride(context, registry)
    run_dir = trained_run_dir(artefacts, key)
    target = artefacts.dashboard_dir(key.model, key.stride)
    # A sweep's folder: one site per variant, <target>/<variant>/, and an index page linking them.
    variants = sweep_variants(run_dir)
    records: dict[str, list[dict[str, Any]]] = {}
    for folder in variants or [run_dir]:
        out = target / folder.name if variants else target
        with fail_step_on_bad_input(f"dashboards of {folder} failed", also=(OSError,)):
            built = build_dashboards(
                entry.model,
                str(folder),
                latents=config.latents,
                top_firing=None if config.latents else config.top_firing,
                max_tokens=config.max_tokens or entry.eval.max_tokens,
                out_dir=out,  # replaced as a whole once complete
                overwrite=True,
            )
        records.update({f"{folder.name}/{h}" if variants else h: r for h, r in built.items()})
    if variants:
        names = [html.escape(v.name) for v in variants]
        links = "".join(f'<li><a href="{n}/index.html">{n}</a></li>' for n in names)
        atomic_write_bytes(
            target / "index.html", f"<!doctype html><title>sweep variants</title><ul>{links}</ul>\n".encode()
        )
    n = sum(len(r) for r in records.values())
    context.log.info(f"dashboards of {n} latents: {target / 'index.html'}")
    return dg.MaterializeResult(metadata=dashboard_metadata(records, target))


def dashboard_metadata(records: dict[str, list[dict[str, Any]]], folder: Path) -> dict[str, Any]:
    index = folder / "index.html"
    return {
        "path": dg.MetadataValue.path(str(folder)),
        "index": dg.MetadataValue.url(index.as_uri()),
        "latents": sum(len(r) for r in records.values()),
        "preview": preview_table(records),
    }


def preview_table(records: dict[str, list[dict[str, Any]]]) -> dg.TableMetadataValue:
    """The most frequent latents of each hookpoint, with the token they fire on most strongly."""
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("hookpoint", "string"),
            dg.TableColumn("latent", "int"),
            dg.TableColumn("density", "float"),
            dg.TableColumn("max_activation", "float"),
            dg.TableColumn("top_token", "string"),
            dg.TableColumn("page", "string"),
        ]
    )
    rows = []
    for h, latents in records.items():
        for r in sorted(latents, key=lambda r: (-r["density"], r["latent"]))[:PREVIEW_ROWS]:
            top = r["top_contexts"][0] if r["top_contexts"] else None
            rows.append(
                dg.TableRecord(
                    {
                        "hookpoint": h,
                        "latent": int(r["latent"]),
                        "density": float(r["density"]),
                        "max_activation": None if r["max_activation"] is None else float(r["max_activation"]),
                        "top_token": top["tokens"][top["peak"]] if top else "",
                        "page": f"{h}/{r['latent']}.html",
                    }
                )
            )
    return dg.MetadataValue.table(rows, schema)
