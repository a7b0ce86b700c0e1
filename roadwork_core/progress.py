"""Human-readable progress: durations as m:ss, and elapsed / remaining time of a counted loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def fmt_duration(seconds: float) -> str:
    """12.3 -> '0:12', 754 -> '12:34', 3725 -> '1:02:05'."""
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class ProgressClock:
    """Elapsed time since creation and the remaining time of `total` units at the mean rate so far."""

    total: int
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self, done: float) -> float | None:
        if done <= 0:
            return None
        return self.elapsed() / done * max(0, self.total - done)

    def describe(self, done: float) -> str:
        """'elapsed 0:42, remaining ~2:06' (remaining unknown until one unit is done)."""
        left = self.remaining(done)
        tail = f", remaining ~{fmt_duration(left)}" if left is not None else ""
        return f"elapsed {fmt_duration(self.elapsed())}{tail}"


def epoch_line(row: dict, total_epochs: int, progress: str = "") -> str:
    """One line per epoch with rounded figures, e.g. 'epoch 3/12: train loss 0.412, val_select MCC
    0.301 (acc 0.655), 14.2 s/epoch, elapsed 0:42, remaining ~2:06' (`progress` is the time part)."""
    parts = [f"train loss {row['train_loss']:.3f}"] if "train_loss" in row else []
    if "select_mcc" in row:
        acc = f" (acc {row['select_acc']:.3f})" if "select_acc" in row else ""
        parts.append(f"val_select MCC {row['select_mcc']:.3f}{acc}")
    if "seconds" in row:
        parts.append(f"{row['seconds']:.1f} s/epoch")
    if progress:
        parts.append(progress)
    return f"epoch {int(row['epoch'])}/{total_epochs}: " + ", ".join(parts)


class BatchProgress:
    """Counts a model's training-mode forward passes (one per training batch) through a forward hook
    and calls `emit(batch, batches_per_epoch)` at most every `every_s` seconds: progress inside a
    long epoch without touching the training loop. Evaluation passes (eval mode) are not counted.
    Use as a context manager; call `epoch_done()` at the end of each epoch."""

    def __init__(self, model, batches_per_epoch: int, emit, every_s: float = 10.0) -> None:
        self.batches_per_epoch, self.emit, self.every_s = batches_per_epoch, emit, every_s
        self.batch, self.last = 0, time.perf_counter()
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if not module.training:
            return
        self.batch += 1
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.emit(self.batch, self.batches_per_epoch)

    def epoch_done(self) -> None:
        self.batch, self.last = 0, time.perf_counter()

    def __deepcopy__(self, memo: dict) -> BatchProgress:
        # A copy of the watched model (timm's ModelEmaV3 deep-copies it for the EMA weights) keeps this
        # observer instead of copying it: `emit` may hold what cannot be copied (the Dagster step context
        # and its locks), and the copy, kept in eval mode, never counts a batch anyway.
        return self

    def __enter__(self) -> BatchProgress:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
