"""`make demo`'s terminal: Dagster's event stream reduced to stage lines, progress lines, failed checks
and the error of a failed step; rounded per-epoch lines with elapsed / remaining time."""

from __future__ import annotations

import io
import time

import pytest

from roadwork_commands import demo
from roadwork_core.progress import BatchProgress, ProgressClock, epoch_line, fmt_duration

# Recorded from `dagster asset materialize` 1.13.27 (a two-asset graph with a passing and a failing
# check and a step that raises), abridged: the shapes of the lines the demo must read.
RUN = "60299a11-9cbd-4719-8cf8-fd3e4a40b7d3"
STREAM = f"""\
2026-12-01 10:37:49 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - 6920 - RUN_START - Started execution of run for "__ASSET_JOB".
2026-12-01 10:38:00 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - 8470 - LOGS_CAPTURED - Capturing logs for process (pid: 8470).
2026-12-01 10:38:00 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - 8470 - a - STEP_START - Started execution of step "a".
2026-12-01 10:38:00 +0000 - dagster - INFO - __ASSET_JOB - {RUN} - a - epoch 1/2: train loss 0.500, elapsed 0:01, remaining ~0:01
2026-12-01 10:38:00 +0000 - dagster - INFO - __ASSET_JOB - {RUN} - a - some other info line
2026-12-01 10:38:00 +0000 - dagster - INFO - __ASSET_JOB - {RUN} - a - batch 3/8 of epoch 2/2, elapsed 0:01, remaining ~0:01
2026-12-01 10:38:01 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - a - Writing file at: /tmp/home/storage/a using PickledObjectFilesystemIOManager...
2026-12-01 10:38:01 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - 8470 - a - STEP_SUCCESS - Finished execution of step "a" in 676ms.
2026-12-01 10:38:28 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - 8763 - a_check_a - STEP_START - Started execution of step "a_check_a".
2026-12-01 10:38:29 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - 8763 - a_check_a - ASSET_CHECK_EVALUATION - Asset check 'check_a' on 'a' passed. Description: 'all 160 image_ids are unique'
2026-12-01 10:38:29 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - 8763 - a_check_a - STEP_SUCCESS - Finished execution of step "a_check_a" in 991ms.
2026-12-01 10:38:30 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - 8764 - a_check_b - ASSET_CHECK_EVALUATION - Asset check 'check_b' on 'a' did not pass. Description: 'b is wrong'
2026-12-01 10:38:44 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - 10562 - b - STEP_START - Started execution of step "b".
2026-12-01 10:38:45 +0000 - dagster - ERROR - __ASSET_JOB - {RUN} - 10562 - b - STEP_FAILURE - Execution of step "b" failed.

dagster._core.errors.DagsterExecutionStepExecutionError: Error occurred while executing op "b"::

ValueError: boom: bad thing

Stack Trace:
  File "/work/defs2.py", line 14, in b
2026-12-01 10:38:49 +0000 - dagster - ERROR - __ASSET_JOB - {RUN} - 6920 - RUN_FAILURE - Execution of run for "__ASSET_JOB" failed. Steps failed: ['b'].
"""


def test_watcher_keeps_stage_progress_failed_checks_and_errors():
    out = io.StringIO()
    watcher = demo._StepWatcher(out=out)
    for line in STREAM.splitlines(keepends=True):
        watcher.feed(line)
    lines = out.getvalue().splitlines()
    assert lines == [
        "[demo] a: started",
        "[demo]   a: epoch 1/2: train loss 0.500, elapsed 0:01, remaining ~0:01",
        "[demo] a: done in 0:00",
        "[demo]   Asset check 'check_b' on 'a' did not pass. Description: 'b is wrong'",
        "[demo] b: started",
        '[demo] b: FAILED (Execution of step "b" failed.)',
        "[demo]   ValueError: boom: bad thing",
    ]
    assert watcher.checks == {"passed": 1, "warned": 0, "failed": 1}
    assert watcher.failures == ["ValueError: boom: bad thing"]


def test_a_warning_check_is_counted_and_shown_as_a_warning():
    out = io.StringIO()
    watcher = demo._StepWatcher(out=out)
    watcher.feed(
        f"2026-12-02 10:38:30 +0000 - dagster - DEBUG - __ASSET_JOB - {RUN} - 8764 - splits_check_near_duplicate_"
        "labels_agree - ASSET_CHECK_EVALUATION - Asset check 'check_near_duplicate_labels_agree' on 'splits' did "
        "not pass. Description: '2 near-duplicate pairs carry different labels'\n"
    )
    assert watcher.checks == {"passed": 0, "warned": 1, "failed": 0}
    assert out.getvalue().startswith(
        "[demo]   warning (non-blocking): Asset check 'check_near_duplicate_labels"
    )


def test_heartbeat_names_the_running_step_and_its_last_progress():
    out = io.StringIO()
    watcher = demo._StepWatcher(out=out)
    for line in STREAM.splitlines(keepends=True)[:6]:  # step a started, an epoch line, a batch line
        watcher.feed(line)
    watcher.tick()  # just printed: quiet
    assert "still running" not in out.getvalue()
    watcher.last_print -= demo.HEARTBEAT_S
    watcher.started["a"] -= 75
    watcher.tick()
    last = out.getvalue().splitlines()[-1]
    assert last == "[demo]   still running: a 1:15 (last: batch 3/8 of epoch 2/2)", last


def test_progress_figures_are_rounded(monkeypatch):
    assert [fmt_duration(s) for s in (0.4, 12.3, 754, 3725)] == ["0:00", "0:12", "12:34", "1:02:05"]
    row = {
        "epoch": 3,
        "train_loss": 0.6824864085409199,
        "select_mcc": 0.30123,
        "select_acc": 0.655,
        "seconds": 14.21,
    }
    line = epoch_line(row, 12, "elapsed 0:42, remaining ~2:06")
    assert line == (
        "epoch 3/12: train loss 0.682, val_select MCC 0.301 (acc 0.655), 14.2 s/epoch, "
        "elapsed 0:42, remaining ~2:06"
    )
    clock = ProgressClock(total=10, start=0.0)
    monkeypatch.setattr("roadwork_core.progress.time.perf_counter", lambda: 30.0)
    assert clock.describe(0) == "elapsed 0:30"
    assert clock.describe(3) == "elapsed 0:30, remaining ~1:10"


def test_batch_progress_counts_training_forwards_only():
    import torch

    model = torch.nn.Linear(3, 1)
    seen: list[tuple[int, int]] = []
    with BatchProgress(model, batches_per_epoch=4, emit=lambda b, n: seen.append((b, n)), every_s=0.0) as bp:
        model.train()
        for _ in range(3):
            model(torch.zeros(2, 3))
        model.eval()
        model(torch.zeros(2, 3))  # an evaluation pass: not a training batch
        bp.epoch_done()
        model.train()
        model(torch.zeros(2, 3))
    model(torch.zeros(2, 3))  # after the context: the hook is gone
    assert seen == [(1, 4), (2, 4), (3, 4), (1, 4)]


class _Reporter:
    """What the classifier asset passes as `emit`: a bound method of an object holding the Dagster
    step context, which holds locks and cannot be copied."""

    def __init__(self) -> None:
        import threading

        self.lock, self.seen = threading.Lock(), []

    def on_batch(self, batch: int, of: int) -> None:
        with self.lock:
            self.seen.append(batch)


def test_batch_progress_sees_every_batch_of_the_real_training_loop(tmp_path):
    """One training-mode forward of the classifier per batch in `train_classifier` (full mode, with the
    EMA that deep-copies the watched model): the hook's batch numbers are the loop's own, val_select
    evaluation adds none, and an `emit` that cannot be copied does not break the EMA's copy."""
    from roadwork_core.training.supervised import train_classifier
    from tests.unit.test_training import _cfg, _images, _model

    train, select = _images(tmp_path / "train", 6, seed=0), _images(tmp_path / "select", 4, seed=1)
    model = _model()
    reporter = _Reporter()
    cfg = _cfg(mode="full", epochs=1, augment_max_level=0)
    assert cfg.ema_decay, "the EMA (a deep copy of the model) must be on for this test"
    with BatchProgress(model, 2, emit=reporter.on_batch, every_s=0.0) as bp:
        train_classifier(
            model, train, select, cfg,
            checkpoint_dir=tmp_path / "ckpt", on_epoch=lambda row: (reporter.seen.append(-row["epoch"]), bp.epoch_done()),
        )  # fmt: skip
    assert reporter.seen == [1, 2, -1], reporter.seen  # 6 images / batch 4 = 2 batches


def test_watcher_reports_each_asset_step_that_succeeded():
    done: list[str] = []
    watcher = demo._StepWatcher(out=io.StringIO(), on_step_done=done.append)
    for line in STREAM.splitlines(keepends=True):
        watcher.feed(line)
    assert done == ["a"]  # not the failed step b, not the check steps


def test_background_ablation_is_fed_its_steps_and_prints_its_output(tmp_path, capsys):
    import sys

    job = demo.BackgroundAblation("v0001", "configs/demo.yaml", tmp_path / "logs" / "ablation.log")
    job.cmd = [
        sys.executable,
        "-c",
        "import sys; print('argv', sys.argv[1:]); print('stages', [l.strip() for l in sys.stdin])",
    ]
    job.on_step_done("splits")
    assert job.proc is None  # not started: nothing to feed
    job.start()
    for step in ("image_table", "splits", "splits", "explora_backbone", "classifier"):
        job.on_step_done(step)
    assert job.proc.stdin.closed, "both stages written: its input ends"
    job.finish()
    out = capsys.readouterr().out
    assert "argv ['--stage-on-stdin']" in out and "stages ['splits', 'explora_backbone']" in out, out
    assert "ablation took" in out

    missed = demo.BackgroundAblation("v0001", "configs/demo.yaml", tmp_path / "missed.log")
    missed.cmd = list(job.cmd)
    missed.start()
    missed.on_step_done("splits")
    missed.finish()  # the graph has ended: finish() writes the stage the watcher did not see
    assert "stages ['splits', 'explora_backbone']" in capsys.readouterr().out

    failing = demo.BackgroundAblation("v0001", "configs/demo.yaml", tmp_path / "failing.log")
    failing.cmd = [sys.executable, "-c", "import sys; print('no splits', sys.argv[1:]); sys.exit(3)"]
    with pytest.raises(SystemExit, match="exit 3.*failing.log"):
        failing.finish()  # never started: finish() runs it on the finished graph, not staged
    assert "no splits []" in capsys.readouterr().out


def test_ablation_moves_to_more_threads_when_the_graph_is_done(tmp_path):
    """graph_done() signals the running ablation, whose handler (the real one) raises torch's threads."""
    import sys

    job = demo.BackgroundAblation("v0001", "configs/demo.yaml", tmp_path / "ablation.log")
    assert job.cmd[-6:] == ["--threads", "1", "--threads-on-signal", "2", "--nice", "19"]
    job.cmd = [
        sys.executable,
        "-c",
        "import time, torch\n"
        "from roadwork_commands.ablation import raise_threads_on_signal\n"
        "torch.set_num_threads(1)\n"
        "raise_threads_on_signal(2)\n"
        "print('armed', flush=True)\n"
        "deadline = time.time() + 120\n"
        "while torch.get_num_threads() == 1 and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "print('threads', torch.get_num_threads())",
    ]
    job.start()
    deadline = time.monotonic() + 120
    while "armed" not in job.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.graph_done()
    assert job.proc.wait(timeout=120) == 0
    assert "threads 2" in job.log_path.read_text()
    job.graph_done()  # an ablation that has ended is left alone


def test_background_predict_starts_when_the_bundle_step_ends_and_prints_rounded_lines(
    tmp_path, capsys, monkeypatch
):
    import json
    import sys

    import dagster as dg

    instance = dg.DagsterInstance.ephemeral()
    drop = tmp_path / "v0001"
    (drop / "images").mkdir(parents=True)
    for name in ("b.jpg", "a.jpg", "c.jpg", "d.jpg"):
        (drop / "images" / name).write_bytes(b"")
    job = demo.BackgroundPredict(instance, "v0001", drop)
    job.on_step_done("bundle")  # no bundle materialized yet: says so and keeps going
    assert job.proc is None and "not started yet" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no materialization of bundle for partition v0001"):
        job.show()

    bundle = tmp_path / "artifacts" / "bundle" / "v0001"
    (bundle / "dir").mkdir(parents=True)
    instance.report_runless_asset_event(
        dg.AssetMaterialization("bundle", partition="v0001", metadata={"path": str(bundle)})
    )
    # stands in for the roadwork console script (the real one: tests/unit/test_answer.py)
    fake = tmp_path / "bin" / "roadwork"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\nargs = sys.argv[1:]\n"
        "print(json.dumps({'argv': args[:2]}), file=sys.stderr)\n"
        "for i, img in enumerate(args[3:]):\n"
        "    print(json.dumps({'image': img, 'p_roadwork': 0.25 * i + 0.1234, 'decision': 'defer'}))\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(demo, "_console", lambda name: [str(fake.parent / name)])
    job.on_step_done("classifier")
    assert job.proc is None, "only the bundle step starts it"
    job.on_step_done("bundle")
    assert job.proc is not None and job.cmd[1:3] == ["predict", "--bundle"]
    assert job.cmd[3] == str(bundle / "dir") and [p.rsplit("/", 1)[1] for p in job.cmd[4:]] == [
        "a.jpg",
        "b.jpg",
        "c.jpg",
    ]
    job.show()
    out = capsys.readouterr().out
    assert "a.jpg: p_roadwork 0.123 -> defer" in out and "c.jpg: p_roadwork 0.623 -> defer" in out, out
    assert json.dumps({"image": str(drop / "images" / "a.jpg")})[:10] not in out, "rounded, not raw JSON"
    job.stop()


def test_demo_refuses_a_version_name_that_cannot_be_a_partition(tmp_path, capsys):
    """Before any drop is written or any partition added: the name and the problem, exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--inbox", str(tmp_path), "--version", "v1,2", "--n", "10"])
    assert exit_info.value.code == 2
    assert "cannot be a dataset version" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused version"
