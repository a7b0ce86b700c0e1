"""Every run config the project ships (configs/*.yaml, tests/configs/*.yaml) is valid for the whole graph:
a misspelt or removed key is found here, not after minutes of a GPU run."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "tests" / "configs").glob("*.yaml")])


@pytest.fixture(scope="module")
def retrain_job():
    from roadwork_assets.definitions import defs

    return defs.resolve_job_def("retrain_job")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_run_config_is_valid_for_the_retrain_job(retrain_job, path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    dg.validate_run_config(retrain_job, config)  # raises DagsterInvalidConfigError naming the key


def test_a_misspelt_key_is_refused(retrain_job) -> None:
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["ops"]["explora_backbone"]["config"]["num_workrs"] = 2
    with pytest.raises(dg.DagsterInvalidConfigError, match="num_workrs"):
        dg.validate_run_config(retrain_job, config)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_run_config_passes_the_checks_run_before_any_step(path: Path) -> None:
    from roadwork_assets.definitions import invalid_op_configs

    assert invalid_op_configs(yaml.safe_load(path.read_text())) == []


# (op, config, what the refusal names): values Dagster's types accept but no run can use. Each was found
# accepted by a config audit: silently wrong (gradient ascent, a frozen teacher exported as "trained", an empty
# reproduction check passing) or failing late with a message that named no field.
REFUSED = [
    ("classifier", {"grad_clip": 0.0}, "TrainConfig.grad_clip=0.0"),
    # these failed in the classifier step, after image_table, splits and ExPLoRA had run
    ("classifier", {"epochs": 0}, "epochs, batch_size and patience must be >= 1"),
    ("classifier", {"lr": 0.0}, "TrainConfig.lr=0.0"),
    ("classifier", {"label_smoothing": 2.0}, "TrainConfig.label_smoothing=2.0"),
    ("classifier", {"augment_max_level": 7}, "TrainConfig.augment_max_level=7"),
    ("classifier", {"warmup_epochs": float("nan")}, "TrainConfig.warmup_epochs=nan"),  # round(nan) failed
    ("classifier", {"weight_decay": float("inf")}, "TrainConfig.weight_decay=inf"),  # blamed the lr
    ("classifier", {"grad_clip": -1.0}, "TrainConfig.grad_clip=-1.0"),
    ("classifier", {"dropout": 1.0}, "HeadConfig.dropout=1.0"),
    ("classifier", {"lora_dropout": 1.5}, "TrainConfig.lora_dropout=1.5"),
    ("classifier", {"mode": "lora", "lora_target_regex": "blocks.("}, "not a regular expression"),
    ("classifier", {"mode": "lora", "lora_alpha": 0.0}, "lora_alpha > 0"),
    ("classifier", {"ema_decay": 1.5}, "TrainConfig.ema_decay=1.5"),
    ("classifier", {"topk": 0}, "HeadConfig.topk=0"),
    ("classifier", {"canvas_size": 8, "view_size": 64}, "canvas_size=8 must be at least view_size"),
    ("explora_backbone", {"teacher_momentum": 1.5}, "teacher_momentum=1.5"),
    ("explora_backbone", {"teacher_momentum": 1.0}, "freezes the teacher"),
    ("explora_backbone", {"teacher_temp": 0.0}, "temperatures must be > 0"),
    ("explora_backbone", {"grad_clip": -3.0}, "ExploraConfig.grad_clip=-3.0"),
    ("explora_backbone", {"lr_warmup_frac": -0.5}, "lr_warmup_frac=-0.5"),
    ("explora_backbone", {"global_crop_scale": [1.0, 0.32]}, "global_crop_scale=(1.0, 0.32)"),
    ("explora_backbone", {"out_dim": 0}, "out_dim"),
    ("explora_backbone", {"backbone": {"pooling": "maxx"}}, "BackboneConfig.pooling='maxx'"),
    ("image_table", {"max_reject_fraction": -0.1}, "ops.image_table.config.max_reject_fraction"),
    ("calibrator", {"methods": ["isotonc"]}, "unknown calibration methods ['isotonc']"),
    ("threshold_policy", {"target_fnr": 1.0}, "ops.threshold_policy.config.target_fnr"),
    ("scrc_policy", {"alpha": 0.0}, "ops.scrc_policy.config.alpha"),
    ("scrc_policy", {"confidence_feature": "max_probb"}, "confidence_feature 'max_probb'"),
    ("test_predictions", {"batch_size": 0}, "ops.test_predictions.config.batch_size"),
    ("evaluation_report", {"robustness_levels": [0, 7, -1]}, "robustness_levels [7, -1]"),
    ("evaluation_report", {"n_bootstrap": 0}, "ops.evaluation_report.config.n_bootstrap"),
    ("evaluation_report", {"robustness_max_images": 0}, "ops.evaluation_report.config.robustness_max_images"),
    ("evaluation_report", {"subnet_max_images": -10}, "ops.evaluation_report.config.subnet_max_images"),
    ("bundle_check_bundle_reproduces_predictions", {"sample": 0}, "config.sample"),
]


@pytest.mark.parametrize(
    ("op", "values", "named"), REFUSED, ids=[f"{o}-{'-'.join(v)}" for o, v, _ in REFUSED]
)
def test_a_value_no_run_can_use_is_refused_by_name(op: str, values: dict, named: str) -> None:
    from roadwork_assets.definitions import invalid_op_configs

    problems = invalid_op_configs({"ops": {op: {"config": values}}})
    assert len(problems) == 1 and named in problems[0] and problems[0].startswith(f"ops.{op}.config"), (
        problems
    )


RESOURCES_REFUSED = [
    ("split_settings", {"train": 0.7}, "split ratios must sum to 1"),  # failed in `splits`, after image_table
    ("split_settings", {"train": -0.1, "val_select": 0.8}, "must all be > 0"),
    ("split_settings", {"min_per_class": -1}, "min_per_class"),
    (
        "split_settings",
        {"radius": 64},
        "radius",
    ),  # a 64-bit phash: 0-63; failed in `splits`, after image_table
    ("gpu", {"threads": -1}, "threads"),
    ("gpu", {"nproc_per_node": 0}, "nproc_per_node"),
    ("drift", {"alpha": 5.0}, "alpha"),
    ("drift", {"sample": 0}, "sample"),
]


@pytest.mark.parametrize(
    ("key", "values", "named"), RESOURCES_REFUSED, ids=[f"{k}-{'-'.join(v)}" for k, v, _ in RESOURCES_REFUSED]
)
def test_a_resource_value_no_run_can_use_is_refused_by_path(key: str, values: dict, named: str) -> None:
    from roadwork_assets.definitions import invalid_resource_configs

    problems = invalid_resource_configs({"resources": {key: {"config": values}}})
    assert (
        len(problems) == 1 and named in problems[0] and problems[0].startswith(f"resources.{key}.config")
    ), problems


def test_a_resource_value_read_from_the_environment_is_checked_as_its_value(monkeypatch) -> None:
    """`{env: VAR}` is how Dagster reads a value from the environment (a multi-node `master_addr`, an inbox):
    the check reads it as the run will, instead of refusing the dict."""
    from roadwork_assets.definitions import invalid_resource_configs

    monkeypatch.setenv("RW_TEST_INBOX", "/data/inbox")
    monkeypatch.setenv("RW_TEST_THREADS", "-2")
    ok = {"dataset": {"config": {"inbox": {"env": "RW_TEST_INBOX"}}}, "gpu": {"config": {"master_addr": {"env": "RW_TEST_INBOX"}}}}  # fmt: skip
    assert invalid_resource_configs({"resources": ok}) == []
    bad = invalid_resource_configs(
        {"resources": {"gpu": {"config": {"threads": {"env": "RW_TEST_THREADS"}}}}}
    )
    assert len(bad) == 1 and bad[0].startswith("resources.gpu.config.threads"), bad


def test_the_shipped_resource_configs_pass_the_checks_run_before_any_step() -> None:
    from roadwork_assets.definitions import invalid_resource_configs

    for path in SHIPPED:
        assert invalid_resource_configs(yaml.safe_load(path.read_text())) == [], path


def test_a_run_config_may_set_some_fields_of_a_resource_and_the_paths_come_from_the_environment(
    retrain_job, tmp_path, monkeypatch
) -> None:
    """Dagster drops the Definitions' values of a resource that the run config configures, so every path field
    has a default ('' = the environment's folder): setting only `format` of `dataset` (drops in COCO) or a
    threshold of `drift` must not fail with `Missing required config entry "inbox"`."""
    from roadwork_assets.definitions import defs
    from roadwork_resources.artifact_store import ArtifactStore
    from roadwork_resources.dataset import DatasetSource
    from roadwork_resources.settings import DriftSettings

    partial = {
        "dataset": {"config": {"format": "coco", "box_classes": ["cone"]}},
        "store": {"config": {}},
        "drift": {"config": {"alpha": 0.05}},
    }
    dg.validate_run_config(retrain_job, {"resources": {k: partial[k] for k in ("dataset", "store")}})
    dg.validate_run_config(defs.resolve_job_def("drift_job"), {"resources": {"drift": partial["drift"]}})

    monkeypatch.setenv("ROADWORK_INBOX", str(tmp_path / "inbox"))
    monkeypatch.setenv("ROADWORK_STATE", str(tmp_path / "state"))
    monkeypatch.delenv("ROADWORK_MONITOR_DIR", raising=False)
    from roadwork_assets.definitions import build_resources

    build_resources()  # Definitions from the environment (as `dagster dev` loads them), not an earlier test's folders
    launch = {k: cls.configure_at_launch() for k, cls in [("dataset", DatasetSource), ("store", ArtifactStore), ("drift", DriftSettings)]}  # fmt: skip
    with dg.build_resources(launch, resource_config=partial) as built:
        assert built.dataset.format == "coco" and built.dataset.inbox_path == tmp_path / "inbox"
        assert (
            built.store.checkpoint_dir("classifier", "v1")
            == tmp_path / "state" / "checkpoints" / "classifier" / "v1"
        )
        assert built.drift.alpha == 0.05 and built.drift.monitor_path == tmp_path / "state" / "monitor"
    assert DatasetSource(inbox=str(tmp_path / "elsewhere")).inbox_path == tmp_path / "elsewhere", (
        "a set path wins"
    )


def test_a_partial_override_falls_back_to_the_folders_the_definitions_were_built_with(
    tmp_path, monkeypatch
) -> None:
    """An embedded set-up (`build_resources(state=, inbox=)`, as every integration test builds one): a run
    config that sets only `dataset.format` reads the inbox those Definitions were given, not ROADWORK_INBOX."""
    from roadwork_assets.definitions import build_resources
    from roadwork_resources.artifact_store import ArtifactStore
    from roadwork_resources.dataset import DatasetSource
    from roadwork_resources.settings import DriftSettings

    monkeypatch.setenv("ROADWORK_INBOX", str(tmp_path / "env_inbox"))
    monkeypatch.setenv("ROADWORK_STATE", str(tmp_path / "env_state"))
    monkeypatch.delenv("ROADWORK_MONITOR_DIR", raising=False)
    try:
        build_resources(state=tmp_path / "state", inbox=tmp_path / "inbox", mlflow_uri="sqlite:///unused.db")
        assert DatasetSource(format="coco").inbox_path == tmp_path / "inbox"
        assert ArtifactStore().side_dir("splits", "v1").is_relative_to(tmp_path / "state")
        assert DriftSettings().monitor_path == tmp_path / "state" / "monitor"
        build_resources()  # Definitions from the environment again: the environment's folders
        assert DatasetSource(format="coco").inbox_path == tmp_path / "env_inbox"
        assert DriftSettings().monitor_path == tmp_path / "env_state" / "monitor"
    finally:
        build_resources()


def test_the_mlflow_resource_takes_a_partial_override_and_refuses_a_misspelt_key(
    retrain_job, tmp_path, monkeypatch
) -> None:
    """dagster-mlflow's keys can be set from a run config (before: any override was dropped without a word, a
    misspelt key accepted); the keys left out keep the Definitions' experiment and tracking store."""
    import mlflow

    from roadwork_assets.definitions import build_resources
    from roadwork_resources.mlflow_tracking import EXPERIMENT

    # the fixture's job was built as `make test` runs it: with or without MLFLOW_TRACKING_URI (then {env: ...})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env_store.db'}")
    resolved = dg.validate_run_config(
        retrain_job, {"resources": {"mlflow": {"config": {"experiment_name": "ablations"}}}}
    )["resources"]["mlflow"]["config"]
    assert resolved["experiment_name"] == "ablations"
    assert resolved["mlflow_tracking_uri"], (
        "a partial override lost the tracking store (MLflow would use ./mlruns)"
    )
    assert (
        dg.validate_run_config(retrain_job, {})["resources"]["mlflow"]["config"]["experiment_name"]
        == EXPERIMENT
    )
    with pytest.raises(dg.DagsterInvalidConfigError, match="experiment_nmae"):
        dg.validate_run_config(retrain_job, {"resources": {"mlflow": {"config": {"experiment_nmae": "x"}}}})

    # the resource itself, built from that run config: the override's experiment in the Definitions' store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        mlflow_def = build_resources(state=tmp_path, mlflow_uri=uri)["mlflow"]
        override = {"mlflow": {"config": {"experiment_name": "ablations"}}}
        with dg.build_resources({"mlflow": mlflow_def}, resource_config=override) as built:
            assert built.mlflow.wait_for_store() is None
    finally:
        build_resources()
    names = {e.name for e in mlflow.MlflowClient(tracking_uri=uri).search_experiments()}
    assert "ablations" in names, names
