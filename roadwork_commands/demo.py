"""`make demo`: a synthetic drop -> the whole graph through the real `dagster asset materialize` CLI on
the embedded instance -> a summary -> a `roadwork predict` call from a fresh process.

    python -m roadwork_commands.demo --inbox data/inbox --version v0001 --n 2000 --config configs/demo.yaml
"""

import argparse
import contextlib
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from roadwork_assets._util import latest_materialization_metadata
from roadwork_assets.partitions import dataset_version
from roadwork_core.data.split_checks import WARNING_CHECKS
from roadwork_core.progress import fmt_duration

# the project's commands through this interpreter, not their console scripts: a checkout moved or renamed
# after `make venv` keeps scripts whose first line names the old path (`.venv/bin/dagster` then "does not exist")
_MODULES = {"dagster": "dagster", "roadwork": "roadwork_core.cli"}


def _console(name: str) -> list[str]:
    return [sys.executable, "-m", _MODULES[name]]


def ensure_drop(inbox: Path, version: str, n: int, seed: int, n_unlabelled: int) -> Path:
    from roadwork_core.data.synthetic import make_demo_drop

    drop = inbox / version
    if (drop / "_READY").exists():
        held = _labelled_rows(drop)
        differs = (
            f" (it holds {held} labelled images, not the --n {n} asked: use another --version, or "
            f"`make clean-state` for a new one)"
            if held is not None and held != n
            else ""
        )
        print(f"[demo] drop {drop} already complete; reusing it{differs}")
        return drop
    t0 = time.perf_counter()
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    make_demo_drop(inbox, version, n=n, seed=seed, n_unlabelled=n_unlabelled, workers=workers)
    print(
        f"[demo] wrote {n} synthetic scenes (+{n_unlabelled} unlabelled) to {drop} in {time.perf_counter() - t0:.1f}s"
        f" ({workers} processes)"
    )
    return drop


def _labelled_rows(drop: Path) -> int | None:
    """Rows of a demo drop's labels.csv (None when it has none: not a drop this command wrote)."""
    try:
        with (drop / "labels.csv").open(encoding="utf-8") as f:
            return max(0, sum(1 for line in f if line.strip()) - 1)
    except OSError:
        return None


# A line of Dagster's console log: "<date> <time> <tz> - dagster - LEVEL - job - run_id - [pid - ][step - ][EVENT - ]message"
_DAGSTER_LINE = re.compile(
    r"^\S+ \S+ \S+ - dagster - (?P<level>[A-Z]+) - \S+ - [0-9a-f-]{36} - (?:\d+ - )?"
    r"(?:(?P<step>[a-z_][\w.\[\]]*) - )?(?:(?P<event>[A-Z][A-Z_]+) - )?(?P<msg>.*)$"
)
# roadwork's own progress messages (assets' context.log.info) shown on the terminal
_PROGRESS = re.compile(r"^(epoch \d+/\d+|batch \d+/\d+|ExPLoRA step \d+/\d+|waiting for)")
_ERROR_TEXT = re.compile(r"^[\w.]*(Error|Exception|Failure|Violation)\b.*: ")
_CHECK_PASSED = re.compile(r"^Asset check '[^']*' on '[^']*' passed\b")
_CHECK_NAME = re.compile(r"^Asset check '([^']*)' on '[^']*'")
HEARTBEAT_S = 15.0


class _StepWatcher:
    """Turns Dagster's event stream into a few terminal lines: one when a step starts and ends,
    the assets' progress lines, a line for each failed check, and a heartbeat every HEARTBEAT_S
    seconds while a step runs without saying anything."""

    def __init__(self, out=sys.stdout, on_step_done: Callable[[str], None] | None = None) -> None:
        self.out = out
        self.on_step_done = on_step_done  # called with the name of each asset step that succeeded
        self.started: dict[str, float] = {}
        self.last_word: dict[str, str] = {}
        self.last_print = time.perf_counter()
        self.checks = {"passed": 0, "warned": 0, "failed": 0}
        self.failures: list[str] = []  # error lines of failed steps
        self.failing = False  # the previous event was a STEP_FAILURE: its error text follows

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)
        self.last_print = time.perf_counter()

    def feed(self, line: str) -> None:
        m = _DAGSTER_LINE.match(line.rstrip("\n"))
        if not m:  # a continuation line (traceback, error text) of the previous event
            text = line.strip()
            if self.failing and _ERROR_TEXT.match(text) and not text.startswith("dagster._core.errors."):
                self.failures.append(text)
                self.say(f"[demo]   {text[:400]}")
            return
        self.failing = False
        step, event, msg = m["step"], m["event"], m["msg"]
        is_check = bool(step) and "_check_" in step  # check steps: counted, named only when they fail
        now = time.perf_counter()
        if event == "STEP_START" and step and not is_check:
            self.started[step] = now
            self.say(f"[demo] {step}: started")
        elif event == "STEP_SUCCESS" and step and not is_check:
            self.say(f"[demo] {step}: done in {fmt_duration(now - self.started.pop(step, now))}")
            if self.on_step_done is not None:
                self.on_step_done(step)
        elif event == "STEP_FAILURE" and step:
            self.started.pop(step, None)
            self.failing = True
            self.say(f"[demo] {step}: FAILED ({msg[:300]})")
        elif event == "ASSET_CHECK_EVALUATION":
            passed = _CHECK_PASSED.match(msg) is not None
            name = _CHECK_NAME.match(msg)
            warning = not passed and name is not None and name.group(1) in WARNING_CHECKS
            self.checks["passed" if passed else "warned" if warning else "failed"] += 1
            if not passed:
                self.say(f"[demo]   {'warning (non-blocking): ' if warning else ''}{msg[:400]}")
        elif event is None and step and _PROGRESS.match(msg):
            self.last_word[step] = msg.split(":")[0].split(",")[
                0
            ]  # "epoch 3/12", "batch 20/38 of epoch 4/12"
            if not msg.startswith("batch "):  # batch lines only feed the heartbeat: one line per epoch
                self.say(f"[demo]   {step}: {msg}")

    def tick(self) -> None:
        now = time.perf_counter()
        if self.started and now - self.last_print >= HEARTBEAT_S:
            running = ", ".join(
                f"{step} {fmt_duration(now - t0)}"
                + (f" (last: {self.last_word[step]})" if step in self.last_word else "")
                for step, t0 in self.started.items()
            )
            self.say(f"[demo]   still running: {running}")


def materialize(
    version: str, config: Path, log_path: Path, on_step_done: Callable[[str], None] | None = None
) -> None:
    """`dagster asset materialize` with its whole event stream (DEBUG included) in `log_path` and a
    readable digest of it on the terminal; `on_step_done(step)` runs as each asset step succeeds."""
    cmd = [
        *_console("dagster"),
        "asset",
        "materialize",
        "-m",
        "roadwork_assets.definitions",
        "--select",
        "*",
        "--partition",
        version,
        "-c",
        str(config),
    ]
    print("[demo] " + " ".join(cmd))
    print(f"[demo] Dagster's event log (DEBUG): {log_path}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    watcher = _StepWatcher(on_step_done=on_step_done)
    lines: queue.Queue[str | None] = queue.Queue()
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

        def pump() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    watcher.tick()
                    continue
                if line is None:
                    break
                log.write(line)
                log.flush()
                watcher.feed(line)
                watcher.tick()
        except KeyboardInterrupt:
            proc.terminate()  # Dagster marks the run canceled/failed on its way out
            proc.wait(timeout=60)
            raise SystemExit(f"[demo] interrupted; Dagster's log so far: {log_path}") from None
        returncode = proc.wait()
    checks = watcher.checks
    warned = f", {checks['warned']} warned (non-blocking: see above)" if checks["warned"] else ""
    print(f"[demo] asset checks: {checks['passed']} passed{warned}, {checks['failed']} failed")
    if returncode != 0:
        raise SystemExit(
            f"[demo] dagster asset materialize failed (exit {returncode}); the whole log is {log_path}"
            + "".join(f"\n  {f[:600]}" for f in watcher.failures[-5:])
        )
    took = time.perf_counter() - t0
    print(f"[demo] graph materialized in {fmt_duration(took)} ({took:.1f}s)")


def summarize(instance: dg.DagsterInstance, version: str, log_path: Path | None = None) -> Path:
    from roadwork_core.metrics.report import read_report

    def meta(asset: str) -> dict:
        return latest_materialization_metadata(instance, dg.AssetKey(asset), version)

    images, clf, bundle_meta, report_meta = (
        meta("image_table"),
        meta("classifier"),
        meta("bundle"),
        meta("evaluation_report"),
    )
    bundle_dir = Path(bundle_meta["path"]) / "dir"
    report_dir = Path(report_meta["path"]) / "dir"
    report = read_report(report_dir)
    print("\n==== roadwork demo summary ====")
    print(
        f"dataset version {version}: {images.get('num_images')} images accepted, {images.get('num_rejected')} rejected"
    )
    speedup = clf.get("cache_speedup_first_vs_later_epochs")
    print(
        f"classifier: mode {clf.get('mode')}, best epoch {clf.get('best_epoch')} of {clf.get('epochs_run')}, "
        f"val_select MCC {clf.get('best_select_mcc', float('nan')):.3f}"
        + (f", feature cache: epoch 1 / later epochs = {speedup:.0f}x" if speedup else "")
    )
    print(f"bundle ({bundle_meta.get('release_policy')} policy) at {bundle_dir}")
    print(f"  guarantee: {bundle_meta.get('guarantee')}")
    print(
        f"  on val_calib: coverage {bundle_meta.get('calib_coverage', float('nan')):.3f}, "
        f"FNR {bundle_meta.get('calib_fnr', float('nan')):.3f}, FPR {bundle_meta.get('calib_fpr', float('nan')):.3f}"
    )
    print(f"evaluation on val_test ({report_dir}):")
    print((report_dir / "summary.md").read_text())
    guarantee = report.guarantee_check or {}
    print(f"guarantee check on val_test: {guarantee.get('message')}")
    stream = (report.subnet or {}).get("stream") or []
    if stream:  # the headline of the subnet section printed above
        print(
            "subnet (validator replica), expected reward per query: "
            + ", ".join(
                f"{r['answer']} {r['expected_reward']:.3f} [{r['low']:.3f}, {r['high']:.3f}]" for r in stream
            )
        )
    print("\nLook at it:")
    print(
        "  Dagster UI:  make ui   (then http://127.0.0.1:3000, asset evaluation_report, partition "
        + version
        + ")"
    )
    print(f"  MLflow UI:   {mlflow_ui_command(os.environ.get('MLFLOW_TRACKING_URI'))}")
    if log_path is not None:
        print(f"  Dagster's full event log (DEBUG): {log_path}")
    return bundle_dir


def mlflow_ui_command(tracking_uri: str | None) -> str:
    """The `mlflow ui` line to print: bound to 127.0.0.1; a URI with credentials is never printed
    (the line refers to $MLFLOW_TRACKING_URI instead, which the user's shell already holds)."""
    from urllib.parse import urlsplit

    store = tracking_uri or "sqlite:///state/mlflow.db"
    lowered = store.lower()
    if (
        urlsplit(store).password is not None
        or "@" in store
        or any(k in lowered for k in ("password", "token"))
    ):
        store = '"$MLFLOW_TRACKING_URI"'
    else:
        store = shlex.quote(store)  # a state folder under a path with spaces
    return f".venv/bin/mlflow ui --backend-store-uri {store} --host 127.0.0.1"


class BackgroundPredict:
    """`roadwork predict --bundle <bundle> <k images>` from a fresh process, started as soon as the
    `bundle` step succeeds (it runs beside `evaluation_report`), its output printed by `show()`."""

    def __init__(self, instance: dg.DagsterInstance, version: str, drop: Path, k: int = 3) -> None:
        self.instance, self.version, self.drop, self.k = instance, version, drop, k
        self.cmd: list[str] = []
        self.proc: subprocess.Popen | None = None

    def on_step_done(self, step: str) -> None:
        if step == "bundle" and self.proc is None:
            try:
                self.start()
            except (Exception, SystemExit) as exc:  # never stop watching the graph for this; show() retries
                print(f"[demo] roadwork predict not started yet ({type(exc).__name__}: {exc})", flush=True)

    def start(self) -> None:
        meta = latest_materialization_metadata(self.instance, dg.AssetKey("bundle"), self.version)
        if not meta.get("path"):
            raise SystemExit(
                f"[demo] no materialization of bundle for partition {self.version} to predict with"
            )
        images = sorted((self.drop / "images").glob("*.jpg"))[: self.k]
        self.cmd = [
            *_console("roadwork"),
            "predict",
            "--bundle",
            str(Path(meta["path"]) / "dir"),
            *map(str, images),
        ]
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def show(self) -> None:
        if self.proc is None:  # the watcher saw no bundle step (e.g. it was not re-run)
            self.start()
        stdout, stderr = self.proc.communicate()
        print("\n[demo] " + " ".join(["roadwork", *self.cmd[len(_console("roadwork")) :]]))
        if self.proc.returncode != 0:
            raise SystemExit(
                f"[demo] roadwork predict failed (exit {self.proc.returncode}): {stderr.strip()}"
            )
        for line in stdout.splitlines():  # JSON lines for a program; rounded for a person here
            pred = json.loads(line)
            name = Path(pred["image"]).name
            if "error" in pred:
                print(f"  {name}: error: {pred['error']}")
            else:
                print(f"  {name}: p_roadwork {pred['p_roadwork']:.3f} -> {pred['decision']}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class BackgroundAblation:
    """The ExPLoRA ablation (`python -m roadwork_commands.ablation --stage-on-stdin`) in its own process
    beside the graph, its output kept in `log_path` and printed by `finish()`.

    It starts with the graph, at the lowest CPU priority (nice 19) and on one thread, and imports what
    it needs while the graph's first steps leave a core idle. `on_step_done` writes `splits` to its
    standard input when that step ends (it then runs the base probe beside `explora_backbone`) and
    `explora_backbone` when that one ends (the ExPLoRA probe, beside the classifier and the steps after
    it). `graph_done()` moves it to two threads once the graph has ended."""

    STAGES = ("splits", "explora_backbone")

    def __init__(self, version: str, config: str, log_path: Path) -> None:
        # one thread while it shares the machine with the graph's remaining steps, two once the graph ends
        self.cmd = [sys.executable, "-m", "roadwork_commands.ablation", "--partition", version, "-c", config]
        self.cmd += ["--threads", "1", "--threads-on-signal", "2", "--nice", "19"]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.staged: list[str] = []
        self.t0 = 0.0

    def start(self, staged: bool = True) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*self.cmd, "--stage-on-stdin"] if staged else self.cmd
        with self.log_path.open("w") as log:  # the child holds its own descriptor
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if staged else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        self.t0 = time.perf_counter()
        print(f"[demo] ExPLoRA ablation started beside the graph (output: {self.log_path})", flush=True)

    def on_step_done(self, step: str) -> None:
        if self.proc is None or self.proc.stdin is None or step not in self.STAGES or step in self.staged:
            return
        self.staged.append(step)
        with contextlib.suppress(BrokenPipeError):  # it failed already: finish() reports its log
            self.proc.stdin.write(step + "\n")
            self.proc.stdin.flush()
            if len(self.staged) == len(self.STAGES):
                self.proc.stdin.close()

    def graph_done(self) -> None:
        """The graph has ended and both cores are free: SIGUSR1 tells the ablation to use two threads."""
        if self.proc is None or self.proc.poll() is not None:
            return
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - self.t0)))  # its handler is set within ~0.1 s
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGUSR1)

    def finish(self) -> None:
        """Wait for the ablation and print its output (the graph has ended: both assets exist)."""
        print("\n[demo] " + " ".join(["python", *self.cmd[1:]]))
        if self.proc is None:
            self.start(staged=False)
        elif self.proc.stdin is not None and not self.proc.stdin.closed:  # the watcher missed a step
            for step in self.STAGES:
                self.on_step_done(step)
        waited = time.perf_counter()
        returncode = self.proc.wait()
        output = self.log_path.read_text(errors="replace")
        print(output.rstrip("\n"))
        print(
            f"[demo] ablation took {fmt_duration(time.perf_counter() - self.t0)}, "
            f"of which {fmt_duration(time.perf_counter() - waited)} after the graph"
        )
        if returncode != 0:
            raise SystemExit(
                f"[demo] the ExPLoRA ablation failed (exit {returncode}); its log: {self.log_path}"
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inbox", default=os.environ.get("ROADWORK_INBOX", "data/inbox"))
    parser.add_argument("--version", default="v0001")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--n-unlabelled", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument(
        "--no-ablation",
        dest="ablation",
        action="store_false",
        help="skip the ExPLoRA head-probe ablation at the end",
    )
    args = parser.parse_args(argv)
    from roadwork_core.data.drops import version_name_problem

    if (problem := version_name_problem(args.version)) is not None:
        parser.error(f"--version {args.version!r} cannot be a dataset version: it {problem}")
    if not Path(args.config).is_file():  # dagster would say so only in the event log, after the drop was made
        parser.error(
            f"--config {args.config}: no such file; give a run config YAML such as configs/demo.yaml"
        )
    from roadwork_assets._util import late_version_message, late_versions

    instance = dg.DagsterInstance.get()
    new_version = not instance.has_dynamic_partition(dataset_version.name, args.version)
    if new_version and (late := late_versions(instance, [args.version])):  # as `partitions add` refuses it
        parser.error(late_version_message(args.version, late[args.version]))
    # the graph's runs read the inbox from ROADWORK_INBOX: the one this command writes to (--inbox was
    # ignored by the graph, which then trained on another inbox's drop of the same name, or failed)
    os.environ["ROADWORK_INBOX"] = str(Path(args.inbox).resolve())

    t0 = time.perf_counter()
    drop = ensure_drop(Path(args.inbox), args.version, args.n, args.seed, args.n_unlabelled)
    if new_version:
        instance.add_dynamic_partitions(dataset_version.name, [args.version])
    logs = Path(os.environ.get("ROADWORK_STATE", "state")) / "logs"
    log_path = logs / f"demo-{args.version}.log"
    ablation = BackgroundAblation(args.version, args.config, logs / f"ablation-{args.version}.log")
    predict = BackgroundPredict(instance, args.version, drop)

    def on_step_done(step: str) -> None:
        predict.on_step_done(step)
        if args.ablation:
            ablation.on_step_done(step)

    try:
        if args.ablation:
            ablation.start()
        materialize(args.version, Path(args.config), log_path, on_step_done)
        ablation.graph_done()
        summarize(instance, args.version, log_path)
        predict.show()
        if args.ablation:
            ablation.finish()
    finally:
        predict.stop()
        ablation.stop()  # a failed graph or Ctrl-C leaves no ablation or predict process running
    took = time.perf_counter() - t0
    print(f"\n[demo] done in {fmt_duration(took)} ({took:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
