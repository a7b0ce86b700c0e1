"""Plots for the Dagster UI: PNGs re-encoded small enough to travel inside markdown metadata as data
URIs, every figure of a report folder found, and each policy's risk-coverage curve and chosen point."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from roadwork_core.calibration import fit_gate_policy, fit_scrc_policy, fit_threshold_policy
from roadwork_core.metrics import stage_plots
from roadwork_core.metrics.embed import MAX_WIDTH, compact_png, folder_figures, markdown_images
from tests.unit.test_policies import make_predictions


def _png(size=(1800, 1200), noise: bool = True) -> bytes:
    rng = np.random.default_rng(0)
    pixels = (
        rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        if noise
        else np.full((size[1], size[0], 3), 255, np.uint8)
    )
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _decode_data_uris(markdown: str) -> list[Image.Image]:
    uris = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    return [Image.open(io.BytesIO(base64.b64decode(u))) for u in uris]


def test_compact_png_fits_width_and_byte_budget():
    big = _png()  # noise: incompressible, so only scaling down can meet the budget
    out = compact_png(big, max_width=MAX_WIDTH, max_bytes=60_000)
    assert len(base64.b64encode(out)) <= 60_000
    img = Image.open(io.BytesIO(out))
    assert img.format == "PNG" and img.width <= MAX_WIDTH
    assert abs(img.width / img.height - 1.5) < 0.02, "aspect ratio kept"
    small = _png((300, 200), noise=False)
    assert Image.open(io.BytesIO(compact_png(small))).size == (300, 200), "a small figure is not scaled"
    with pytest.raises(ValueError, match="not a PNG"):
        compact_png(b"GIF89a....")


def test_markdown_images_are_inline_pngs_in_order():
    md = markdown_images([("first plot", _png((400, 300), False)), ("second", _png((200, 100), False))])
    assert md.index("### first plot") < md.index("### second")
    assert "file://" not in md
    assert [im.size for im in _decode_data_uris(md)] == [(400, 300), (200, 100)]
    assert markdown_images([]) == "_(no plots)_"


def test_folder_figures_lists_every_png_listed_ones_first(tmp_path):
    for rel in ("reliability.png", "risk_coverage.png", "subnet/reward_by_level.png", "a_extra.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(_png((20, 10), False))
    (tmp_path / "report.json").write_text("{}")
    figures = folder_figures(tmp_path, first=["risk_coverage.png", "reliability.png", "missing.png"])
    assert [t for t, _ in figures] == ["risk coverage", "reliability", "a extra", "reward by level"]
    assert all(png.startswith(b"\x89PNG") for _, png in figures)


@pytest.mark.parametrize("kind", ["threshold", "gate", "scrc"])
def test_policy_curve_passes_through_the_chosen_operating_point(kind):
    p, feats, labels = make_predictions(600, seed=3)
    if kind == "threshold":
        policy = fit_threshold_policy(p, labels, target_fnr=0.05)
    elif kind == "gate":
        sp, sf, sl = make_predictions(400, seed=4)
        policy = fit_gate_policy(sp, sf, sl, p, feats, labels, target_fnr=0.05)
    else:
        policy = fit_scrc_policy(p, feats["max_prob"], labels, alpha=0.1, mode="crc", target_coverage=0.8)
    curve = stage_plots.policy_curve(policy, p, feats, labels)
    decisions = policy.decide(p, feats)
    assert curve.point_coverage == pytest.approx(np.mean(decisions != "defer"))
    k = round(curve.point_coverage * len(p))
    if k:  # accepting the policy's images first reproduces its own FNR among accepted roadwork images
        assert curve.fnr_accepted[k - 1] == pytest.approx(curve.point_fnr_accepted, abs=1e-12)
    if kind == "scrc":
        assert curve.point_fnr_accepted == pytest.approx(policy.calib_fnr_accepted)
        assert set(curve.thresholds) == {"λ1", "λ2"} and curve.alpha == 0.1
    assert stage_plots.policy_plot(policy, p, feats, labels).startswith(b"\x89PNG")


def test_stage_plots_render_and_reject_bad_tables():
    table = pd.DataFrame({"split": ["train"] * 6 + ["val_test"] * 2, "label": [0, 1, 1, 0, 1, 0, 1, 0]})
    assert stage_plots.split_composition(table).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="'label'"):
        stage_plots.split_composition(table.drop(columns="label"))
    history = [{"epoch": e, "train_loss": 1 / e, "select_mcc": 0.1 * e, "select_acc": 0.5} for e in (1, 2, 3)]
    assert stage_plots.training_curves(history, best_epoch=3).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="no epochs"):
        stage_plots.training_curves([])
    assert stage_plots.ssl_loss_curve([5.0, 4.2, 4.0]).startswith(b"\x89PNG")
