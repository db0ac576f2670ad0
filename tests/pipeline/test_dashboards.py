"""latent_dashboards on the shared trained partition: the site on disk, its link and preview table."""

import json
from pathlib import Path

import dagster as dg

from sae_pipeline.assets import latent_dashboards
from tests.support.pipeline import MODEL, PARTITION, failure_text, materialize


def metadata_of(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(asset)]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_latent_dashboards_write_the_site_with_a_link_and_a_preview_table(trained):
    config = {"ops": {"latent_dashboards": {"config": {"top_firing": 4, "max_tokens": 256}}}}
    result = materialize([latent_dashboards], PARTITION, trained.instance, trained.resources, config)
    assert result.success, failure_text(result)
    meta = metadata_of(result, "latent_dashboards")
    folder = trained.root / "dashboards" / MODEL / "stride-2"
    assert meta["path"] == str(folder) and meta["index"] == (folder / "index.html").as_uri()
    assert meta["latents"] == 8  # 4 per SAE, layers 0 and 2
    summary = json.loads((folder / "dashboard.json").read_text())
    assert summary["settings"]["selection"] == "top_firing 4"
    rows = [row.data for row in meta["preview"].records]
    assert {r["hookpoint"] for r in rows} == {"layers.0", "layers.2"} and len(rows) == 8
    for r in rows:
        assert (folder / r["page"]).is_file() and 0 < r["density"] <= 1 and r["top_token"]
    assert [r["density"] for r in rows if r["hookpoint"] == "layers.0"] == sorted(
        (r["density"] for r in rows if r["hookpoint"] == "layers.0"), reverse=True
    )
    # Materialised again with other latents: the folder is replaced as a whole.
    config = {"ops": {"latent_dashboards": {"config": {"latents": "0:2", "max_tokens": 256}}}}
    result = materialize([latent_dashboards], PARTITION, trained.instance, trained.resources, config)
    assert result.success, failure_text(result)
    pages = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.html"))
    assert pages == ["index.html", "layers.0/0.html", "layers.0/1.html", "layers.2/0.html", "layers.2/1.html"]
    assert not any(Path(p).name.startswith(".") for p in folder.parent.iterdir())
