"""Across dataset versions: sticky splits through the real assets; MLflow FAILED on a failed step."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import pytest

from roadwork_assets.definitions import build_resources
from roadwork_assets.partitions import dataset_version
from tests.integration.conftest import materialize, tiny_run_config
from tests.integration.test_graph import _artifact, _checks, _instance

pytestmark = pytest.mark.slow


def test_second_version_keeps_every_split_and_passes_sticky_check(tmp_path, rw_home):
    from roadwork_core.data.synthetic import make_demo_drop

    inbox = tmp_path / "inbox"
    make_demo_drop(inbox, "v0001", n=80, seed=11, scale=0.5)
    instance = _instance("v0001")
    resources = build_resources(state=rw_home["state"], inbox=inbox, mlflow_uri=rw_home["mlflow_uri"])
    config = {"resources": tiny_run_config()["resources"]}
    # 80 + 60 images: sticky assignment of small versions cannot hold balance to the default 0.05
    config["resources"]["split_settings"]["config"]["balance_tolerance"] = 0.2
    first = materialize(
        ["image_table", "splits"],
        instance=instance,
        partition="v0001",
        resources=resources,
        run_config=config,
    )
    assert first.success
    v1 = _artifact(instance, "splits", "v0001").set_index("image_id")["split"]

    make_demo_drop(inbox, "v0002", n=60, seed=12, scale=0.5)  # version v0002 = drops v0001 + v0002
    instance.add_dynamic_partitions(dataset_version.name, ["v0002"])
    second = materialize(
        ["image_table", "splits"],
        instance=instance,
        partition="v0002",
        resources=resources,
        run_config=config,
    )
    assert second.success
    assert _checks(second)["check_sticky_splits@splits"] is True
    v2 = _artifact(instance, "splits", "v0002").set_index("image_id")["split"]
    # a new image that is a near-copy (flips included) of two earlier images in different splits is
    # quarantined, listed in the asset's metadata; every other image of both drops is in the table
    meta = instance.get_latest_materialization_event(dg.AssetKey("splits")).asset_materialization.metadata
    quarantined = meta["num_quarantined"].value
    assert quarantined <= 3, f"{quarantined} of 60 new images quarantined: {meta['quarantined'].value}"
    assert len(v2) + quarantined == len(v1) + 60, "version v0002 must hold both drops"
    moved = (v2.loc[v1.index] != v1).sum()
    assert moved == 0, f"{moved} images changed split between versions"

    # v0002's image table hashed only its own 60 images: v0001's 80 took their facts from v0001's table,
    # and the table is the one a build that hashes everything gives
    from roadwork_core.data.image_table import build_image_table

    table_meta = instance.get_latest_materialization_event(
        dg.AssetKey("image_table")
    ).asset_materialization.metadata
    assert table_meta["num_facts_reused"].value == 80 and table_meta["facts_reused_from"].value == ["v0001"]
    scratch = build_image_table([inbox / "v0001", inbox / "v0002"], min_size=32)
    pd.testing.assert_frame_equal(_artifact(instance, "image_table", "v0002"), scratch.images)


def test_image_facts_are_hashed_again_under_other_hashing_code_or_an_unreadable_table(
    tmp_path, rw_home, monkeypatch
):
    """Facts come only from a table hashed by the same code and libraries, and a table that cannot be read
    (a flipped bit) costs the reuse, not the run."""
    import roadwork_core.data.image_table as image_table
    from roadwork_core.data.synthetic import make_demo_drop

    inbox = tmp_path / "inbox"
    make_demo_drop(inbox, "v0001", n=24, seed=71, scale=0.5)
    instance = _instance("v0001")
    resources = build_resources(state=rw_home["state"], inbox=inbox, mlflow_uri=rw_home["mlflow_uri"])

    def table_meta(version):
        assert materialize(["image_table"], instance=instance, partition=version, resources=resources).success
        mat = instance.get_latest_materialization_event(dg.AssetKey("image_table")).asset_materialization
        return {k: v.value for k, v in mat.metadata.items()}

    assert table_meta("v0001")["num_facts_reused"] == 0
    assert table_meta("v0001")["num_facts_reused"] == 24, "the same version built again hashes nothing"
    monkeypatch.setattr(image_table, "facts_version", lambda: "other-hashing")
    again = table_meta("v0001")
    assert again["num_facts_reused"] == 0 and again["image_facts_version"] == "other-hashing"
    monkeypatch.undo()
    make_demo_drop(inbox, "v0002", n=8, seed=72, scale=0.5)
    instance.add_dynamic_partitions(dataset_version.name, ["v0002"])
    assert table_meta("v0002")["num_facts_reused"] == 0, "facts of other hashing code were reused"
    from roadwork_assets._util import latest_materialization_metadata

    built = Path(latest_materialization_metadata(instance, dg.AssetKey("image_table"), "v0002")["path"])
    data = next(p for p in built.iterdir() if p.suffix == ".parquet")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    make_demo_drop(inbox, "v0003", n=8, seed=73, scale=0.5)
    instance.add_dynamic_partitions(dataset_version.name, ["v0003"])
    assert table_meta("v0003")["num_facts_reused"] == 0, "facts were read from a corrupt table"

    # a folder that holds another (valid) table than the one its version's materialization recorded, as a run
    # of that version on other code leaves it, vouches for nothing
    import shutil

    v3 = Path(latest_materialization_metadata(instance, dg.AssetKey("image_table"), "v0003")["path"])
    shutil.rmtree(v3)
    shutil.copytree(
        Path(latest_materialization_metadata(instance, dg.AssetKey("image_table"), "v0001")["path"]), v3
    )
    make_demo_drop(inbox, "v0004", n=8, seed=74, scale=0.5)
    instance.add_dynamic_partitions(dataset_version.name, ["v0004"])
    assert table_meta("v0004")["num_facts_reused"] == 0, (
        "facts were read from a table its record does not vouch for"
    )


def test_unopenable_mlflow_store_fails_the_first_tracked_step_and_names_the_setting(
    tmp_path, tiny_inbox, rw_home
):
    """The store opens on a background thread; its error surfaces in the first step that logs, by name."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the store's folder should be")
    instance = _instance("v0001")
    resources = build_resources(
        state=rw_home["state"], inbox=tiny_inbox, mlflow_uri=f"sqlite:///{blocker / 'mlflow.db'}"
    )
    tiny = tiny_run_config()
    explora = {**tiny["ops"]["explora_backbone"]["config"], "enabled": False}
    config = {"ops": {"explora_backbone": {"config": explora}}, "resources": tiny["resources"]}
    result = materialize(
        ["image_table", "splits", "explora_backbone"],
        instance=instance,
        partition="v0001",
        resources=resources,
        run_config=config,
    )
    assert not result.success
    outcome = {
        e.step_key: e.event_type_value for e in result.all_events if e.is_step_success or e.is_step_failure
    }
    assert outcome.pop("explora_backbone") == "STEP_FAILURE", outcome
    assert set(outcome.values()) == {"STEP_SUCCESS"} and {"image_table", "splits"} <= set(outcome), outcome
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = str(failure.step_failure_data.error)
    assert "could not open the MLflow store" in message and "MLFLOW_TRACKING_URI" in message, message
    assert str(blocker) in message, message


def test_an_mlflow_run_left_active_in_the_process_is_ended_not_adopted(tmp_path, tiny_inbox, rw_home):
    """A notebook or test that left an MLflow run active (another store) before materializing: the Dagster
    run logs to its own MLflow run in its own store, and the leftover run is ended, not written to."""
    elsewhere_uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    mlflow.set_tracking_uri(elsewhere_uri)
    # an explicit experiment: the fluent API may remember one of an earlier test's store
    experiment_id = mlflow.MlflowClient(tracking_uri=elsewhere_uri).create_experiment("notebook")
    leftover = mlflow.start_run(experiment_id=experiment_id).info.run_id
    instance = _instance("v0001")
    resources = build_resources(state=rw_home["state"], inbox=tiny_inbox, mlflow_uri=rw_home["mlflow_uri"])
    tiny = tiny_run_config()
    explora = {**tiny["ops"]["explora_backbone"]["config"], "enabled": False}
    config = {"ops": {"explora_backbone": {"config": explora}}, "resources": tiny["resources"]}
    result = materialize(
        ["image_table", "splits", "explora_backbone"],
        instance=instance,
        partition="v0001",
        resources=resources,
        run_config=config,
    )
    assert result.success
    elsewhere = mlflow.MlflowClient(tracking_uri=elsewhere_uri).get_run(leftover)
    assert elsewhere.info.status == "FINISHED" and not elsewhere.data.params, elsewhere.info
    mlflow.set_tracking_uri(rw_home["mlflow_uri"])
    runs = mlflow.search_runs(
        experiment_names=["roadwork"],
        filter_string=f"tags.dagster_run_id = '{result.run_id}'",
        output_format="list",
    )
    assert [r.info.status for r in runs] == ["FINISHED"], [r.info.status for r in runs]
    assert runs[0].data.params, "explora_backbone logged no params to the Dagster run's MLflow run"


@pytest.mark.parametrize(
    "failing",
    [
        "classifier",  # a tracked asset: its failure hook ends the MLflow run
        "image_table",  # the first step, untracked: the resource's teardown ends it
    ],
)
def test_failed_asset_ends_mlflow_run_failed(tiny_inbox, rw_home, failing):
    instance = _instance("v0001")
    resources = build_resources(state=rw_home["state"], inbox=tiny_inbox, mlflow_uri=rw_home["mlflow_uri"])
    config = tiny_run_config()
    if failing == "classifier":  # adapters on modules the backbone lacks: refused by the step itself
        config["ops"]["classifier"]["config"].update(mode="lora", lora_target_regex=r"no_such_module")
    else:
        config["ops"]["image_table"] = {"config": {"min_size": 100_000}}  # rejects every image
    result = materialize("*", instance=instance, partition="v0001", resources=resources, run_config=config)
    assert not result.success
    failed_steps = [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failed_steps == [failing], failed_steps
    mlflow.set_tracking_uri(rw_home["mlflow_uri"])
    runs = mlflow.search_runs(
        experiment_names=["roadwork"],
        filter_string=f"tags.dagster_run_id = '{result.run_id}'",
        output_format="list",
    )
    assert [r.info.status for r in runs] == ["FAILED"], [r.info.status for r in runs]


def test_partitions_command_adds_and_lists_versions(rw_home, capsys, tmp_path, monkeypatch):
    import dagster as dg

    from roadwork_commands import partitions

    for version in ("v0002", "v0003", "v0004"):
        (tmp_path / "inbox" / version).mkdir(parents=True)
    for version in ("v0002", "v0003"):
        (tmp_path / "inbox" / version / "_READY").touch()
    monkeypatch.setenv("ROADWORK_INBOX", str(tmp_path / "inbox"))
    with pytest.raises(SystemExit) as refused:  # its folder is there, still being copied (no _READY)
        partitions.main(["add", "v0004"])
    assert refused.value.code == 2 and "'v0004' is not a ready drop" in capsys.readouterr().err
    assert partitions.main(["add", "v0003", "v0002", "v0003"]) == 0  # a name given twice is added once
    assert partitions.main(["add", "v0002"]) == 0
    out = capsys.readouterr().out
    assert "added ['v0003', 'v0002']" in out and "nothing (all present)" in out
    assert sorted(dg.DagsterInstance.get().get_dynamic_partitions("dataset_version")) == ["v0002", "v0003"]


def test_partitions_command_refuses_a_name_dagster_cannot_take(rw_home, capsys):
    import dagster as dg

    from roadwork_commands import partitions

    for bad, why in (
        ("v1,2", "','"),
        ("v0002...v0003", "'...'"),
        ("v4\t", "control character"),
        ("..", "not the name of one folder"),
        ("../../escape", "not the name of one folder"),
        ("a/b", "not the name of one folder"),
        (".v5", "hidden folder"),
        ("v" * 210, "at most 200"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            partitions.main(["add", "v0009", bad])
        assert exit_info.value.code == 2, bad
        err = capsys.readouterr().err
        assert "cannot be a dataset version" in err and why in err, err
    assert dg.DagsterInstance.get().get_dynamic_partitions("dataset_version") == [], "nothing may be added"


def test_splits_refuse_to_skip_an_unmaterialized_earlier_version(tmp_path, rw_home):
    """v0002's sticky splits need v0001's: with v0001 registered but never split, v0002 fails and says so."""
    from roadwork_core.data.synthetic import make_demo_drop

    inbox = tmp_path / "inbox"
    make_demo_drop(inbox, "v0001", n=40, seed=21, scale=0.5)
    make_demo_drop(inbox, "v0002", n=40, seed=22, scale=0.5)
    instance = _instance("v0001")
    instance.add_dynamic_partitions(dataset_version.name, ["v0002"])
    resources = build_resources(state=rw_home["state"], inbox=inbox, mlflow_uri=rw_home["mlflow_uri"])
    config = {"resources": tiny_run_config()["resources"]}
    result = materialize(
        ["image_table", "splits"],
        instance=instance,
        partition="v0002",
        resources=resources,
        run_config=config,
    )
    assert not result.success
    failure = next(
        ev for ev in result.all_events if ev.event_type_value == "STEP_FAILURE" and ev.step_key == "splits"
    )
    message = str(failure.event_specific_data.error)
    assert "v0001" in message and "Materialize `splits`" in message, message


def test_a_late_drop_is_refused_and_a_version_split_again_keeps_every_split(tmp_path, rw_home, capsys):
    """v0003 is split before a drop v0002 lands: splitting v0002 now would let v0003's splits, rebuilt on it,
    move images v0003 already placed. The sensor leaves v0002 out and names the fix, `partitions add` and
    the splits asset refuse it. Splitting v0003 again with other ratios moves no image (its own history)."""
    from roadwork_assets.automation import new_drop_sensor
    from roadwork_commands import partitions
    from roadwork_core.data.synthetic import make_demo_drop
    from roadwork_resources.dataset import DatasetSource
    from roadwork_resources.settings import RetrainSettings

    inbox = tmp_path / "inbox"
    make_demo_drop(inbox, "v0001", n=40, seed=31, scale=0.5)
    make_demo_drop(inbox, "v0003", n=40, seed=33, scale=0.5)
    instance = _instance("v0001")
    instance.add_dynamic_partitions(dataset_version.name, ["v0003"])
    resources = build_resources(state=rw_home["state"], inbox=inbox, mlflow_uri=rw_home["mlflow_uri"])
    config = {"resources": tiny_run_config()["resources"]}
    config["resources"]["split_settings"]["config"].update({"balance_tolerance": 0.5, "min_per_class": 1})
    for version in ("v0001", "v0003"):
        run = materialize(["image_table", "splits"], instance=instance, partition=version, resources=resources, run_config=config)  # fmt: skip
        assert run.success, version
    meta = instance.get_latest_materialization_event(dg.AssetKey("splits")).asset_materialization.metadata
    history = __import__("pandas").read_parquet(meta["history_path"].value)
    v3 = _artifact(instance, "splits", "v0003").set_index("image_id")["split"]
    assert history.set_index("image_id")["split"].to_dict() == v3.to_dict(), (
        "nothing vanished: history = table"
    )
    assert meta["num_vanished_anchors"].value == 0

    make_demo_drop(inbox, "v0002", n=24, seed=32, scale=0.5)  # late
    context = dg.build_sensor_context(
        instance=instance,
        cursor='["v0001", "v0003"]',
        resources={"dataset": DatasetSource(inbox=str(inbox)), "retrain": RetrainSettings()},
    )
    tick = new_drop_sensor(context)
    assert isinstance(tick, dg.SkipReason), tick
    assert "v0002 arrived after v0003" in tick.skip_message and "Rename" in tick.skip_message, (
        tick.skip_message
    )
    with pytest.raises(SystemExit) as refused:
        partitions.main(["add", "v0002"])
    assert refused.value.code == 2 and "v0002 arrived after v0003" in capsys.readouterr().err
    instance.add_dynamic_partitions(dataset_version.name, ["v0002"])  # as the UI could
    late = materialize(["image_table", "splits"], instance=instance, partition="v0002", resources=resources, run_config=config)  # fmt: skip
    assert not late.success
    failure = next(ev for ev in late.all_events if ev.event_type_value == "STEP_FAILURE")
    assert "arrived after v0003" in str(failure.event_specific_data.error)
    assert partitions.main(["delete", "v0002"]) == 0
    assert "deleted ['v0002']" in capsys.readouterr().out

    # v0003 split again with other ratios: its own last history keeps every image where it was
    config["resources"]["split_settings"]["config"].update(
        {"train": 0.4, "val_select": 0.2, "val_calib": 0.2, "val_test": 0.2}
    )
    again = materialize(["image_table", "splits"], instance=instance, partition="v0003", resources=resources, run_config=config)  # fmt: skip
    assert again.success
    after = _artifact(instance, "splits", "v0003").set_index("image_id")["split"]
    assert after.to_dict() == v3.to_dict(), "splitting a version again moved images"
    # the late drop, still in the inbox, is in no version's image table (v0003 took it in before) ...
    table_meta = instance.get_latest_materialization_event(
        dg.AssetKey("image_table")
    ).asset_materialization.metadata
    assert table_meta["drops"].value == ["v0001", "v0003"] and table_meta["late_drops_left_out"].value == [
        "v0002"
    ]
    # ... so renamed as the message says, it is a new version like any other (it failed as a withdrawn drop)
    (inbox / "v0002").rename(inbox / "v0004")
    instance.add_dynamic_partitions(dataset_version.name, ["v0004"])
    renamed = materialize(["image_table", "splits"], instance=instance, partition="v0004", resources=resources, run_config=config)  # fmt: skip
    assert renamed.success, [str(e.event_specific_data.error)[:500] for e in renamed.all_events if e.event_type_value == "STEP_FAILURE"]  # fmt: skip


def test_a_drop_without_a_partition_of_its_own_is_part_of_the_version_that_took_it_in(tmp_path, rw_home):
    """v0002 was never added as a partition (a version holds every drop up to it); v0003 was split with it. It
    counted as late: v0004 left it out and failed with v0002 'withdrawn' from v0003, and so did v0003 split
    again; the sensor advised a rename that would withdraw it for good (a Dagster power-user audit)."""
    from roadwork_assets.automation import new_drop_sensor
    from roadwork_core.data.synthetic import make_demo_drop
    from roadwork_resources.dataset import DatasetSource
    from roadwork_resources.settings import RetrainSettings

    inbox = tmp_path / "inbox"
    for i, version in enumerate(("v0001", "v0002", "v0003")):
        make_demo_drop(inbox, version, n=24, seed=40 + i, scale=0.5)
    instance = _instance("v0001")
    instance.add_dynamic_partitions(dataset_version.name, ["v0003"])
    resources = build_resources(state=rw_home["state"], inbox=inbox, mlflow_uri=rw_home["mlflow_uri"])
    config = {"resources": tiny_run_config()["resources"]}
    config["resources"]["split_settings"]["config"].update({"balance_tolerance": 0.5, "min_per_class": 1})

    def split(version: str):
        return materialize(["image_table", "splits"], instance=instance, partition=version, resources=resources, run_config=config)  # fmt: skip

    assert split("v0001").success and split("v0003").success
    make_demo_drop(inbox, "v0004", n=24, seed=44, scale=0.5)
    instance.add_dynamic_partitions(dataset_version.name, ["v0004"])
    v4 = split("v0004")
    assert v4.success, [str(e.event_specific_data.error)[:400] for e in v4.all_events if e.event_type_value == "STEP_FAILURE"]  # fmt: skip
    meta = instance.get_latest_materialization_event(
        dg.AssetKey("image_table")
    ).asset_materialization.metadata
    assert meta["drops"].value == ["v0001", "v0002", "v0003", "v0004"], meta["drops"].value
    assert split("v0003").success, "v0003 split again"
    tick = new_drop_sensor(
        dg.build_sensor_context(
            instance=instance,
            cursor='["v0001", "v0003", "v0004"]',
            resources={"dataset": DatasetSource(inbox=str(inbox)), "retrain": RetrainSettings()},
        )
    )
    assert isinstance(tick, dg.SkipReason) and "v0002" not in tick.skip_message, tick
    instance.add_dynamic_partitions(dataset_version.name, ["v0002"])  # as the UI could: refused, with the fix
    alone = split("v0002")
    failure = next(ev for ev in alone.all_events if ev.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert "already part of v0004's image table" in message and "partitions delete v0002" in message, message


def test_an_earlier_version_split_again_after_its_drop_grew_agrees_with_the_later_versions(tmp_path, rw_home):
    """v0001's drop gained images in place after v0003 was split; v0001 and then v0003 split again gave 39 of
    the same images different splits in the two versions (train in one, val_test in the other), every check
    green: each version followed only its own and the newest earlier history (a Dagster power-user audit)."""
    import shutil

    import pandas as pd

    from roadwork_core.data.synthetic import make_demo_drop

    inbox = tmp_path / "inbox"
    for i, version in enumerate(("v0001", "v0002", "v0003")):
        make_demo_drop(inbox, version, n=30, seed=50 + i, scale=0.5)
    instance = _instance("v0001")
    instance.add_dynamic_partitions(dataset_version.name, ["v0002", "v0003"])
    resources = build_resources(state=rw_home["state"], inbox=inbox, mlflow_uri=rw_home["mlflow_uri"])
    config = {"resources": tiny_run_config()["resources"]}
    config["resources"]["split_settings"]["config"].update({"balance_tolerance": 0.5, "min_per_class": 1})

    def split(version: str) -> pd.Series:
        run = materialize(["image_table", "splits"], instance=instance, partition=version, resources=resources, run_config=config)  # fmt: skip
        assert run.success, [str(e.event_specific_data.error)[:400] for e in run.all_events if e.event_type_value == "STEP_FAILURE"]  # fmt: skip
        assert all(_checks(run).values()), _checks(run)
        return _artifact(instance, "splits", version).set_index("image_id")["split"]

    for version in ("v0001", "v0002", "v0003"):
        split(version)
    extra = make_demo_drop(
        tmp_path / "more", "x", n=40, seed=59, scale=0.5
    )  # 40 images added to v0001 in place
    rows = pd.read_csv(extra / "labels.csv")
    for name in rows["file"]:
        shutil.copy(extra / name, inbox / "v0001" / name.replace("images/", "images/extra_"))
    rows["file"] = rows["file"].str.replace("images/", "images/extra_", regex=False)
    labels = pd.concat([pd.read_csv(inbox / "v0001" / "labels.csv"), rows], ignore_index=True)
    labels.to_csv(inbox / "v0001" / "labels.csv", index=False)

    v1, v3 = split("v0001"), split("v0003")
    both = v1.index.intersection(v3.index)
    assert len(both) == len(v1), "v0003 holds every v0001 image"
    moved = (v1[both] != v3[both]).sum()
    assert moved == 0, f"{moved} of {len(both)} images have another split in v0003 than in v0001"
    assert split("v0001")[both].equals(v1[both]), "split again, v0001 keeps them"


def test_a_later_run_of_downstream_assets_refuses_splits_whose_blocking_check_failed(tiny_inbox, rw_home):
    """Run 1 stops after `splits` (a blocking check fails); run 2 selects only `explora_backbone`, whose
    input is that same splits materialization: it must refuse, not train (and later release) on it."""
    instance = _instance("v0001")
    resources = build_resources(state=rw_home["state"], inbox=tiny_inbox, mlflow_uri=rw_home["mlflow_uri"])
    tiny = tiny_run_config()
    config = {"resources": tiny["resources"]}
    config["resources"]["split_settings"]["config"]["min_per_class"] = 1000
    first = materialize(["image_table", "splits"], instance=instance, partition="v0001", resources=resources, run_config=config)  # fmt: skip
    assert _checks(first)["check_min_per_class@splits"] is False
    explora = {**tiny["ops"]["explora_backbone"]["config"], "enabled": False}
    second = materialize(
        ["explora_backbone"],
        instance=instance,
        partition="v0001",
        resources=resources,
        run_config={**config, "ops": {"explora_backbone": {"config": explora}}},
    )
    assert not second.success
    failure = next(ev for ev in second.all_events if ev.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert "failed their blocking check(s) ['check_min_per_class']" in message, message

    # the check executed again alone (as the UI's "Execute" does) with a setting the splits meet: cleared
    config["resources"]["split_settings"]["config"]["min_per_class"] = 1
    check_only = dg.AssetSelection.checks(dg.AssetCheckKey(dg.AssetKey("splits"), "check_min_per_class"))
    from roadwork_assets.definitions import ASSET_CHECKS, ASSETS

    recheck = dg.define_asset_job("recheck", selection=check_only, partitions_def=dataset_version)
    defs = dg.Definitions(assets=ASSETS, asset_checks=ASSET_CHECKS, jobs=[recheck], resources=resources)
    again = defs.resolve_job_def("recheck").execute_in_process(
        tags={"dagster/partition": "v0001"}, instance=instance, run_config=config, raise_on_error=False
    )
    assert _checks(again) == {"check_min_per_class@splits": True}
    from roadwork_assets.data import failed_split_checks

    assert failed_split_checks(instance, "v0001")[1:] == ([], []), "the latest evaluation decides"

    # splits made again without their checks (a launch with no check selected): no evaluation is no pass
    unchecked = materialize(dg.AssetSelection.assets("splits").without_checks(), instance=instance, partition="v0001", resources=resources, run_config=config)  # fmt: skip
    assert unchecked.success and not _checks(unchecked)
    third = materialize(["explora_backbone"], instance=instance, partition="v0001", resources=resources, run_config={**config, "ops": {"explora_backbone": {"config": explora}}})  # fmt: skip
    assert not third.success
    failure = next(ev for ev in third.all_events if ev.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert (
        "were materialized without their blocking check(s)" in message and "check_min_per_class" in message
    ), message


def test_a_choice_misspelt_in_the_run_config_is_refused_before_any_step(tiny_inbox, rw_home):
    """A typo in a fixed choice (`release_policy: scrcc`, `mode: CRC`) is caught by Dagster's config check,
    not after ExPLoRA and the classifier have trained."""
    instance = _instance("v0001")
    resources = build_resources(state=rw_home["state"], inbox=tiny_inbox, mlflow_uri=rw_home["mlflow_uri"])
    for op, key, value in (("bundle", "release_policy", "scrcc"), ("scrc_policy", "mode", "CRC"), ("classifier", "augment", "Validator")):  # fmt: skip
        config = tiny_run_config()
        config["ops"].setdefault(op, {"config": {}})["config"][key] = value
        with pytest.raises(dg.DagsterInvalidConfigError, match=rf"{key}.*not in enum"):
            materialize("*", instance=instance, partition="v0001", resources=resources, run_config=config)
    assert not instance.get_runs(), "nothing may start"


def test_an_asset_name_misspelt_in_the_run_config_is_refused_before_any_step(tiny_inbox, rw_home):
    """`dagster asset materialize` and the UI's Materialize run the implicit asset job, whose config schema
    accepts ops it does not have: `image_manifest:` (the design's name) or `clasifier:` ran on defaults."""
    from roadwork_assets.definitions import ASSET_CHECKS, ASSETS

    instance = _instance("v0001")
    resources = build_resources(state=rw_home["state"], inbox=tiny_inbox, mlflow_uri=rw_home["mlflow_uri"])
    defs = dg.Definitions(
        assets=ASSETS, asset_checks=ASSET_CHECKS, resources=resources, executor=dg.in_process_executor
    )
    job = defs.resolve_implicit_global_asset_job_def()
    for op, hint in (("image_manifest", "image_table"), ("clasifier", "classifier")):
        config = {"ops": {op: {"config": {"min_size": 100000}}}}
        result = job.execute_in_process(
            run_config=config, instance=instance, partition_key="v0001", raise_on_error=False,
            asset_selection=[dg.AssetKey("image_table")],
        )  # fmt: skip
        assert not result.success
        assert not result.get_asset_materialization_events(), "nothing may be materialized"
        failure = next(ev for ev in result.all_events if ev.event_type == dg.DagsterEventType.RUN_FAILURE)
        message = str(failure.event_specific_data.error)
        assert f"'{op}' (did you mean '{hint}'?)" in message and "no asset or check" in message, message


def test_a_value_no_step_can_use_is_refused_before_any_step(tiny_inbox, rw_home):
    """Dagster checks names and types only: `grad_clip: 0` (zeroes every gradient: the classifier never learns,
    exit 0) or a misspelt calibration method (the calibrator failed after all the training) ran. The IO
    manager's set-up builds every op's config as its step will, before the first step."""
    from roadwork_assets.definitions import ASSET_CHECKS, ASSETS

    instance = _instance("v0001")
    resources = build_resources(state=rw_home["state"], inbox=tiny_inbox, mlflow_uri=rw_home["mlflow_uri"])
    defs = dg.Definitions(
        assets=ASSETS, asset_checks=ASSET_CHECKS, resources=resources, executor=dg.in_process_executor
    )
    job = defs.resolve_implicit_global_asset_job_def()
    config = tiny_run_config()
    config["ops"]["classifier"]["config"]["grad_clip"] = 0.0
    config["ops"]["calibrator"] = {"config": {"methods": ["temperature", "isotonc"]}}
    config["resources"]["split_settings"]["config"]["train"] = 0.7  # the ratios sum to 1.1
    result = job.execute_in_process(
        run_config=config, instance=instance, partition_key="v0001", raise_on_error=False,
        asset_selection=[dg.AssetKey("image_table")],
    )  # fmt: skip
    assert not result.success
    assert not result.get_asset_materialization_events(), "nothing may be materialized"
    failure = next(ev for ev in result.all_events if ev.event_type == dg.DagsterEventType.RUN_FAILURE)
    message = str(failure.event_specific_data.error)
    assert "ops.classifier.config: TrainConfig.grad_clip=0.0" in message, message
    assert "ops.calibrator.config.methods" in message and "'isotonc'" in message, message
    assert "resources.split_settings.config: split ratios must sum to 1" in message, message


def test_deleting_a_split_partition_does_not_let_its_images_move(tmp_path, rw_home, capsys):
    """v0002 is split, then its partition deleted (its folder stays): v0003 must still be sticky to v0002's
    splits. It was assigned against v0001 only, and 34 of v0002's 180 images moved (7 val_test -> train)
    with every check green."""
    from roadwork_commands import partitions
    from roadwork_core.data.synthetic import make_demo_drop

    inbox = tmp_path / "inbox"
    for version, seed in (("v0001", 41), ("v0002", 42), ("v0003", 43)):
        make_demo_drop(inbox, version, n=40, seed=seed, scale=0.5)
    instance = _instance("v0001")
    instance.add_dynamic_partitions(dataset_version.name, ["v0002"])
    resources = build_resources(state=rw_home["state"], inbox=inbox, mlflow_uri=rw_home["mlflow_uri"])
    config = {"resources": tiny_run_config()["resources"]}
    config["resources"]["split_settings"]["config"].update({"balance_tolerance": 0.5, "min_per_class": 1})
    for version in ("v0001", "v0002"):
        assert materialize(["image_table", "splits"], instance=instance, partition=version, resources=resources, run_config=config).success  # fmt: skip
    v2 = _artifact(instance, "splits", "v0002").set_index("image_id")["split"]
    assert partitions.main(["delete", "v0002"]) == 0
    assert "its split history still binds" in capsys.readouterr().out
    instance.add_dynamic_partitions(dataset_version.name, ["v0003"])
    assert materialize(["image_table", "splits"], instance=instance, partition="v0003", resources=resources, run_config=config).success  # fmt: skip
    v3 = _artifact(instance, "splits", "v0003").set_index("image_id")["split"]
    moved = {i: (v2[i], v3[i]) for i in v2.index if i in v3.index and v2[i] != v3[i]}
    assert not moved, f"{len(moved)} of v0002's images moved in v0003: {list(moved.values())[:5]}"
    assert set(v2.index) <= set(v3.index)


def test_an_earlier_drop_that_lost_its_ready_marker_stops_the_image_table(tmp_path, rw_home):
    """v0001's `_READY` moved aside (a re-upload): v0002's table was silently built from v0002 alone, and a
    model trained on a third of the data was released. Now the step fails naming the drop and the fix."""
    from roadwork_core.data.synthetic import make_demo_drop

    inbox = tmp_path / "inbox"
    make_demo_drop(inbox, "v0001", n=30, seed=51, scale=0.5)
    make_demo_drop(inbox, "v0002", n=30, seed=52, scale=0.5)
    instance = _instance("v0001")
    instance.add_dynamic_partitions(dataset_version.name, ["v0002"])
    resources = build_resources(state=rw_home["state"], inbox=inbox, mlflow_uri=rw_home["mlflow_uri"])
    assert materialize(["image_table"], instance=instance, partition="v0002", resources=resources).success
    (inbox / "v0001" / "_READY").rename(inbox / "v0001" / "_READY.bak")
    again = materialize(["image_table"], instance=instance, partition="v0002", resources=resources)
    assert not again.success
    failure = next(ev for ev in again.all_events if ev.event_type_value == "STEP_FAILURE")
    message = str(failure.event_specific_data.error)
    assert "v0001 (in v0002's image table; its _READY marker is missing)" in message, message
    assert "allow_withdrawn_drops" in message, message
    allowed = {"ops": {"image_table": {"config": {"allow_withdrawn_drops": True}}}}
    built = materialize(["image_table"], instance=instance, partition="v0002", resources=resources, run_config=allowed)  # fmt: skip
    assert built.success
    meta = instance.get_latest_materialization_event(
        dg.AssetKey("image_table")
    ).asset_materialization.metadata
    assert meta["withdrawn_drops"].value == ["v0001"] and meta["drops"].value == ["v0002"]


def test_a_label_edited_in_place_is_reported_by_the_next_split(tmp_path, rw_home):
    """An earlier drop's labels.csv edited in place flipped a val_test label with no notice, while a new copy
    of the same bytes with the other label is a `label_conflict` reject. The splits now list it."""
    from roadwork_core.data.synthetic import make_demo_drop

    inbox = tmp_path / "inbox"
    make_demo_drop(inbox, "v0001", n=30, seed=61, scale=0.5)
    make_demo_drop(inbox, "v0002", n=20, seed=62, scale=0.5)
    instance = _instance("v0001")
    instance.add_dynamic_partitions(dataset_version.name, ["v0002"])
    resources = build_resources(state=rw_home["state"], inbox=inbox, mlflow_uri=rw_home["mlflow_uri"])
    config = {"resources": tiny_run_config()["resources"]}
    config["resources"]["split_settings"]["config"].update({"balance_tolerance": 0.5, "min_per_class": 1})
    assert materialize(["image_table", "splits"], instance=instance, partition="v0001", resources=resources, run_config=config).success  # fmt: skip
    labels = inbox / "v0001" / "labels.csv"
    lines = labels.read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("label")
    first = lines[1].split(",")
    first[col] = {"0": "1", "1": "0", "roadwork": "no_roadwork", "no_roadwork": "roadwork"}[first[col]]
    labels.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    assert materialize(["image_table", "splits"], instance=instance, partition="v0002", resources=resources, run_config=config).success  # fmt: skip
    meta = instance.get_latest_materialization_event(dg.AssetKey("splits")).asset_materialization.metadata
    assert meta["num_relabelled"].value == 1, meta["num_relabelled"]
    assert first[header.index("file")] in meta["relabelled"].value
