"""Security: nothing untrusted is deserialized unsafely, servers bind 127.0.0.1, secrets stay out of
metadata, manifests, logs and MLflow."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import dagster as dg
import pytest
import torch

from tests.reliability.conftest import REPO
from tests.two_partitions import SECRET_TOKEN

torch.set_num_threads(1)

PACKAGES = ("roadwork_core", "roadwork_resources", "roadwork_assets", "roadwork_commands")

# ---------------------------------------------------------------------------------------------------
# unsafe deserialization (an AST scan: comments and docstrings that mention pickle do not count)

_ALWAYS_UNSAFE = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
    "cPickle.load", "cPickle.loads", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
    "joblib.load", "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads",
    "yaml.unsafe_load", "yaml.full_load", "numpy.lib.format.read_array",
}  # fmt: skip
_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "yaml.SafeLoader", "yaml.CSafeLoader"}


def _imports(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin (`np` -> `numpy`, `load` from `from pickle import load` -> `pickle.load`)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(names.get(node.id, node.id))
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_deserialization(source: str, filename: str) -> list[str]:
    """`file:line: call` for each unsafe deserialization call in `source`."""
    tree = ast.parse(source, filename)
    names = _imports(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, names) or ""
        name = name.replace("np.", "numpy.", 1) if name.startswith("np.") else name
        name = name.replace("pd.", "pandas.", 1) if name.startswith("pd.") else name
        bad = (
            name in _ALWAYS_UNSAFE
            or name.endswith(".read_pickle")
            or (name == "torch.load" and not _is_true(_kw(node, "weights_only")))
            or (name == "numpy.load" and _is_true(_kw(node, "allow_pickle")))
            or (
                name == "yaml.load"
                and (_dotted(_kw(node, "Loader") or ast.Constant(None), names) or "")
                not in _SAFE_YAML_LOADERS
                and not (len(node.args) > 1 and (_dotted(node.args[1], names) or "") in _SAFE_YAML_LOADERS)
            )
        )
        if bad:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:120]}")
    return found


def test_the_scanner_flags_each_unsafe_form() -> None:
    planted = """
import pickle, joblib, yaml, torch
import numpy as np
import pandas as pd
from pickle import loads as l
pickle.load(f); l(b); pickle.Unpickler(f).load(); joblib.load("m")
torch.load("w.pt"); torch.load("w.pt", weights_only=False)
np.load("a.npy", allow_pickle=True); pd.read_pickle("x"); yaml.load(s); yaml.load(s, Loader=yaml.Loader)
"""
    safe = """
import torch, yaml
import numpy as np
torch.load("w.pt", weights_only=True); np.load("a.npy"); yaml.safe_load(s)
yaml.load(s, Loader=yaml.SafeLoader); json.loads(s)  # pickle.load(f) in a comment
"""
    flagged = unsafe_deserialization(planted, "planted.py")
    assert len(flagged) == 10, "the scanner missed an unsafe form:\n" + "\n".join(flagged)
    assert unsafe_deserialization(safe, "safe.py") == [], "the scanner flags safe calls"


def test_no_unsafe_deserialization() -> None:
    files = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))
    assert len(files) > 30, f"expected the whole package, found {len(files)} files"
    found = [hit for f in files for hit in unsafe_deserialization(f.read_text(), str(f.relative_to(REPO)))]
    assert not found, (
        "unsafe deserialization of possibly untrusted data; use safetensors / JSON / parquet, "
        "`torch.load(..., weights_only=True)` or `yaml.safe_load`:\n" + "\n".join(found)
    )


# ---------------------------------------------------------------------------------------------------
# bind addresses


def test_ui_and_printed_servers_bind_localhost() -> None:
    from roadwork_commands.demo import mlflow_ui_command

    makefile = (REPO / "Makefile").read_text()
    ui = re.search(r"^ui:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert ui, "Makefile has no `ui` target"
    assert re.search(r"dagster dev .*-h 127\.0\.0\.1", ui.group(1)), (
        f"`make ui` must bind 127.0.0.1:\n{ui.group(1)}"
    )
    for path in [
        REPO / "Makefile",
        REPO / "workspace.yaml",
        REPO / "dagster.yaml",
        *REPO.glob("configs/*.yaml"),
    ]:
        assert "0.0.0.0" not in path.read_text(), f"{path.name} binds all interfaces"

    line = mlflow_ui_command(None)
    assert "--host 127.0.0.1" in line and "sqlite:///" in line, line
    secret_uri = "postgresql://roadwork:hunter2-pw@db.internal:5432/mlflow"
    line = mlflow_ui_command(secret_uri)
    assert "hunter2-pw" not in line and "$MLFLOW_TRACKING_URI" in line, f"the printed command leaks: {line}"
    assert "--host 127.0.0.1" in line
    spaced = mlflow_ui_command("sqlite:////home/me/my work/rw/state/mlflow.db")  # pasted, it must work
    assert shlex.split(spaced)[3] == "sqlite:////home/me/my work/rw/state/mlflow.db", spaced


# ---------------------------------------------------------------------------------------------------
# secrets through the environment, never in metadata / manifests / logs / MLflow


def _walk_text(root: Path) -> list[tuple[Path, str]]:
    out = []
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in {
            ".json",
            ".md",
            ".txt",
            ".yaml",
            ".csv",
            ".html",
            ".out",
            ".err",
            "",
        }:
            out.append((path, path.read_text(errors="replace")))
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("two_partition_runs")  # on the worker that builds the fixture for test_concurrency
def test_secrets_from_env_never_reach_metadata_manifest_logs_or_mlflow(two_partition_runs) -> None:
    """The two concurrent graph runs (tests/two_partitions.py) got the MLflow URI and credential-looking
    values only from the environment; none of them may appear in what the runs wrote: the daemon's log
    (its run workers' output), run configs, event logs, metadata, artifacts, the steps' captured output
    under DAGSTER_HOME, MLflow."""
    import mlflow

    runs = two_partition_runs
    instance, state, secrets = runs["instance"], runs["state"], runs["secrets"]
    assert (state / SECRET_TOKEN / "mlflow.db").is_file(), "MLflow did not use the URI from the environment"

    def check(text: str, where: str) -> None:
        for value, what in secrets.items():
            assert value not in text, f"{what} leaked into {where}"

    for version, result in runs["results"].items():
        assert result["success"], f"run {version} failed:\n{runs['outputs'][version][-3000:]}"
        check(runs["outputs"][version], f"the stdout/stderr of run {version}")
        check(str(instance.get_run_by_id(result["run_id"]).run_config), f"the run config of {version}")
        logs = instance.all_logs(result["run_id"])
        assert len(logs) > 50, f"expected the event log of run {version}"
        for entry in logs:
            check(entry.user_message or "", f"a log message of {version} ({entry.step_key})")
            if entry.dagster_event is not None:
                event = entry.dagster_event
                check(str(event.event_specific_data), f"a {event.event_type_value} event of {version}")
        for record in instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("bundle"), asset_partitions=[version]), limit=5
        ).records:
            metadata = record.asset_materialization.metadata
            check(json.dumps({k: str(v.value) for k, v in metadata.items()}), f"bundle metadata {version}")
    for key in instance.get_asset_keys():
        for record in instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=10).records:
            metadata = record.asset_materialization.metadata
            check(json.dumps({k: str(v.value) for k, v in metadata.items()}), f"metadata of {key}")

    files = _walk_text(state / "artifacts") + _walk_text(state / "checkpoints")
    assert any(p.name == "manifest.json" for p, _ in files), "no bundle manifest.json was scanned"
    captured = _walk_text(runs["home"] / "storage")  # the compute log manager's captured step output
    assert captured, f"no captured step output under {runs['home'] / 'storage'}"
    files += captured
    for path, text in files:
        check(text, str(path))

    mlflow.set_tracking_uri(runs["mlflow_uri"])
    found = mlflow.search_runs(experiment_names=["roadwork"], output_format="list")
    assert len(found) == 2, f"expected one MLflow run per Dagster run, found {len(found)}"
    for run in found:
        check(json.dumps({**run.data.params, **run.data.tags}), "MLflow params / tags")
