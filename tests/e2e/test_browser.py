"""Way in #1, looked at: the Dagster UI in a real browser (Debian's Chromium, driven headless by
Playwright), on the webserver of the `ui_server` fixture, whose tiny whole-graph run (launched through
GraphQL) succeeded. A run launched from the UI's launchpad carries the launchpad's config and partition
tag (its config rejects every image, so it fails at the first step: the successful run is the
fixture's); then every plot in the assets' metadata must load as an image (naturalWidth > 0) and the
blocking split checks must show on the Checks tab. Screenshots land in the test's temporary folder
(and, with ROADWORK_SCREENSHOT_DIR set, the two README ones there: `make screenshots`)."""

from __future__ import annotations

import io
import os
import re
import urllib.parse
from pathlib import Path

import dagster as dg
import pytest
import yaml

from roadwork_assets import data as data_assets
from tests.e2e.conftest import mlflow_statuses, tiny_run_config, wait_for

# the two tests share the `ui_server` fixture (one webserver, one run): kept together on one worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ui_server")]

CHROMIUM = os.environ.get("ROADWORK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCATION = "__repository__@roadwork_assets.definitions"
# asset -> the markdown metadata entry holding its plot(s), and how many images it must show at least
PLOTS = {
    "splits": ("composition", 1),
    "explora_backbone": ("ssl_loss_plot", 1),
    "classifier": ("training_curves", 1),
    "threshold_policy": ("risk_coverage", 1),
    "gate_policy": ("risk_coverage", 1),
    "scrc_policy": ("risk_coverage", 1),
    "evaluation_report": ("plots", None),  # every PNG the report wrote (reliability, risk-coverage, ...)
}
FLOAT_METADATA = {
    "classifier": ("best_select_mcc",),
    "calibrator": ("ece_before", "ece_after"),
    "bundle": ("calib_coverage", "calib_fnr"),
    "evaluation_report": ("mcc_value", "ece_value", "coverage_value", "fnr_value"),
}
SPLIT_CHECKS = (
    "check_no_shared_images",
    "check_no_near_duplicates_across_splits",
    "check_label_balance",
    "check_min_per_class",
    "check_sticky_splits",
)
README_SHOTS = {"asset_graph": "ui_asset_graph.png", "evaluation_report": "ui_evaluation_report.png"}


def save_screenshot(page, folder: Path, name: str, **kw) -> Path:
    """A PNG screenshot under `folder`; README ones are also written, palette-compressed, to
    $ROADWORK_SCREENSHOT_DIR (each must stay under 300 KB)."""
    from PIL import Image

    path = folder / f"{name}.png"
    page.screenshot(path=str(path), **kw)
    docs = os.environ.get("ROADWORK_SCREENSHOT_DIR")
    if docs and name in README_SHOTS:
        with Image.open(path) as img:
            buf = io.BytesIO()
            img.convert("RGB").quantize(colors=128).save(buf, format="PNG", optimize=True)
        assert len(buf.getvalue()) < 300_000, f"{name}: {len(buf.getvalue())} bytes, over 300 KB"
        Path(docs, README_SHOTS[name]).write_bytes(buf.getvalue())
    return path


def _skip_community_dialog(page) -> None:
    """The UI's first-visit 'Join the Dagster community' dialog covers the page (it opens at some
    point after load); Playwright clicks its Skip button whenever it blocks an action."""
    page.add_locator_handler(page.get_by_role("button", name="Skip", exact=True), lambda skip: skip.click())


def _images_in(locator) -> list[dict]:
    return locator.evaluate_all(
        "els => els.flatMap(e => Array.from(e.querySelectorAll('img')))"
        ".map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth, src: (i.getAttribute('src') || '').slice(0, 30)}))"
    )


@pytest.fixture
def browser(tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: run `make browser` (apt-get install chromium) or set ROADWORK_CHROMIUM"
        )
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a new, empty profile
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


def _launchpad_url(base: str, run_config: dict, partition: str) -> str:
    """The launchpad's setup route: it opens a new launchpad session holding this config and tags."""
    query = urllib.parse.urlencode(
        {"config": yaml.safe_dump(run_config, sort_keys=False),
         "tags[0][key]": "dagster/partition", "tags[0][value]": partition}
    )  # fmt: skip
    return f"{base}/locations/{LOCATION}/jobs/retrain_job/playground/setup?{query}"


def test_ui_launchpad_run_plots_and_checks(ui_server, browser, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    base, instance = ui_server["base"], ui_server["instance"]
    page = browser.new_page()
    _skip_community_dialog(page)
    try:
        # 1. the successful run (launched through GraphQL by the fixture): numbers the asset's Plots tab
        # draws across materializations are float metadata
        for asset, keys in FLOAT_METADATA.items():
            records = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
            meta = records[0].asset_materialization.metadata
            for key in keys:
                assert isinstance(meta.get(key), dg.FloatMetadataValue), f"{asset}.{key}: {meta.get(key)!r}"

        # 2. every plot in the metadata loads as an image
        for asset, (entry, at_least) in PLOTS.items():
            page.goto(f"{base}/assets/{asset}?view=events&partition=v0001")
            page.get_by_text("[Show Markdown]").first.wait_for(timeout=60_000)
            row = page.locator("tr", has=page.get_by_text(entry, exact=True)).filter(
                has_text="[Show Markdown]"
            )
            row.first.get_by_text("[Show Markdown]").click()
            dialog = page.get_by_role("dialog")
            dialog.locator("img").first.wait_for(timeout=30_000)
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('[role=dialog] img')).every(i => i.complete)",
                timeout=30_000,
            )
            images = _images_in(dialog)
            if at_least is None:  # as many images as the report folder holds PNG files, at least 2
                folder = Path(_metadata(instance, asset)["path"])
                at_least = max(2, len(list(folder.rglob("*.png"))))
            save_screenshot(page, shots, asset)
            assert len(images) >= at_least, f"{asset}.{entry}: {len(images)} images, want >= {at_least}"
            broken = [i for i in images if not i["width"]]
            assert not broken, f"{asset}.{entry}: images that did not load: {broken}"
            page.keyboard.press("Escape")

        # 3. the blocking split checks on the Checks tab: each one's detail says blocking and passed
        for name in SPLIT_CHECKS:
            page.goto(f"{base}/assets/splits?view=checks&checkDetail={name}")
            page.get_by_text("This is a blocking asset check.").wait_for(timeout=60_000)
            page.get_by_text("Passed", exact=True).first.wait_for(timeout=30_000)
            n_checks = len(data_assets.SPLIT_CHECKS)  # the blocking ones and the label-agreement warning
            assert page.get_by_text(f"Checks ({n_checks})").count(), (
                f"{name}: the Checks tab does not list {n_checks}"
            )
            if name == SPLIT_CHECKS[0]:
                save_screenshot(page, shots, "splits_checks")

        # 4. the asset graph: everything upstream of the report
        page.goto(f"{base}/assets/evaluation_report?view=lineage&lineageScope=upstream&lineageDepth=12")
        page.get_by_text("image_table", exact=True).first.wait_for(timeout=60_000)
        page.wait_for_timeout(2000)  # the graph animates into its layout
        save_screenshot(page, shots, "asset_graph")
        # 5. a run launched from the launchpad (config and partition tag filled in) carries both: this
        # one's image_table config rejects every image, so it fails at once with the reject report (last:
        # its skipped split checks become the latest executions)
        bad = tiny_run_config()
        bad["ops"]["image_table"] = {"config": {"min_size": 100_000}}
        page.goto(_launchpad_url(base, bad, "v0001"))
        launch = page.get_by_role("button", name=re.compile("Launch run", re.I))
        launch.wait_for(timeout=60_000)
        save_screenshot(page, shots, "launchpad")
        launch.click()
        page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=60_000)
        run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
        status = wait_for(
            lambda: (r := instance.get_run_by_id(run_id)) and r.is_finished and r.status,
            420,
            f"run {run_id} to finish",
        )
        assert status == dg.DagsterRunStatus.FAILURE, f"UI-launched run {run_id} ended {status}"
        run = instance.get_run_by_id(run_id)
        assert run.tags.get("dagster/partition") == "v0001"
        assert run.run_config["ops"]["image_table"]["config"]["min_size"] == 100_000
        failures = [
            e.dagster_event.step_failure_data.error.to_string()  # the wrapper and its cause
            for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        ]
        assert len(failures) == 1 and "TooManyRejects" in failures[0], failures
        assert "images rejected" in failures[0] and "max_reject_fraction" in failures[0], failures[0]
        # image_table carries no MLflow hook: the resource's teardown ends the MLflow run FAILED
        assert mlflow_statuses(ui_server["state"], run_id) == ["FAILED"], (
            "MLflow run of a run failing in image_table"
        )
        page.get_by_text("image_table", exact=True).first.wait_for(timeout=60_000)
        save_screenshot(page, shots, "run", full_page=True)

    finally:
        page.close()


def _metadata(instance: dg.DagsterInstance, asset: str) -> dict:
    from roadwork_assets._util import latest_materialization_metadata

    return latest_materialization_metadata(instance, dg.AssetKey(asset), "v0001")
