"""bench/cpu_account.py, which splits the suite's CPU time by process for `bench.bench_tests --cpu`."""

from __future__ import annotations

import subprocess
import sys

from bench.cpu_account import CpuSampler, kind_of


def test_a_child_started_after_start_is_counted_and_older_processes_are_not():
    sampler = CpuSampler(interval=0.05).start()
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(0.2)"
    subprocess.run([sys.executable, "-c", burn], check=True, timeout=60)
    report = sampler.stop()
    child = report["by_kind"]["python -c / -m child of a test"]  # (+ another xdist worker's, if any)
    assert child["processes"] >= 1 and child["cpu_seconds"] >= 0.5, report
    # the pytest processes (started before the sampler) are not in the accounting
    assert not [k for k in report["by_kind"] if k.startswith("pytest")], report
    assert report["busy_cpu_seconds"] >= 0.5, report
    # the child is named one by one among the costliest processes, with its command line and test
    [mine] = [p for p in report["top_processes"] if "process_time() - t < 0.6" in p["cmdline"]]
    assert mine["cpu_seconds"] >= 0.5 and mine["test"].startswith("tests/unit/test_bench_cpu_account.py"), (
        mine
    )


def test_a_fork_of_a_pytest_worker_is_counted_as_a_tests_process_not_as_pytest():
    """A process pool on the fork context (make_demo_drop's workers, the image table's) keeps the pytest
    worker's command line: the sampler must not take it for the worker itself."""
    import multiprocessing

    sampler = CpuSampler(interval=0.05).start()
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_burn, args=(0.6,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    report = sampler.stop()
    assert (
        report["by_kind"]["fork of a test process (a process pool on the fork context)"]["cpu_seconds"] >= 0.5
    ), report
    assert not [k for k in report["by_kind"] if k.startswith("pytest")], report


def _burn(seconds: float) -> None:
    import time

    t = time.process_time()
    while time.process_time() - t < seconds:
        pass
    time.sleep(0.2)  # alive for the sampler's next poll


def test_process_kinds():
    spawn = "/v/bin/python -B -c from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5)"
    assert kind_of(spawn, "python").startswith("run worker")
    assert kind_of("/v/bin/python /v/bin/dagster asset materialize -m x", "dagster").startswith("dagster CLI")
    assert kind_of("/v/bin/python -c pass /tmp/pytest-of-root/x", "python").startswith("python -c")
    assert kind_of("/usr/lib/chromium/chromium --type=renderer", "chromium") == "chromium"
    assert kind_of("postgres: checkpointer", "postgres") == "postgres"
    assert kind_of("/v/bin/python -m dagster api grpc --lazy-load-user-code", "python").startswith(
        "code server"
    )
