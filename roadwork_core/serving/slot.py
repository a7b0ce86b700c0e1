"""The served bundle and its atomic replacement.

`BundleSlot.current` is one `ServedBundle`; a request reads it once and uses that object to the end,
so a request in flight finishes on the bundle it started with. `offer` loads and verifies a new bundle
beside the one serving (checksums through `Bundle.load`, the identity the release recorded, a smoke
prediction), then replaces the reference in one assignment; anything that fails is refused, recorded
in `refusals`, and the old bundle keeps serving.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from roadwork_core.bundle.bundle import Bundle, Prediction
from roadwork_core.bundle.schema import BundleError

__all__ = ["BundleSlot", "Candidate", "ServedBundle", "SwapRefused"]

log = logging.getLogger("roadwork.serve")


class SwapRefused(RuntimeError):
    """A candidate bundle that failed verification; the bundle already serving stays."""


@dataclass(frozen=True)
class Candidate:
    """A bundle to serve: its directory and, when a release recorded it, the identity it must have."""

    path: Path
    expected_id: str | None = None  # the manifest content_sha256 the release recorded
    release: str = ""  # where it comes from, for /healthz and logs (e.g. "bundle v0002, run 1a2b")


@dataclass
class ServedBundle:
    bundle: Bundle
    candidate: Candidate
    loaded_at: float

    @property
    def bundle_id(self) -> str:
        return self.bundle.manifest.content_sha256

    def predict(self, image: bytes) -> Prediction:
        # Concurrent requests run their forwards concurrently (inference mode, no shared state). A lock
        # serializing them was measured worse: Python's lock is not FIFO, so under 4 clients a request
        # could wait 49 s behind later ones (bench/bench_serve.py, first run).
        [pred] = self.bundle.predict([image], batch_size=1)
        return pred

    def info(self) -> dict:
        rule = self.bundle.answer_rule
        return {
            "bundle_id": self.bundle_id,
            "dataset_version": self.bundle.manifest.dataset_version,
            "created_at": self.bundle.manifest.created_at,
            "policy": self.bundle.manifest.policy,
            "answer_threshold": rule.threshold,
            "answer_source": rule.source,
            "path": str(self.bundle.path),
            "release": self.candidate.release,
        }


def _smoke_image(size: int) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="JPEG")
    return buf.getvalue()


def load_verified(candidate: Candidate, device: str = "cpu") -> ServedBundle:
    """Load `candidate` and prove it serves: checksums, the recorded identity, one finite prediction."""
    try:
        bundle = Bundle.load(candidate.path, device=device)
    except (BundleError, OSError) as err:
        raise SwapRefused(f"{candidate.path}: {err}") from err
    except Exception as err:  # noqa: BLE001  whatever a hostile bundle raises, it is refused, never served
        raise SwapRefused(f"{candidate.path}: could not load it: {err!r}") from err
    if candidate.expected_id and bundle.manifest.content_sha256 != candidate.expected_id:
        raise SwapRefused(
            f"{candidate.path} holds bundle {bundle.manifest.content_sha256[:12]}, not the released "
            f"{candidate.expected_id[:12]} ({candidate.release}); it was replaced or tampered with after release"
        )
    served = ServedBundle(bundle=bundle, candidate=candidate, loaded_at=time.time())
    try:
        pred = served.predict(_smoke_image(bundle.canvas_size))
    except Exception as err:  # a bundle that cannot predict must never be swapped in, whatever the error
        raise SwapRefused(f"{candidate.path}: the smoke prediction failed: {err!r}") from err
    if not (math.isfinite(pred.p_roadwork) and 0.0 <= pred.answer <= 1.0):
        raise SwapRefused(
            f"{candidate.path}: the smoke prediction gave p={pred.p_roadwork}, answer={pred.answer}"
        )
    return served


class BundleSlot:
    """The bundle being served, swapped atomically (see the module doc)."""

    def __init__(self, first: ServedBundle, device: str = "cpu"):
        self.current = first
        self.device = device
        self.swaps = 0
        self.refusals: list[dict] = []
        self._swap_lock = threading.Lock()  # one load at a time; requests never take it

    def offer(self, candidate: Candidate) -> bool:
        """Serve `candidate` if it verifies (True); refuse it and keep the current bundle (False)."""
        with self._swap_lock:
            try:
                new = load_verified(candidate, self.device)
            except SwapRefused as err:
                self.refusals.append({"at": time.time(), "path": str(candidate.path), "reason": str(err)})
                del self.refusals[:-20]
                log.warning(
                    "refused bundle %s; still serving %s: %s",
                    candidate.path,
                    self.current.bundle_id[:12],
                    err,
                )
                return False
            if new.bundle_id == self.current.bundle_id:
                return True
            old, self.current = self.current, new  # the swap: one reference assignment
            self.swaps += 1
            log.info(
                "now serving bundle %s (was %s): %s",
                new.bundle_id[:12],
                old.bundle_id[:12],
                candidate.release,
            )
            return True

    def health(self) -> dict:
        return {
            "status": "ok",
            **self.current.info(),
            "swaps": self.swaps,
            "refusals": self.refusals[-5:],
        }
