"""The release bundle: load with integrity checks, then predict P(roadwork) and a decision.

A bundle is a directory:
    model.safetensors   classifier weights (safetensors; nothing pickled)
    config.json         the classifier directory config (roadwork_core.models.serialization) + preprocessing
    calibrator.json     the probability calibration map (roadwork_core.calibration.calibrators.Calibrator)
    policy.json         exactly ONE decision policy (softmax | gate | scrc)
    answer.json         the subnet answer's threshold (roadwork_core.subnet.answer; schema 2 on)
    manifest.json       schema version, lineage, code version, metrics summary, sha256 + size of every file

`Bundle.load` checks, before anything is deserialised into a model: the manifest parses, its schema
version is one this roadwork reads, its own content digest matches, every listed file exists with
the recorded size and sha256 (read once; the verified bytes are the ones parsed), no file is
present that the manifest does not list, and the policy file holds exactly one policy. A schema-1
bundle (written before answer.json existed) still loads; its answer uses the threshold 0.5 and says so
in `Bundle.answer_rule.source`.

The manifest's `content_sha256` makes accidental or naive edits to the manifest detectable; it is
not a signature (anyone who can write the directory can recompute it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from roadwork_core import __version__
from roadwork_core.contracts.predictions import UNCERTAINTY_FEATURES
from roadwork_core.models.classifier import RoadworkClassifier
from roadwork_core.models.serialization import (
    CLASSIFIER_CONFIG_FILE,
    CLASSIFIER_FORMAT,
    CLASSIFIER_FORMAT_VERSION,
    CLASSIFIER_WEIGHTS_FILE,
    load_weights,
    rebuild_classifier,
)
from roadwork_core.subnet.answer import ANSWER_FILE, AnswerRule, default_answer_rule

__all__ = [
    "BUNDLE_FILES",
    "BUNDLE_SCHEMA_VERSION",
    "Bundle",
    "BundleError",
    "BundleIntegrityError",
    "BundleManifest",
    "FileEntry",
    "ImageInput",
    "Prediction",
    "bundle_files",
    "manifest_digest",
    "verify_bundle",
]

BUNDLE_SCHEMA_VERSION = 2  # 2: answer.json (the subnet answer's threshold) joined the bundle
MANIFEST_FILE = "manifest.json"
CALIBRATOR_FILE = "calibrator.json"
POLICY_FILE = "policy.json"
# Every file of a bundle other than the manifest; the manifest must list exactly these.
BUNDLE_FILES: tuple[str, ...] = (
    CLASSIFIER_WEIGHTS_FILE,
    CLASSIFIER_CONFIG_FILE,
    CALIBRATOR_FILE,
    POLICY_FILE,
    ANSWER_FILE,
)
# What a schema-1 bundle holds (no answer.json); still loaded, with the default answer threshold 0.5.
_SCHEMA_1_FILES: tuple[str, ...] = tuple(f for f in BUNDLE_FILES if f != ANSWER_FILE)


def bundle_files(schema_version: int) -> tuple[str, ...]:
    """The files (besides the manifest) a bundle of `schema_version` holds."""
    return _SCHEMA_1_FILES if schema_version == 1 else BUNDLE_FILES


ImageInput = PIL.Image.Image | bytes | str | os.PathLike


class BundleError(ValueError):
    """A bundle that cannot be used: missing or malformed files, an unsupported schema version."""


class BundleIntegrityError(BundleError):
    """A bundle whose contents differ from what its manifest records (modified, missing or extra files)."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str
    size: int


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int
    dataset_version: str
    # {"dataset_version": "v1", "artifact_sha256": {"splits": "<sha256>", ...}}; bundles exported before
    # lineage was a mapping hold every value as a string (e.g. str(dict)) and still load
    upstream_versions: dict[str, str | dict[str, str | None]]
    code_version: dict[str, str | None]  # {"roadwork": "0.1.0", "git_commit": "<sha>" | None}
    created_at: str  # ISO 8601, UTC
    metrics_summary: dict[str, Any]
    policy: str  # the `policy` field of policy.json
    files: dict[str, FileEntry]
    content_sha256: str  # manifest_digest of every other field


def manifest_digest(doc: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of `doc` without its `content_sha256` field."""
    body = {k: v for k, v in doc.items() if k != "content_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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


# ---------------------------------------------------------------------------------------------------
# Loading and verification


def _read_manifest(path: Path) -> BundleManifest:
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise BundleError(f"{path} is not a directory; a bundle is the directory written by export_bundle")
    try:
        raw = json.loads(manifest_path.read_bytes())
    except FileNotFoundError as err:
        raise BundleError(
            f"{manifest_path} is missing; this is not a roadwork bundle (re-export it)"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleIntegrityError(
            f"{manifest_path} is not valid JSON ({err}); the bundle is corrupt, re-export it"
        ) from err
    if not isinstance(raw, dict):
        raise BundleIntegrityError(
            f"{manifest_path} must hold a JSON object; the bundle is corrupt, re-export it"
        )
    version = raw.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(
            f"{manifest_path} has schema_version {version!r}; expected an integer (this roadwork reads "
            f"schema {BUNDLE_SCHEMA_VERSION}). Re-export the bundle."
        )
    if version > BUNDLE_SCHEMA_VERSION:
        raise BundleError(
            f"{manifest_path} has bundle schema_version {version}, written by a newer roadwork; this is "
            f"roadwork {__version__}, which reads schema {BUNDLE_SCHEMA_VERSION}. Upgrade roadwork to load it."
        )
    if version < 1:
        raise BundleError(
            f"{manifest_path} has unknown bundle schema_version {version}; this roadwork reads schema "
            f"{BUNDLE_SCHEMA_VERSION}. Re-export the bundle with this roadwork."
        )
    try:
        manifest = BundleManifest.model_validate(raw)
    except ValidationError as err:
        raise BundleIntegrityError(f"{manifest_path} does not match bundle schema {version}: {err}") from err
    actual = manifest_digest(raw)
    if actual != manifest.content_sha256:
        raise BundleIntegrityError(
            f"{manifest_path} was modified after export: content_sha256 expected {manifest.content_sha256}, "
            f"actual {actual}. Do not edit a bundle; re-export it."
        )
    return manifest


def verify_bundle(path: str | os.PathLike) -> BundleManifest:
    """Check a bundle directory as `Bundle.load` does before building anything (schema, manifest digest,
    every file's size and sha256, no unlisted file, hence exactly one policy); its manifest, or BundleError."""
    path = Path(path)
    manifest = _read_manifest(path)
    _verified_files(path, manifest)
    return manifest


def _verified_files(path: Path, manifest: BundleManifest) -> dict[str, bytes]:
    """{file name: bytes} of every listed file, each checked against its size and sha256."""
    expected = bundle_files(manifest.schema_version)
    listed = set(manifest.files)
    if listed != set(expected):
        raise BundleIntegrityError(
            f"{path / MANIFEST_FILE} lists files {sorted(listed)}; a schema-{manifest.schema_version} bundle "
            f"holds exactly {sorted(expected)} (one model, one config, one calibrator, exactly one policy"
            f"{', the answer threshold' if ANSWER_FILE in expected else ''}). Re-export it."
        )
    present = {p.name for p in path.iterdir()}
    unlisted = sorted(present - listed - {MANIFEST_FILE})
    if unlisted:
        raise BundleIntegrityError(
            f"{path} holds file(s) not listed in its manifest: {unlisted}. A bundle may contain only "
            f"{sorted(expected)} and {MANIFEST_FILE}; remove them or re-export the bundle."
        )
    contents: dict[str, bytes] = {}
    for name in expected:
        entry = manifest.files[name]
        file_path = path / name
        if not file_path.is_file():
            raise BundleIntegrityError(
                f"{file_path} is listed in the manifest but missing; re-export the bundle"
            )
        data = file_path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != entry.sha256 or len(data) != entry.size:
            raise BundleIntegrityError(
                f"{file_path} was modified: sha256 expected {entry.sha256} (size {entry.size}), actual {actual} "
                f"(size {len(data)}). Refusing to load it; re-export the bundle."
            )
        contents[name] = data
    return contents


def _parse_json(data: bytes, file_path: Path) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{file_path} is not valid JSON ({err}); re-export the bundle") from err


def _load_policy(data: bytes, file_path: Path, expected: str) -> Any:
    from roadwork_core.calibration import gate, scrc, threshold  # noqa: F401  (registers the policies)
    from roadwork_core.calibration.policy import policy_from_json

    raw = _parse_json(data, file_path)
    if not isinstance(raw, dict):
        raise BundleError(
            f"{file_path} must hold exactly one policy (a JSON object with a 'policy' field), got "
            f"{type(raw).__name__}; export the bundle with a single policy"
        )
    try:
        policy = policy_from_json(data)
    except ValueError as err:
        raise BundleError(f"{file_path}: {err}") from err
    if policy.policy != expected:
        raise BundleError(
            f"{file_path} holds policy {policy.policy!r} but the manifest says {expected!r}; re-export the bundle"
        )
    return policy


def _load_calibrator(data: bytes, file_path: Path) -> Any:
    from roadwork_core.calibration.calibrators import Calibrator

    try:
        return Calibrator.model_validate_json(data)
    except ValidationError as err:
        raise BundleError(f"{file_path} is not a valid calibrator: {err}") from err


def _load_answer_rule(contents: dict[str, bytes], path: Path, schema_version: int) -> AnswerRule:
    if ANSWER_FILE not in contents:
        return default_answer_rule(
            f"bundle schema {schema_version} has no {ANSWER_FILE} (exported before the subnet answer existed); "
            "re-export it to get the threshold chosen on val_calib"
        )
    try:
        return AnswerRule.model_validate_json(contents[ANSWER_FILE])
    except ValidationError as err:
        raise BundleError(f"{path / ANSWER_FILE} is not a valid answer rule: {err}") from err


def _load_model(
    data: bytes, config: bytes, path: Path, device: torch.device
) -> tuple[RoadworkClassifier, dict]:
    doc = _parse_json(config, path / CLASSIFIER_CONFIG_FILE)
    if not isinstance(doc, dict) or doc.get("format") != CLASSIFIER_FORMAT:
        raise BundleError(
            f"{path / CLASSIFIER_CONFIG_FILE} is not a roadwork classifier config; re-export the bundle"
        )
    if doc.get("format_version") != CLASSIFIER_FORMAT_VERSION:
        raise BundleError(
            f"{path / CLASSIFIER_CONFIG_FILE} has classifier format_version {doc.get('format_version')!r}; this "
            f"roadwork reads {CLASSIFIER_FORMAT_VERSION}. Upgrade roadwork or re-export the bundle."
        )
    try:
        model = rebuild_classifier(doc["classifier"])
        load_weights(model, data, source=str(path / CLASSIFIER_WEIGHTS_FILE))
    except (KeyError, ValueError) as err:
        raise BundleError(f"{path}: the model cannot be rebuilt: {err}") from err
    return model.to(device).eval(), doc


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------------
# Decoding: bytes / path / PIL -> uint8 canvas, done in worker threads one batch ahead of the forward


def _to_canvas(item: ImageInput, name: str, canvas_size: int) -> torch.Tensor:
    """One input -> uint8 (3, C, C); raises ImageRejected / OSError / TypeError naming `name`."""
    from roadwork_core.data.images import decode_image, load_image, to_rgb
    from roadwork_core.data.loading import pil_to_canvas

    if isinstance(item, PIL.Image.Image):
        img = to_rgb(item)
    elif isinstance(item, bytes | bytearray | memoryview):
        img = decode_image(bytes(item), source=name)
    elif isinstance(item, str | os.PathLike):
        img = load_image(os.fspath(item))
    else:
        raise TypeError(f"{name}: expected a PIL image, bytes, or a path, got {type(item).__name__}")
    return pil_to_canvas(img, canvas_size)


def _decode_or_error(item: ImageInput | Exception, name: str, canvas_size: int) -> torch.Tensor | Exception:
    if isinstance(item, Exception):  # an input that already failed upstream (e.g. invalid base64)
        return item
    try:
        return _to_canvas(item, name, canvas_size)
    except (ValueError, OSError, TypeError) as err:  # ImageRejected is a ValueError
        return err


def _batched(
    items: Iterable[tuple[str, ImageInput]], batch_size: int
) -> Iterator[list[tuple[str, ImageInput]]]:
    batch: list[tuple[str, ImageInput]] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------------
# The bundle


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
        manifest = _read_manifest(path)
        contents = _verified_files(path, manifest)
        policy = _load_policy(contents[POLICY_FILE], path / POLICY_FILE, manifest.policy)
        calibrator = _load_calibrator(contents[CALIBRATOR_FILE], path / CALIBRATOR_FILE)
        answer_rule = _load_answer_rule(contents, path, manifest.schema_version)
        dev = _resolve_device(device)
        model, config = _load_model(
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
                return [(name, pool.submit(_decode_or_error, item, name, C)) for name, item in batch]

            batches = _batched(items, batch_size)
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
