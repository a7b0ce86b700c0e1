"""Loading the Dagster definitions must not import the training stack. Every code server the webserver
and the daemon start, every `dagster sensor start` / `dagster asset list` and every sensor tick loads
them; torch + torchmetrics (+ torchvision, matplotlib) cost seconds of each such load. Assets import
what they run inside their bodies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
)


def _imported_after(statement: str) -> list[str]:
    code = (
        f"import sys, json\n{statement}\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loading_the_definitions_imports_no_training_stack() -> None:
    heavy = _imported_after("import roadwork_assets.definitions")
    assert heavy == [], (
        f"importing roadwork_assets.definitions imported {heavy}: import them inside the asset"
    )


def test_metrics_names_still_resolve_on_first_use() -> None:
    """roadwork_core.metrics re-exports lazily: the names work, and only the submodule used is imported."""
    heavy = _imported_after(
        "import roadwork_core.metrics as m\nassert callable(m.bootstrap_ci) and 'bootstrap_ci' in dir(m)\n"
        "assert 'torchmetrics' not in sys.modules\nassert m.METRIC_NAMES and callable(m.classification_metrics)"
    )
    assert "torchmetrics" in heavy, "classification_metrics should have imported its torchmetrics"


def test_supervised_training_imports_peft_only_for_adapters() -> None:
    """peft is a heavy import (its tuner registry, on top of transformers, which torchmetrics imports
    anyway when installed): head / full training, the ablation's probes and the data-parallel ranks do
    without it; lora / dora import it on use."""
    heavy = _imported_after("import roadwork_core.training.supervised")
    assert "torch" in heavy and "timm" in heavy, heavy
    assert "peft" not in heavy, heavy
    heavy = _imported_after(
        "import torch\n"
        "from roadwork_core.models.backbone import BackboneConfig\n"
        "from roadwork_core.models.classifier import build_classifier\n"
        "from roadwork_core.config import TrainConfig\n"
        "from roadwork_core.training.supervised import _prepare\n"
        "model = build_classifier(BackboneConfig(name='vit_test_tiny'))\n"
        "_prepare(model, TrainConfig(mode='full'))\n"
        "assert 'peft' not in sys.modules\n"
        "_prepare(model, TrainConfig(mode='lora'))"
    )
    assert "peft" in heavy, "lora training should have imported peft"
