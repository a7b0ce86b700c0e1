"""Shared plumbing for the benchmarks: side-by-side timing, machine facts, atomic JSON results.

The machine is shared and noisy, so a benchmark never reports an absolute time on its own: it times
A and B alternately inside one process (the order flips every repeat so that neither side always
runs on a warmer cache), takes the ratio per repeat and reports the median over repeats.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from roadwork_core.io import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_facts() -> dict:
    """Cores, torch threads, device and load: what a reader needs to judge a figure."""
    import torch

    facts = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1m_5m_15m": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "when_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return facts


# The speed reference: fixed work of the same kinds the suite and the demo do, timed in a fresh interpreter.
# This shared 2-core machine's speed drifts by up to ~1.6x over hours (identical `make test` runs took 5m52s
# and 9m58s on the same day), so an absolute figure (the suite, the demo) is only comparable with another
# taken at a similar reference; ratios measured side by side need no such correction.
_REFERENCE_CODE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, timm
imported = time.perf_counter() - t0
torch.set_num_threads(1)
torch.manual_seed(0)
model = timm.create_model(sys.argv[1], pretrained=False).eval()
x = torch.randn(4, 3, 224, 224)
times = []
with torch.inference_mode():
    model(x)
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter(); model(x); times.append(time.perf_counter() - t)
t = time.perf_counter(); s = 0
for i in range(10_000_000):
    s += i
loop = time.perf_counter() - t
print(json.dumps({"import_torch_timm_seconds": imported, "forward_seconds": sorted(times)[len(times) // 2],
                  "python_loop_seconds": loop}))
"""
REFERENCE_MODEL = "vit_small_patch16_224"


def speed_reference(model: str = REFERENCE_MODEL, repeats: int = 5) -> dict:
    """This machine's speed now, on fixed work in a fresh interpreter (random init, nothing downloaded):
    `import torch, timm` (what every run worker, CLI call and torchrun rank pays), the median of `repeats`
    one-thread forwards of `model` on 4 images at 224 px, and 10^7 additions in a Python loop. Seconds;
    lower is faster. Benchmarks of absolute wall time record one before and one after their run."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _REFERENCE_CODE, model, str(repeats)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"speed reference failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    values = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "model": model,
        "repeats": repeats,
        **{k: round(v, 4) for k, v in values.items()},
        "when_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def machine_label(facts: dict, device: str = "cpu") -> str:
    if device.startswith("cuda") and facts.get("cuda_device"):
        return str(facts["cuda_device"])
    return f"{facts['usable_cores']}-core CPU, {facts['torch_threads']} torch threads"


@dataclass
class SideBySide:
    """Per-repeat seconds of A and B, and the per-repeat ratio `a / b` (so > 1 means B is faster)."""

    a_seconds: list[float] = field(default_factory=list)
    inner: int = 1  # calls per timed sample
    b_seconds: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.a_seconds, self.b_seconds, strict=True)]

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    def as_dict(self) -> dict:
        return {
            "repeats": len(self.a_seconds),
            "calls_per_sample": self.inner,
            "a_seconds": [round(s, 6) for s in self.a_seconds],
            "b_seconds": [round(s, 6) for s in self.b_seconds],
            "ratios_a_over_b": [round(r, 4) for r in self.ratios],
            "median_a_seconds": round(statistics.median(self.a_seconds), 6),
            "median_b_seconds": round(statistics.median(self.b_seconds), 6),
            "median_ratio_a_over_b": round(self.median_ratio, 4),
            "min_ratio": round(min(self.ratios), 4),
            "max_ratio": round(max(self.ratios), 4),
        }


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_by_side(
    a: Callable[[], object],
    b: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    min_seconds: float = 0.0,
) -> SideBySide:
    """Time `a` and `b` alternately `repeats` times after `warmup` untimed rounds of each.

    Even repeats run A then B, odd repeats B then A. With `min_seconds` > 0 each timed sample calls
    its function `inner` times in a row (the same count for A and B), chosen from the warm-up so the
    slower side takes at least `min_seconds`: a millisecond call is otherwise all scheduler noise.
    Reported seconds are per call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    slowest = 0.0
    for _ in range(max(1, warmup)):
        slowest = max(slowest, timed(a), timed(b))
    inner = max(1, math.ceil(min_seconds / slowest)) if min_seconds > 0 and slowest > 0 else 1

    def run(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner

    out = SideBySide(inner=inner)
    for i in range(repeats):
        if i % 2 == 0:
            ta = run(a)
            tb = run(b)
        else:
            tb = run(b)
            ta = run(a)
        out.a_seconds.append(ta)
        out.b_seconds.append(tb)
    return out


def write_result(name: str, result: dict) -> Path:
    """Write `bench/results/<name>.json` atomically and print where it went."""
    path = RESULTS_DIR / f"{name}.json"
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=False) + "\n")
    print(f"[bench] wrote {path}")
    return path


def read_result(name: str) -> dict | None:
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def set_threads(n: int | None = None) -> int:
    """Use all usable cores (2 on the shared machine) unless told otherwise; returns the count used."""
    import torch

    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def synthetic_rows(root: Path, n: int, version: str = "v0001", seed: int = 0, n_unlabelled: int = 0):
    """A synthetic labels.csv drop of `n` scenes under `root` -> (image table, splits) DataFrames.

    Same path as the `image_table` and `splits` assets (build_image_table, assign_splits).
    """
    from roadwork_core.data.image_table import build_image_table
    from roadwork_core.data.splits import SplitConfig, assign_splits
    from roadwork_core.data.synthetic import make_demo_drop

    drop = Path(root) / version
    if not (drop / "_READY").exists():
        make_demo_drop(Path(root), version, n=n, seed=seed, n_unlabelled=n_unlabelled)
    images = build_image_table([drop]).images
    return images, assign_splits(images, SplitConfig())


def dagster_step_durations(log_text: str) -> dict[str, str]:
    """step name -> duration text from Dagster's 'Finished execution of step "x" in 1m2s.' log lines."""
    import re

    return dict(re.findall(r'Finished execution of step "(\w+)" in ([\dhms.]+?)\.?\s', log_text))
