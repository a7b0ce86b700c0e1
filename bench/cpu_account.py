"""Where a command's CPU goes, by process: what `bench.bench_tests --cpu` uses to split the suite's CPU
time between the pytest workers and the processes the tests start (run workers, torchrun ranks,
servers, daemons, the browser).

A background thread polls every process started after `start()` (psutil) every `interval` seconds and
keeps the last CPU time it saw per process; the machine's busy time comes from psutil's system-wide
counters. Two blind spots, reported as the gap between `busy` and `accounted`: a process that lives
less than one interval may be missed, and the CPU of a process's last interval is lost. Processes
that existed before `start()` (other work on the machine) are not counted, so measure on an idle
machine.

    sampler = CpuSampler(); sampler.start(); ...; report = sampler.stop()
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import psutil

# (kind, needles): the first rule with a needle in the command line (or, for programs that are not Python,
# the process name) names the kind.
KINDS = (
    ("pytest worker (in-process tests)", ("import sys;exec(eval(sys.stdin.readline()))",)),
    ("pytest main", ("-m pytest",)),
    (
        "run worker (multiprocessing spawn child: a Dagster run launched by a code server)",
        ("multiprocessing.spawn",),
    ),
    ("code server (dagster api grpc)", ("api grpc",)),
    ("dagster-webserver", ("dagster-webserver",)),
    ("dagster-daemon", ("dagster-daemon",)),
    ("dagster CLI (asset materialize, sensor start, ...)", ("bin/dagster ",)),
    ("torchrun rank", ("torchrun_worker",)),
    ("torchrun launcher", ("torch/distributed/run.py", "bin/torchrun")),
    ("roadwork CLI (serve, predict, make-demo-data)", ("bin/roadwork ",)),
    ("python -c / -m child of a test", ("python",)),
)
PROGRAMS = {
    "chromium": "chromium",
    "chrome": "chromium",
    "headless_shell": "chromium",
    "postgres": "postgres",
}


FORKED_KIND = "fork of a test process (a process pool on the fork context)"


def _forked_from_same_program(proc: psutil.Process, cmdline: str) -> bool:
    """A child whose command line is its parent's: forked (not exec'd), so started by the test running
    in the parent, not a pytest process of its own."""
    try:
        parent = proc.parent()
        return parent is not None and " ".join(parent.cmdline())[:300] == cmdline
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def kind_of(cmdline: str, name: str) -> str:
    for needle, kind in PROGRAMS.items():
        if name.startswith(needle):
            return kind
    for kind, needles in KINDS:
        if any(n in cmdline for n in needles):
            return kind
    return f"other ({name})"


@dataclass
class _Seen:
    kind: str
    test: str
    cmdline: str = ""
    cpu: float = 0.0


class CpuSampler:
    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self._seen: dict[tuple[int, float], _Seen] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)
        self._t0 = 0.0
        self._busy0 = 0.0

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def start(self) -> CpuSampler:
        self._t0 = time.time()
        self._busy0 = self._busy()
        self._thread.start()
        return self

    def _poll(self) -> None:
        me = os.getpid()
        for proc in psutil.process_iter(["pid", "create_time", "name"]):
            info = proc.info
            if info["pid"] == me or not info["create_time"] or info["create_time"] < self._t0 - 1:
                continue
            key = (info["pid"], info["create_time"])
            try:
                times = proc.cpu_times()
                seen = self._seen.get(key)
                if seen is None:
                    cmdline = " ".join(proc.cmdline())[:300]
                    try:
                        test = proc.environ().get("PYTEST_CURRENT_TEST", "")
                    except (psutil.AccessDenied, psutil.ZombieProcess):
                        test = ""
                    kind = kind_of(cmdline, info["name"] or "")
                    if kind.startswith("pytest") and _forked_from_same_program(proc, cmdline):
                        kind = FORKED_KIND  # a test's fork (process pool, fork context) keeps the cmdline
                    seen = self._seen[key] = _Seen(kind, test.split(" ")[0], cmdline)
                seen.cpu = times.user + times.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(self.interval)

    def stop(self, top: int = 40) -> dict:
        """The report; `top` names the costliest processes one by one (command line, test, CPU-s)."""
        self._stop.set()
        self._thread.join()
        self._poll()
        wall, busy = time.time() - self._t0, self._busy() - self._busy0
        by_kind: Counter = Counter()
        n_kind: Counter = Counter()
        by_file: Counter = Counter()
        for seen in self._seen.values():
            by_kind[seen.kind] += seen.cpu
            n_kind[seen.kind] += 1
            if not seen.kind.startswith("pytest"):
                by_file[seen.test.split("::")[0] or "(no test)"] += seen.cpu
        accounted = sum(by_kind.values())
        return {
            "wall_seconds": round(wall, 1),
            "busy_cpu_seconds": round(busy, 1),
            "cores": psutil.cpu_count(),
            "busy_fraction": round(busy / (wall * (psutil.cpu_count() or 1)), 3),
            "accounted_cpu_seconds": round(accounted, 1),
            "by_kind": {
                k: {"cpu_seconds": round(v, 1), "processes": n_kind[k]} for k, v in by_kind.most_common()
            },
            "subprocess_cpu_by_test_file": {k: round(v, 1) for k, v in by_file.most_common()},
            "top_processes": [
                {"cpu_seconds": round(s.cpu, 1), "kind": s.kind, "test": s.test, "cmdline": s.cmdline[:160]}
                for s in sorted(self._seen.values(), key=lambda s: -s.cpu)[:top]
            ],
        }


def format_report(report: dict) -> str:
    lines = [
        f"wall {report['wall_seconds']} s; busy {report['busy_cpu_seconds']} CPU-s of "
        f"{report['cores']} cores ({report['busy_fraction']:.0%}); accounted {report['accounted_cpu_seconds']} CPU-s",
        "by process kind:",
    ]
    lines += [f"  {v['cpu_seconds']:8.1f}  x{v['processes']:<4d} {k}" for k, v in report["by_kind"].items()]
    lines.append("processes the tests started, by test file:")
    lines += [f"  {v:8.1f}  {k}" for k, v in list(report["subprocess_cpu_by_test_file"].items())[:20]]
    lines.append("costliest processes:")
    lines += [
        f"  {p['cpu_seconds']:8.1f}  {p['test'] or '(no test)'}  {p['cmdline'][:110]}"
        for p in report.get("top_processes", [])
    ]
    return "\n".join(lines)
