"""Follow a bundle source: poll it, and offer each new candidate to the slot once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from roadwork_core.serving.slot import BundleSlot, Candidate

__all__ = ["ReleaseWatcher"]

log = logging.getLogger("roadwork.serve")


class ReleaseWatcher(threading.Thread):
    """Every `interval` seconds ask `source()` for the newest candidate and offer it to `slot` when it
    is new. A candidate that was refused is not retried (a tampered release stays refused); the next
    release is offered as usual. Errors of the source are logged and the bundle keeps serving."""

    def __init__(self, slot: BundleSlot, source: Callable[[], Candidate | None], interval: float):
        super().__init__(name="roadwork-release-watcher", daemon=True)
        self.slot, self.source, self.interval = slot, source, interval
        self.seen: set[tuple[str, str | None]] = {
            (str(slot.current.candidate.path), slot.current.candidate.expected_id)
        }
        self._stop_event = threading.Event()

    def poll_once(self) -> bool | None:
        """Offer the source's candidate if new: True swapped/kept, False refused, None nothing new."""
        try:
            candidate = self.source()
        except Exception as err:  # the release store being briefly unreadable must not stop serving
            log.warning(
                "could not read the latest release: %r; still serving %s",
                err,
                self.slot.current.bundle_id[:12],
            )
            return None
        if candidate is None:
            return None
        key = (str(candidate.path), candidate.expected_id)
        if key in self.seen:
            return None
        self.seen.add(key)
        return self.slot.offer(candidate)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001  the watcher outlives any one bad release
                log.exception(
                    "checking for a new release failed; still serving %s", self.slot.current.bundle_id[:12]
                )

    def stop(self) -> None:
        self._stop_event.set()
