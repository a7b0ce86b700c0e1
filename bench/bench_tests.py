"""Where people wait on the test suite (issue 19, item 4).

1. Loading the Dagster definitions, which every code server, `dagster` CLI call, sensor tick and run
   worker does: `import roadwork_assets.definitions` in a fresh interpreter, against the same import
   plus torch and torchmetrics (what loading the definitions pulled in before the training stack was
   imported lazily, inside the asset bodies). Alternating fresh processes, median of repeats.
2. The whole suite as `make test` runs it (pytest-xdist, `-n auto --dist worksteal`, slow tests first):
   wall seconds, pass/fail counts. `--serial` also times `-n 0` for the ratio (about 20 minutes more on
   2 cores). `--cpu` also splits the machine's busy CPU time during the (last) suite run by process kind
   (pytest workers, run workers, torchrun ranks, servers, ...) and by the test that started each process
   (bench/cpu_account.py): on 2 cores the suite is CPU-bound, so CPU-seconds are what a cut must remove.

    python -m bench.bench_tests [--repeats 5] [--suite-runs 1] [--serial] [--skip-suite] [--cpu]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine_facts, read_result, side_by_side, speed_reference, write_result
from bench.cpu_account import CpuSampler, format_report

REPO = Path(__file__).resolve().parent.parent


def _fresh_import(statement: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", statement], cwd=REPO, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"`python -c {statement!r}` failed:\n{proc.stderr[-2000:]}")


def definitions_load(repeats: int) -> dict:
    light = "import roadwork_assets.definitions"
    heavy = "import roadwork_assets.definitions, torch, torchmetrics"
    sbs = side_by_side(lambda: _fresh_import(heavy), lambda: _fresh_import(light), repeats=repeats)
    return {"a": heavy, "b": light, **sbs.as_dict()}


def _suite(workers: str, cpu: bool = False) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-n",
        workers,
        "--dist",
        "worksteal",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sampler = CpuSampler().start() if cpu else None
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    cpu_report = sampler.stop() if sampler else None
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    # pytest's short summary ("FAILED tests/...::name - reason", "ERROR ..."): a timing with failures names them
    failures = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if proc.returncode != 0:
        print(f"[bench] the suite exited {proc.returncode}:", *failures or [proc.stdout[-3000:]], sep="\n  ")
    return {
        "command": " ".join(cmd[1:]),
        "seconds": round(seconds, 1),
        "exit": proc.returncode,
        "summary": tail,
        "failures": failures,
        **counts,
        **({"cpu": cpu_report} if cpu_report else {}),
    }


def _reference_line(suite: dict) -> str:
    keys = ("import_torch_timm_seconds", "forward_seconds", "python_loop_seconds")
    before, after = suite["speed_reference_before"], suite["speed_reference_after"]
    return ", ".join(f"{k.removesuffix('_seconds')} {before[k]:.2f} / {after[k]:.2f} s" for k in keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--suite-runs", type=int, default=1)
    parser.add_argument("--serial", action="store_true", help="also time the suite in one process (-n 0)")
    parser.add_argument("--skip-suite", action="store_true", help="keep the previous suite figures")
    parser.add_argument("--cpu", action="store_true", help="split the last suite run's CPU time by process")
    args = parser.parse_args(argv)

    result = {"machine": machine_facts(), "definitions_load": definitions_load(args.repeats)}
    load = result["definitions_load"]
    print(
        f"[bench] definitions load {load['median_b_seconds']:.2f} s vs {load['median_a_seconds']:.2f} s with "
        f"torch + torchmetrics: {load['median_ratio_a_over_b']:.2f}x (n={load['repeats']})",
        flush=True,
    )
    previous = read_result("tests") or {}
    if args.skip_suite:
        result["suite"] = previous.get("suite")
        result["suite_serial"] = previous.get("suite_serial")
    else:
        reference_before = speed_reference()
        runs = [_suite("auto", cpu=args.cpu and i == args.suite_runs - 1) for i in range(args.suite_runs)]
        result["suite"] = {
            "runs": runs,
            "median_seconds": statistics.median(r["seconds"] for r in runs),
            "all_green": all(r["exit"] == 0 for r in runs),
            "speed_reference_before": reference_before,
            "speed_reference_after": speed_reference(),
        }
        print(
            f"[bench] test suite (xdist): {[r['seconds'] for r in runs]} s; {runs[-1]['summary']}", flush=True
        )
        print(f"[bench] speed reference before / after: {_reference_line(result['suite'])}", flush=True)
        if "cpu" in runs[-1]:
            print(format_report(runs[-1]["cpu"]), flush=True)
        result["suite_serial"] = _suite("0") if args.serial else previous.get("suite_serial")
    write_result("tests", result)
    suite = result.get("suite") or {}
    return 0 if suite.get("all_green", True) else 1


if __name__ == "__main__":
    sys.exit(main())
