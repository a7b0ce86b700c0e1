"""ONNX export of the whole classifier (views + backbone + head + aggregator) equals PyTorch in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from roadwork_core.bundle.onnx_export import OnnxClassifier, check_onnx, export_onnx
from roadwork_core.models.backbone import BackboneConfig
from roadwork_core.models.classifier import build_classifier
from roadwork_core.models.multiview import MultiViewConfig, extract_views

pytest.importorskip("onnxruntime", reason="onnxruntime is needed to run the exported graph")

CASES = {
    # default multi-view (global + 3x3 exact tiles), top-k mean aggregation
    "vit_topk": dict(backbone="vit_test_tiny", mv=None, aggregator="topk_mean"),
    # tiles that need resizing, hflip TTA, learned attention aggregator
    "vit_attention_resized_tiles": dict(
        backbone="vit_test_tiny",
        mv=MultiViewConfig(view_size=32, grid=2, hflip_tta=True, canvas_size=70),
        aggregator="attention",
    ),
    # DINOv3 architecture (timm Eva with RoPE)
    "dinov3_topk": dict(backbone="vit_test_tiny_dinov3", mv=None, aggregator="topk_mean"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_matches_pytorch(case: str, tmp_path: Path) -> None:
    spec = CASES[case]
    torch.manual_seed(0)
    model = build_classifier(
        BackboneConfig(name=spec["backbone"]), spec["mv"], aggregator=spec["aggregator"]
    ).eval()
    C = model.canvas_size

    canvas = torch.rand(3, 3, C, C)
    views = OnnxClassifier(model)._views((canvas - model.mean) / model.std)
    expected = extract_views((canvas - model.mean) / model.std, model.mv)
    torch.testing.assert_close(
        views, expected, atol=1e-5, rtol=0, msg="export view extraction != extract_views"
    )

    path = export_onnx(model, tmp_path / "model.onnx")
    assert path.stat().st_size > 0
    for batch in (1, 5):  # dynamic batch: neither is the export example's batch of 2
        diff = check_onnx(model, path, torch.rand(batch, 3, C, C))
        assert diff < 1e-4, f"{case}: ONNX differs from PyTorch by {diff} at batch {batch}"

    with torch.no_grad():
        logits = model(torch.rand(4, 3, C, C))["logit"]
    assert logits.std() > 0, (
        "the model must give different outputs for different inputs (else the check is vacuous)"
    )
