"""Settings the automation reads from the environment and the commands that write drops: each bad value is
refused by name instead of failing later, silently, or destructively."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest


def test_make_demo_data_refuses_a_bad_version_and_an_existing_drop(tmp_path: Path, capsys) -> None:
    """`--version ""` swapped the inbox folder itself for the new drop (every other drop gone); an existing
    drop was replaced silently, even one a run had trained on."""
    from roadwork_core.cli import main

    inbox = tmp_path / "inbox"
    assert main(["make-demo-data", "--out", str(inbox), "--version", "v0001", "--n", "3"]) == 0
    before = (inbox / "v0001" / "labels.csv").read_bytes()
    for bad in ("", "..", "../escape", "a/b", "v1,2"):
        assert main(["make-demo-data", "--out", str(inbox), "--version", bad, "--n", "2"]) == 2, bad
        assert "--version" in capsys.readouterr().err
    assert sorted(p.name for p in inbox.iterdir()) == ["v0001"] and not (tmp_path / "escape").exists()
    assert main(["make-demo-data", "--out", str(inbox), "--version", "v0001", "--n", "5", "--seed", "9"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert (inbox / "v0001" / "labels.csv").read_bytes() == before
    assert main(["make-demo-data", "--out", str(inbox), "--version", "v0001", "--n", "5", "--replace"]) == 0
    assert (inbox / "v0001" / "labels.csv").read_bytes() != before

    from roadwork_core.data.synthetic import make_demo_drop

    with pytest.raises(ValueError, match="version '' is not the name of one folder"):
        make_demo_drop(inbox, "", n=2, scale=0.5)


def test_a_run_config_that_is_not_yaml_is_named(tmp_path: Path, monkeypatch) -> None:
    from roadwork_assets.automation import automation_run_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("ops:\n  classifier: [oops\n")
    monkeypatch.setenv("ROADWORK_RUN_CONFIG", str(bad))
    with pytest.raises(ValueError, match=rf"ROADWORK_RUN_CONFIG={bad} is not valid YAML"):
        automation_run_config()


def test_an_invalid_retrain_cron_is_named(monkeypatch) -> None:
    """Dagster's own error named the schedule, not the variable, and the code location did not load."""
    from roadwork_assets.automation import retrain_cron

    monkeypatch.setenv("ROADWORK_RETRAIN_CRON", "every monday")
    with pytest.raises(ValueError, match="ROADWORK_RETRAIN_CRON='every monday' is not a cron schedule"):
        retrain_cron()
    monkeypatch.setenv("ROADWORK_RETRAIN_CRON", "30 4 * * 2")
    assert retrain_cron() == "30 4 * * 2"
    monkeypatch.delenv("ROADWORK_RETRAIN_CRON")
    assert retrain_cron() == "0 3 * * 1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("TRUE", True), ("yes", True), ("On", True), ("", False), ("0", False), ("False", False)],
)
def test_force_retrain_reads_the_usual_spellings(monkeypatch, value: str, expected: bool) -> None:
    """`TRUE` and `yes` read as false before, silently."""
    from roadwork_assets.definitions import force_retrain_from_environment

    monkeypatch.setenv("ROADWORK_FORCE_RETRAIN", value)
    assert force_retrain_from_environment() is expected


def test_force_retrain_refuses_a_value_it_cannot_read(monkeypatch) -> None:
    from roadwork_assets.definitions import force_retrain_from_environment

    monkeypatch.setenv("ROADWORK_FORCE_RETRAIN", "sometimes")
    with pytest.raises(ValueError, match="ROADWORK_FORCE_RETRAIN='sometimes'"):
        force_retrain_from_environment()


def test_the_drop_sensor_names_a_missing_inbox(tmp_path: Path) -> None:
    """A mistyped inbox looked like an empty one, tick after tick: 'no new complete drop ... (0 seen)'."""
    from roadwork_assets.automation import new_drop_sensor
    from roadwork_resources.dataset import DatasetSource
    from roadwork_resources.settings import RetrainSettings

    (tmp_path / "a_file").write_text("")
    with dg.DagsterInstance.ephemeral() as instance:
        for inbox, says in (
            (tmp_path / "no_such_inbox", "does not exist"),
            (tmp_path / "a_file", "is not a folder"),
        ):
            context = dg.build_sensor_context(
                instance=instance,
                resources={"dataset": DatasetSource(inbox=str(inbox)), "retrain": RetrainSettings()},
            )
            result = new_drop_sensor(context)
            reason = result.skip_message if hasattr(result, "skip_message") else str(result)
            assert says in reason and "ROADWORK_INBOX" in reason, reason


def test_drift_needs_at_least_two_images_by_its_setting() -> None:
    """min_images 0 or 1 launched drift_job on an empty folder, which always fails (the test needs 2),
    once an hour."""
    import pydantic

    from roadwork_resources.settings import DriftSettings

    for bad in (0, 1):
        with pytest.raises(pydantic.ValidationError, match="min_images"):
            DriftSettings(min_images=bad)
    assert DriftSettings(min_images=2).min_images == 2


def test_the_demo_refuses_a_missing_config_before_writing_a_drop(tmp_path: Path, capsys) -> None:
    from roadwork_commands import demo

    with pytest.raises(SystemExit) as refused:
        demo.main(["--inbox", str(tmp_path / "inbox"), "--config", str(tmp_path / "nope.yaml"), "--n", "4"])
    assert refused.value.code == 2 and "nope.yaml: no such file" in capsys.readouterr().err
    assert not (tmp_path / "inbox").exists(), "nothing may be written before the config is known to exist"


def _drop(inbox: Path, version: str, n: int) -> None:
    folder = inbox / version
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_text("file,label\n" + "".join(f"images/{i}.jpg,1\n" for i in range(n)))
    (folder / "_READY").write_text(version)


def _tick(instance, inbox: Path, cursor: str | None):
    """One new_drop_sensor evaluation; partition adds applied as the daemon would. (result, cursor)"""
    from roadwork_assets.automation import new_drop_sensor
    from roadwork_resources.dataset import DatasetSource
    from roadwork_resources.settings import RetrainSettings

    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"dataset": DatasetSource(inbox=str(inbox)), "retrain": RetrainSettings()},
    )
    result = new_drop_sensor(context)
    if isinstance(result, dg.SensorResult):
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return result, result.cursor or context.cursor
    return result, context.cursor


def test_a_drop_delivered_again_after_its_partition_was_deleted_is_trained_again(tmp_path: Path) -> None:
    """The sensor retrained the newest other version (which holds none of the drop) and the drop never got
    its partition back; with no partition left at all the change was only written into the cursor."""
    import os
    import shutil
    import time

    inbox = tmp_path / "inbox"
    with dg.DagsterInstance.ephemeral() as instance:
        _drop(inbox, "v0001", 2)
        _drop(inbox, "v0002", 2)
        first, cursor = _tick(instance, inbox, None)
        assert sorted(r.run_key for r in first.run_requests) == ["drop-v0001", "drop-v0002"]
        for version, drops in (("v0001", ["v0001"]), ("v0002", ["v0001", "v0002"])):  # what the runs record
            instance.report_runless_asset_event(
                dg.AssetMaterialization("image_table", partition=version, metadata={"drops": drops})
            )
            instance.report_runless_asset_event(dg.AssetMaterialization("splits", partition=version))
        instance.delete_dynamic_partition("dataset_version", "v0002")  # withdrawn ...
        shutil.rmtree(inbox / "v0002")
        _drop(inbox, "v0002", 3)  # ... and delivered again, other files
        later = time.time() + 5  # a signature holds sizes and modification times: make the change visible
        for path in (inbox / "v0002").rglob("*"):
            os.utime(path, (later, later))
        runs = []
        for _ in range(3):  # the change settles over two ticks
            result, cursor = _tick(instance, inbox, cursor)
            runs += getattr(result, "run_requests", [])
        assert [r.partition_key for r in runs] == ["v0002"], [(r.partition_key, r.run_key) for r in runs]
        assert runs[0].run_key.startswith("drop-v0002-again-"), runs[
            0
        ].run_key  # not the key Dagster has seen
        assert sorted(instance.get_dynamic_partitions("dataset_version")) == ["v0001", "v0002"]


def test_the_demo_says_when_the_drop_it_reuses_holds_another_number_of_images(tmp_path: Path, capsys) -> None:
    """It printed 'reusing it' only, and trained on 80 images when --n 120 was asked."""
    from roadwork_commands.demo import ensure_drop
    from roadwork_core.data.synthetic import make_demo_drop

    make_demo_drop(tmp_path, "v0001", n=6, scale=0.5)
    assert ensure_drop(tmp_path, "v0001", 6, 0, 0) == tmp_path / "v0001"
    assert capsys.readouterr().out.strip().endswith("reusing it")
    ensure_drop(tmp_path, "v0001", 120, 0, 0)
    assert "holds 6 labelled images, not the --n 120 asked" in capsys.readouterr().out
