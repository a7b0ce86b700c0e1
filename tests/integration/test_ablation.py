"""The ExPLoRA ablation command: head probes on base vs ExPLoRA weights, on the same splits."""

from __future__ import annotations

import io
import re

import pytest

from roadwork_assets.definitions import build_resources
from roadwork_commands import ablation
from tests.integration.conftest import TINY_CONFIG, materialize, tiny_run_config
from tests.integration.test_graph import _instance

pytestmark = pytest.mark.slow


def test_ablation_prints_both_select_mcc(tiny_inbox, rw_home, capsys, monkeypatch):
    instance = _instance("v0001")
    resources = build_resources(state=rw_home["state"], inbox=tiny_inbox, mlflow_uri=rw_home["mlflow_uri"])
    result = materialize(
        ["image_table", "splits", "explora_backbone"],
        instance=instance,
        partition="v0001",
        resources=resources,
        run_config={
            "ops": {"explora_backbone": tiny_run_config()["ops"]["explora_backbone"]},
            "resources": tiny_run_config()["resources"],
        },
    )
    assert result.success
    assert ablation.main(["--partition", "v0001", "-c", str(TINY_CONFIG), "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    # the demo's staged run: the base probe from the run config before explora_backbone is read. Its
    # base backbone must be the asset's (same weights hash: no rerun), so it prints the same figures.
    monkeypatch.setattr("sys.stdin", io.StringIO("image_table\nsplits\nexplora_backbone\n"))
    argv = ["--partition", "v0001", "-c", str(TINY_CONFIG), "--epochs", "3", "--stage-on-stdin"]
    assert ablation.main(argv) == 0
    staged = capsys.readouterr().out
    assert "base probe rerun" not in staged, staged
    figures = r"(base weights|ExPLoRA weights|largest weight change made by ExPLoRA):\s+\S+"
    assert re.findall(figures, staged) == re.findall(figures, out) != [], (staged, out)
    monkeypatch.setattr("sys.stdin", io.StringIO("splits\n"))
    with pytest.raises(SystemExit, match="ended before the line 'explora_backbone'"):
        ablation.main(argv)
    base = re.search(r"base weights:\s+(-?[\d.]+)", out)
    explora = re.search(r"ExPLoRA weights:\s+(-?[\d.]+)", out)
    assert base and explora, out
    assert -1.0 <= float(base.group(1)) <= 1.0 and -1.0 <= float(explora.group(1)) <= 1.0
    # the two probes differ only in the backbone weights: ExPLoRA changed them
    assert "difference" in out and "largest weight change" in out
    assert "head-mode feature cache" in out and "ran 0 backbone forwards" in out, out
