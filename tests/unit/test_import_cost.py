"""Loading the Dagster definitions must not import the training stack. Every code server the webserver
and the daemon start, every `dagster sensor start` / `dagster asset list` and every sensor tick loads
them; torch + torchmetrics (+ torchvision, matplotlib) cost seconds of each such load, and mlflow 1.3 s.
Assets import what they run inside their bodies; the MLflow resource imports mlflow when a run starts.

One fresh interpreter walks the stages in order and records which heavy packages each stage left in
`sys.modules`: every stage only adds imports, so a stage's set is measured exactly as in a fresh
process started for it (the first stage is one), and the suite pays one interpreter's imports (about
15 CPU-seconds on the 2-core CI machine) instead of four, once for all pytest-xdist workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import built_once

REPO = Path(__file__).resolve().parents[2]
HEAVY = (
    "torch",
    "torchmetrics",
    "torchvision",
    "timm",
    "peft",
    "transformers",
    "matplotlib",
    "netcal",
    "sklearn",
    "mlflow",
)

# (stage name, statements); the child prints the heavy modules present after each stage.
STAGES = (
    ("definitions", "import roadwork_assets.definitions"),
    ("cli_parser", "from roadwork_core.cli import build_parser\nbuild_parser()"),
    (
        "metrics_names",
        "import roadwork_core.metrics as m\nassert callable(m.bootstrap_ci) and 'bootstrap_ci' in dir(m)",
    ),
    ("explora", "import roadwork_core.training.explora\nimport roadwork_core.training as t"),
    ("training_names", "assert callable(t.train_classifier) and 'train_classifier' in dir(t)"),
    ("metrics_first_use", "assert m.METRIC_NAMES and callable(m.classification_metrics)"),
    ("supervised", "import roadwork_core.training.supervised"),
    (
        "prepare_full",
        "import torch\n"
        "from roadwork_core.models.backbone import BackboneConfig\n"
        "from roadwork_core.models.classifier import build_classifier\n"
        "from roadwork_core.config import TrainConfig\n"
        "from roadwork_core.training.supervised import _prepare\n"
        "model = build_classifier(BackboneConfig(name='vit_test_tiny'))\n"
        "_prepare(model, TrainConfig(mode='full'))",
    ),
    ("prepare_lora", "_prepare(model, TrainConfig(mode='lora'))"),
)


@pytest.fixture(scope="session")
def imported(tmp_path_factory) -> dict[str, list[str]]:
    """stage -> sorted heavy packages in sys.modules after it, from one fresh interpreter (one for the
    whole session: the pytest-xdist workers share its report through `built_once`)."""

    def build(path: Path) -> None:
        report = f"print('STAGE', json.dumps([name, sorted(m for m in {HEAVY!r} if m in sys.modules)]))"
        code = "import sys, json\n" + "\n".join(
            f"{statements}\nname = {name!r}\n{report}" for name, statements in STAGES
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        stages = dict(
            json.loads(line[len("STAGE ") :])
            for line in proc.stdout.splitlines()
            if line.startswith("STAGE ")
        )
        assert list(stages) == [name for name, _ in STAGES], f"the child stopped early: {proc.stdout[-2000:]}"
        path.write_text(json.dumps(stages))

    return json.loads(built_once(tmp_path_factory, "import_cost_stages.json", build).read_text())


def test_loading_the_definitions_imports_no_training_stack(imported) -> None:
    heavy = imported["definitions"]
    assert heavy == [], (
        f"importing roadwork_assets.definitions imported {heavy}: import them inside the asset"
    )


def test_the_roadwork_command_builds_its_parser_without_the_model_stack(imported) -> None:
    """`roadwork make-demo-data`, `roadwork --help` and argument errors need no model: building the parser
    (which defines `predict`'s and `serve`'s arguments) imports none of the heavy packages. Before, it
    imported the bundle, and with it torch and timm: 6.5 s for `make-demo-data --n 10`, now 0.4 s."""
    heavy = imported["cli_parser"]
    assert heavy == [], f"building roadwork's argument parser imported {heavy}"


def test_metrics_names_still_resolve_on_first_use(imported) -> None:
    """roadwork_core.metrics re-exports lazily: the names work, and only the submodule used is imported."""
    assert "torchmetrics" not in imported["metrics_names"], imported["metrics_names"]
    assert "torchmetrics" in imported["metrics_first_use"], (
        "classification_metrics should have imported its torchmetrics"
    )


def test_explora_imports_no_metrics_stack(imported) -> None:
    """An ExPLoRA step or rank imports torch and timm, not the supervised loop's torchmetrics (with its
    scipy, matplotlib and transformers: ~3 s a process) nor peft until it adds the adapters; the
    training package's names still resolve, on first use."""
    heavy = imported["explora"]
    assert "torch" in heavy and "timm" in heavy, heavy
    assert not {"torchmetrics", "matplotlib", "peft", "transformers"} & set(heavy), heavy
    assert "torchmetrics" in imported["training_names"], "train_classifier should have imported the loop"


def test_supervised_training_imports_peft_only_for_adapters(imported) -> None:
    """peft is a heavy import (its tuner registry, on top of transformers, which torchmetrics imports
    anyway when installed): head / full training, the ablation's probes and the data-parallel ranks do
    without it; lora / dora import it on use."""
    heavy = imported["supervised"]
    assert "torch" in heavy and "timm" in heavy, heavy
    assert "peft" not in heavy, heavy
    assert "peft" not in imported["prepare_full"], imported["prepare_full"]
    assert "peft" in imported["prepare_lora"], "lora training should have imported peft"


def test_the_mlflow_resource_takes_the_config_of_dagster_mlflow() -> None:
    """The resource declares dagster-mlflow's config keys itself (so loading the definitions does not
    import mlflow); a key that dagster-mlflow adds or drops must show up here."""
    from dagster_mlflow.resources import CONFIG_SCHEMA as upstream

    from roadwork_resources.mlflow_tracking import CONFIG_SCHEMA

    assert sorted(CONFIG_SCHEMA) == sorted(upstream)
    for key, field in upstream.items():
        assert CONFIG_SCHEMA[key].is_required == field.is_required, key
        assert CONFIG_SCHEMA[key].default_provided == field.default_provided, key
