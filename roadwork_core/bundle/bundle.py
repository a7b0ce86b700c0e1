"""The release bundle: load with integrity checks, then predict P(roadwork) and a decision.

The files and the manifest are described in `roadwork_core.bundle.schema`. `Bundle.load` verifies
the directory (`roadwork_core.bundle.verify`: schema version, the manifest's own digest, every file's
size and sha256, no unlisted file), then decodes its parts (`roadwork_core.bundle.parts`: exactly
one policy, the calibrator, the answer rule, the model). A schema-1 bundle (written before answer.json
existed) still loads; its answer uses the threshold 0.5 and says so in `Bundle.answer_rule.source`.
Prediction decodes images (`roadwork_core.bundle.decode`) in threads while the model runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from roadwork_core.bundle.decode import ImageInput, batched, decode_or_error
from roadwork_core.bundle.parts import (
    load_answer_rule,
    load_calibrator,
    load_model,
    load_policy,
    resolve_device,
)
from roadwork_core.bundle.schema import CALIBRATOR_FILE, POLICY_FILE, BundleManifest
from roadwork_core.bundle.verify import read_manifest, verified_files
from roadwork_core.config import serve_exact_fp32
from roadwork_core.contracts.predictions import UNCERTAINTY_FEATURES
from roadwork_core.models.classifier import RoadworkClassifier
from roadwork_core.models.serialization import CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE
from roadwork_core.subnet.answer import AnswerRule

__all__ = ["Bundle", "Prediction"]


@dataclass(frozen=True)
class Prediction:
    p_roadwork: float  # calibrated P(roadwork)
    decision: str  # "roadwork" | "no_roadwork" | "defer": the Stage-1 policy's decision
    answer: float  # the subnet answer in [0, 1]: np.round(answer) is the reward-optimal commitment
    logit: float  # aggregated, uncalibrated
    p_raw: float  # sigmoid(logit), uncalibrated
    features: dict[str, float] = field(default_factory=dict)  # UNCERTAINTY_FEATURES

    def to_dict(self) -> dict[str, Any]:
        return {
            "p_roadwork": self.p_roadwork,
            "decision": self.decision,
            "answer": self.answer,
            "logit": self.logit,
            "p_raw": self.p_raw,
            **self.features,
        }


@dataclass
class Bundle:
    path: Path
    model: RoadworkClassifier
    calibrator: Any  # roadwork_core.calibration.calibrators.Calibrator
    policy: Any  # a roadwork_core.calibration policy (exactly one)
    answer_rule: AnswerRule  # the subnet answer's threshold on p_roadwork
    manifest: BundleManifest
    config: dict[str, Any]
    device: torch.device
    decode_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
        """Verify `path` (schema, manifest digest, every file's sha256, no extra files), then build it."""
        path = Path(path)
        manifest = read_manifest(path)
        contents = verified_files(path, manifest)
        policy = load_policy(contents[POLICY_FILE], path / POLICY_FILE, manifest.policy)
        calibrator = load_calibrator(contents[CALIBRATOR_FILE], path / CALIBRATOR_FILE)
        answer_rule = load_answer_rule(contents, path, manifest.schema_version)
        dev = resolve_device(device)
        serve_exact_fp32(dev)  # CUDA: TF32 off, as the prediction assets computed the calibration logits
        model, config = load_model(
            contents[CLASSIFIER_WEIGHTS_FILE], contents[CLASSIFIER_CONFIG_FILE], path, dev
        )
        return cls(
            path=path,
            model=model,
            calibrator=calibrator,
            policy=policy,
            answer_rule=answer_rule,
            manifest=manifest,
            config=config,
            device=dev,
        )

    @property
    def canvas_size(self) -> int:
        return self.model.canvas_size

    @torch.inference_mode()
    def predict_canvas(self, canvas: torch.Tensor) -> dict[str, np.ndarray]:
        """canvas (B, 3, C, C), uint8 or float in [0, 1] -> columns of arrays, one row per image.

        Keys: logit, p_raw, p_roadwork, decision, answer, view_probs (B, V), and UNCERTAINTY_FEATURES. One
        model forward for the whole batch; calibration and policy run vectorised on the results.
        """
        C = self.canvas_size
        if canvas.ndim != 4 or tuple(canvas.shape[1:]) != (3, C, C):
            raise ValueError(
                f"predict_canvas expects a (B, 3, {C}, {C}) canvas batch, got {tuple(canvas.shape)}"
            )
        x = canvas.to(self.device, non_blocking=True)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        out = self.model(x)
        from roadwork_core.models.predict import uncertainty_features

        view_probs = out["view_logits"].float().sigmoid()  # (B, V)
        prob = out["prob"].float()  # (B,)
        feats = uncertainty_features(prob, view_probs, self.model.mv)
        logit = out["logit"].double().cpu().numpy()  # (B,)
        features = {name: feats[name].double().cpu().numpy() for name in UNCERTAINTY_FEATURES}
        p_roadwork = np.clip(np.asarray(self.calibrator.transform(logit), dtype=np.float64), 0.0, 1.0)
        decision = np.asarray(self.policy.decide(p_roadwork, features)).astype(str)
        return {
            "logit": logit,
            "p_raw": 1.0 / (1.0 + np.exp(-logit)),
            "p_roadwork": p_roadwork,
            "decision": decision,
            "answer": self.answer_rule.answer(p_roadwork),
            "view_probs": view_probs.double().cpu().numpy(),
            **features,
        }

    def iter_predict(
        self, items: Iterable[tuple[str, ImageInput | Exception]], batch_size: int = 16
    ) -> Iterator[tuple[str, Prediction | Exception]]:
        """(name, image) pairs -> (name, Prediction or the decode error), in input order, lazily.

        An item may be an Exception (an input that failed upstream); it is passed through as the
        result. A bad image yields its error and never stops the others. Decoding of the next batch runs in
        worker threads while the current batch is in the model (Pillow and torch release the GIL).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        C = self.canvas_size
        with ThreadPoolExecutor(max_workers=max(1, self.decode_workers)) as pool:

            def submit(batch: list[tuple[str, ImageInput]]) -> list[tuple[str, Future]]:
                return [(name, pool.submit(decode_or_error, item, name, C)) for name, item in batch]

            batches = batched(items, batch_size)
            pending = submit(next(batches, []))
            while pending:
                nxt = next(batches, None)
                ahead = submit(nxt) if nxt else []  # decode batch i+1 while batch i runs
                decoded = [(name, fut.result()) for name, fut in pending]
                yield from self._predict_decoded(decoded)
                pending = ahead

    def _predict_decoded(
        self, decoded: list[tuple[str, torch.Tensor | Exception]]
    ) -> Iterator[tuple[str, Prediction | Exception]]:
        good = [i for i, (_, c) in enumerate(decoded) if isinstance(c, torch.Tensor)]
        cols = self.predict_canvas(torch.stack([decoded[i][1] for i in good])) if good else {}
        row_of = {i: r for r, i in enumerate(good)}
        for i, (name, canvas) in enumerate(decoded):
            if not isinstance(canvas, torch.Tensor):
                yield name, canvas
                continue
            r = row_of[i]
            yield (
                name,
                Prediction(
                    p_roadwork=float(cols["p_roadwork"][r]),
                    decision=str(cols["decision"][r]),
                    answer=float(cols["answer"][r]),
                    logit=float(cols["logit"][r]),
                    p_raw=float(cols["p_raw"][r]),
                    features={k: float(cols[k][r]) for k in UNCERTAINTY_FEATURES},
                ),
            )

    def predict(self, images: Sequence[ImageInput], batch_size: int = 16) -> list[Prediction]:
        """One Prediction per image, in order. Raises the first decode error (it names the image)."""
        if isinstance(images, str | bytes | bytearray | memoryview | os.PathLike | PIL.Image.Image):
            # a str would be read as a sequence of one-character paths ('/' -> IsADirectoryError), bytes as ints
            raise TypeError(
                f"Bundle.predict takes a list of images, got one {type(images).__name__}: pass [image] "
                "(each a path, encoded bytes or a PIL image)"
            )
        named = ((self._name(i, img), img) for i, img in enumerate(images))
        results: list[Prediction] = []
        for _, result in self.iter_predict(named, batch_size=batch_size):
            if isinstance(result, Exception):
                raise result
            results.append(result)
        return results

    def max_logit_difference(self, uris: Sequence[str], logits: np.ndarray, batch_size: int = 16) -> float:
        """Max |bundle logit - recorded logit| over images `uris` (e.g. a calib_predictions sample).

        The bundle asset's reproduction check: a correct bundle gives <= 1e-4 on the same device.
        """
        recorded = np.asarray(logits, dtype=np.float64)
        if recorded.shape != (len(uris),):
            raise ValueError(f"max_logit_difference: {len(uris)} uris but logits of shape {recorded.shape}")
        preds = self.predict(list(uris), batch_size=batch_size)
        return float(np.abs(np.array([p.logit for p in preds]) - recorded).max(initial=0.0))

    @staticmethod
    def _name(index: int, image: ImageInput) -> str:
        if isinstance(image, str | os.PathLike):
            return os.fspath(image)
        return f"images[{index}]"
