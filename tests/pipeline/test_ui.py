"""UI path: `dagster dev` on 127.0.0.1 and headless Chromium, as a user opens the UI after a run.

One partition of the tiny model is materialised for real (tokenize, then training on 2 torchrun ranks) into a
Dagster instance in a temporary DAGSTER_HOME. `dagster dev` serves that instance, and Debian's `chromium`
(installed by scripts/install.sh) opens the global asset lineage and the trained partition's page, checks what
they show, and takes a screenshot of each: under the test's tmp dir, copied to $SAE_UI_SCREENSHOTS when set.
The server and the browser are stopped whatever happens, and none of their processes may be left running.
"""

import os
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import pytest

from sae_pipeline.assets import sae_checkpoints, tokenized_dataset
from tests.support.browser import Chromium, find_chromium, stop_process_group
from tests.support.pipeline import (
    MODEL,
    PARTITION,
    STRIDE,
    failure_text,
    materialize,
    resources_for,
    tiny_entry,
    write_registry,
)
from tests.support.processes import free_port, start_dagster_dev, wait_until_serving

pytestmark = pytest.mark.slow

ASSETS = ("tokenized_dataset", "sae_checkpoints", "sae_evaluation", "published_saes")
STRIDES = ("1", "2", "4")  # what the server is started with, so the graph's "% filled" is known
# Telemetry off; no automation daemon launching runs while the test browses.
DAGSTER_YAML = "telemetry:\n  enabled: false\nauto_materialize:\n  enabled: false\n"
COMMUNITY_DIALOG = "Join the Dagster community"


def materialise_one_partition(home: Path, root: Path, registry: Path) -> dict[str, str]:
    """Tokenize the tiny model and train its stride-2 SAEs into the instance in `home`; return the
    sae_checkpoints materialisation's metadata, as text."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("models", [MODEL])
        resources = resources_for(root, registry)
        for selection, partition in (([tokenized_dataset], MODEL), ([sae_checkpoints], PARTITION)):
            result = materialize(selection, partition, instance, resources)
            assert result.success, failure_text(result)
    (event,) = result.get_asset_materialization_events()
    return {key: value.value for key, value in event.materialization.metadata.items()}


def dismiss_community_dialog(browser: Chromium, timeout: float = 10) -> bool:
    """Skip the first-visit "Join the Dagster community" dialog if it shows within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while COMMUNITY_DIALOG not in browser.text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    assert browser.click_button("Skip"), f"no Skip button on the dialog:\n{browser.text()[:2000]}"
    while COMMUNITY_DIALOG in browser.text():
        assert time.monotonic() < deadline + timeout, "the community dialog did not close"
        time.sleep(0.2)
    return True


def metadata_rows(browser: Chromium) -> dict[str, str]:
    """The rows of the metadata table on an asset page: label -> value as displayed."""
    rows = browser.evaluate(
        "[...document.querySelectorAll('tr')]"
        ".map(r => [...r.querySelectorAll('td')].map(c => c.innerText.trim()))"
    )
    return {row[0]: row[1] for row in rows if len(row) >= 2}


def keep_screenshots(shots: Path) -> None:
    """Copy the screenshots taken (even those of a failed run) to $SAE_UI_SCREENSHOTS, when it is set."""
    if os.environ.get("SAE_UI_SCREENSHOTS"):
        target = Path(os.environ["SAE_UI_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        for shot in shots.glob("*.png"):
            shutil.copy(shot, target / shot.name)


def test_dagster_dev_shows_asset_graph_and_partition_metadata(tmp_path, tiny_model_dir, corpus_file):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/install.sh installs it with apt-get)")
    home, root = tmp_path / "dagster_home", tmp_path / "artefacts"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    registry = write_registry(tmp_path / "models.yaml", tiny_entry(tiny_model_dir, corpus_file))
    metadata = materialise_one_partition(home, root, registry)

    # The server's registry is empty: its sensor then adds no partition and launches no tokenize run.
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "SAE_PIPELINE_ROOT": str(root),
        "SAE_PIPELINE_REGISTRY": str(write_registry(tmp_path / "empty.yaml")),
        "SAE_PIPELINE_STRIDES": ",".join(STRIDES),
        "OMP_NUM_THREADS": "1",
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    shots = tmp_path / "screenshots"
    shots.mkdir()
    log = tmp_path / "dagster_dev.log"
    server = start_dagster_dev(port, env, tmp_path, log)
    browser = None
    left: list[str] = []
    try:
        wait_until_serving(server, url, log)
        browser = Chromium(chromium, tmp_path / "browser")

        # The global asset lineage: every asset, with what is materialised (1 of 1 model, 1 of 3 strides).
        browser.goto(f"{url}/asset-groups")
        filled = f"{round(100 / len(STRIDES))}% filled"
        browser.wait_for_text("Global asset lineage", *ASSETS, "100% filled", filled, timeout=120)
        dismiss_community_dialog(browser)
        text = browser.wait_for_text(*ASSETS, "100% filled", filled)
        assert COMMUNITY_DIALOG not in text
        browser.screenshot(shots / "asset_graph.png")

        # The trained partition of sae_checkpoints, with the metadata its materialisation reported.
        browser.goto(f"{url}/assets/sae_checkpoints?view=partitions&partition={quote(PARTITION, safe='')}")
        browser.wait_for_text(PARTITION, "Materialized", "Metadata", "fvu/layers.2", "dead %", timeout=60)
        rows = metadata_rows(browser)
        for key in ("path", "tokens", "steps", "world_size"):
            assert rows.get(key) == str(metadata[key]), (key, rows)
        assert rows["path"] == str(root / "runs" / MODEL / f"stride-{STRIDE}")
        assert rows["world_size"] == "2"
        for key in ("fvu_mean", "fvu/layers.0", "fvu/layers.2", "dead_pct/layers.0"):
            assert float(rows[key]) == pytest.approx(metadata[key]), (key, rows)
        assert "final_metrics" in rows and "layers.0" in rows["hookpoints"]
        browser.screenshot(shots / "sae_checkpoints_partition.png")
    finally:
        if browser is not None:
            left += browser.close()
        left += stop_process_group(server)
        keep_screenshots(shots)
    assert not left, f"processes left running: {left}"
