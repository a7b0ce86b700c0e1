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

    def remaining(self, done: int) -> float | None:
        if done <= 0:
            return None
        return self.elapsed() / done * max(0, self.total - done)

    def describe(self, done: int) -> str:
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
