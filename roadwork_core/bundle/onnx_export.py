"""ONNX export of the whole classifier: canvas (B, 3, C, C) float in [0, 1] -> (logit (B,), prob (B,)).

Normalisation, multi-view tiling, the backbone, the head and the aggregator are all in the graph, so
an ONNX runtime needs only the canvas (the same uint8 canvas / 255 the bundle feeds PyTorch). The
batch dimension is dynamic. Calibration and the policy stay outside: they are a few numbers in JSON.

The TorchScript-based exporter (`dynamo=False`) is tried first: it handles timm ViTs at opset 17.
The antialiased resize of the global view has no opset-17 ONNX equivalent, so for export the global
view is resized by an equivalent fixed linear map (`_AntialiasResize`); `check_onnx` measures the
difference against the real PyTorch model.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from roadwork_core.io import atomic_write_bytes
from roadwork_core.models.classifier import RoadworkClassifier
from roadwork_core.models.multiview import MultiViewConfig, resolve_canvas_size, tile_boxes

__all__ = ["OnnxClassifier", "check_onnx", "export_onnx"]


def _resize_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst, src) matrix M with M @ x == antialiased bilinear resize of a length-`src` signal.

    Built by resizing the identity with the same F.interpolate call the model uses; the antialiased
    bilinear filter is separable, so rows and columns are two matrix products.
    """
    eye = torch.eye(src, dtype=torch.float64)[:, None, None, :]  # (src, 1, 1, src): one impulse per row
    out = F.interpolate(eye, size=(1, dst), mode="bilinear", antialias=True, align_corners=False)
    return out[:, 0, 0, :].T.contiguous().float()  # (dst, src)


class _AntialiasResize(nn.Module):
    """(N, 3, H, W) -> (N, 3, S, S) as two matmuls with fixed resize matrices (exportable at any opset)."""

    def __init__(self, src: int, dst: int) -> None:
        super().__init__()
        self.register_buffer("m", _resize_matrix(src, dst), persistent=False)  # (S, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m @ x @ self.m.T  # (S, H) @ (N, 3, H, W) @ (W, S) -> (N, 3, S, S)


class OnnxClassifier(nn.Module):
    """Wraps a RoadworkClassifier with export-friendly view extraction; same numbers, fixed canvas size."""

    def __init__(self, model: RoadworkClassifier) -> None:
        super().__init__()
        self.model = model
        mv: MultiViewConfig = model.mv
        C, S = resolve_canvas_size(mv), mv.view_size
        self.canvas_size, self.view_size = C, S
        boxes = tile_boxes(C, mv).tolist()  # [[x0, y0, x1, y1], ...] row-major
        self.boxes = [tuple(int(v) for v in b) for b in boxes]
        tile = self.boxes[0][2] - self.boxes[0][0]
        self.tile_resize = None if tile == S else _AntialiasResize(tile, S)
        self.global_resize = None if C == S else _AntialiasResize(C, S)

    def _views(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, C, C) normalised -> (B, V, 3, S, S), the order of multiview.extract_views."""
        mv = self.model.mv
        tiles = [x[:, :, y0:y1, x0:x1] for x0, y0, x1, y1 in self.boxes]  # static slices
        if self.tile_resize is not None:
            tiles = [self.tile_resize(t) for t in tiles]
        views = tiles
        if mv.include_global:
            views = [x if self.global_resize is None else self.global_resize(x), *tiles]
        stacked = torch.stack(views, dim=1)  # (B, V, 3, S, S)
        if mv.hflip_tta:
            stacked = torch.cat([stacked, stacked.flip(-1)], dim=1)
        return stacked

    def forward(self, canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = (canvas - m.mean) / m.std
        views = self._views(x)  # (B, V, 3, S, S)
        B, V = views.shape[0], views.shape[1]
        feats = m.backbone(views.flatten(0, 1)).reshape(B, V, -1)  # (B, V, D)
        out = m.forward_head(feats)
        return out["logit"], out["prob"]


def export_onnx(model: RoadworkClassifier, path: Path, *, opset: int = 17) -> Path:
    """Export `model` (eval mode) to `path` (written atomically); input "canvas", outputs "logit", "prob"."""
    path = Path(path)
    model = model.eval()
    wrapper = OnnxClassifier(model).eval()
    C = wrapper.canvas_size
    example = torch.rand(2, 3, C, C)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper,
            (example,),
            buf,
            input_names=["canvas"],
            output_names=["logit", "prob"],
            dynamic_axes={"canvas": {0: "batch"}, "logit": {0: "batch"}, "prob": {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    return atomic_write_bytes(path, buf.getvalue())


def check_onnx(model: RoadworkClassifier, path: Path, canvas: torch.Tensor) -> float:
    """Max |ONNX - PyTorch| over logit and prob for `canvas` (B, 3, C, C) float in [0, 1], via onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logit_onnx, prob_onnx = session.run(["logit", "prob"], {"canvas": canvas.float().numpy()})
    with torch.no_grad():
        out = model.eval()(canvas.float())
    diff_logit = np.abs(logit_onnx - out["logit"].numpy()).max(initial=0.0)
    diff_prob = np.abs(prob_onnx - out["prob"].numpy()).max(initial=0.0)
    return float(max(diff_logit, diff_prob))
