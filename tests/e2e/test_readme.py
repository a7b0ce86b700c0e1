"""Every command in README.md's ```bash blocks is accounted for: run here as written (in a temporary
state folder), or mapped to the test that runs it, or named as something a test cannot do (a server
that runs until stopped, a recursive `make test`). A command this file does not know fails the test,
so a README edit cannot add an untested command. Every Dagster selection in the README is parsed by
Dagster itself (`dagster asset list --select`)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO

pytestmark = pytest.mark.slow

README = REPO / "README.md"


@dataclass(frozen=True)
class Rule:
    pattern: str  # re.search against the command (comments stripped, continuations joined)
    kind: str  # "run": run here as written; "covered": by the named test; "not_here": reason
    detail: str = ""


# Order matters only for "run" commands: they run in README order, so later ones see earlier ones' state.
RULES = [
    Rule(r"^make (demo|bench)\b", "covered", "tests/e2e/test_readme.py::test_make_targets_exist"),
    Rule(r"^make test\b", "not_here", "CI's own command (.ci/run); running it here would recurse"),
    Rule(r"^make ui\b", "not_here", "a server until stopped; tests/e2e/test_webserver.py runs the webserver"),
    Rule(r"^make lock\b", "not_here", "resolves the registry afresh (minutes); a deliberate upgrade step"),
    Rule(r"^make venv\b", "covered", ".ci/run (a clean clone: `make test` builds .venv from the lock)"),
    Rule(r"^make check-env\b", "run"),
    Rule(r"^\.venv/bin/roadwork make-demo-data\b", "run"),
    # The Postgres walk-through adds v0001 to its own fresh instance; run here, in the one home every command
    # shares, it would come after v0002's splits and be refused as a late drop (as it should be).
    Rule(
        r"^\.venv/bin/python -m roadwork_commands\.partitions add v0001$",
        "covered",
        "tests/integration/test_postgres_instance.py::test_postgres_instance_sensor_launches_two_concurrent_partitions_and_pool_holds",
    ),
    Rule(r"^\.venv/bin/python -m roadwork_commands\.partitions add\b", "run"),
    Rule(
        r"^\.venv/bin/dagster asset materialize .*--select '\*'",
        "covered",
        "tests/integration/test_graph.py::test_full_graph_materializes_with_green_checks_and_mlflow_run",
    ),
    Rule(
        r"^\.venv/bin/python -m roadwork_commands\.ablation\b",
        "covered",
        "tests/integration/test_ablation.py::test_ablation_prints_both_select_mcc",
    ),
    Rule(r"^\.venv/bin/dagster sensor start\b", "run"),
    Rule(
        r"roadwork predict --bundle",
        "covered",
        "tests/reliability/test_bad_input.py::test_predict_stdin_bad_base64_and_non_image",
    ),
    Rule(
        r"^\.venv/bin/python -m roadwork_resources\.pool_slots --free",
        "covered",
        "tests/e2e/test_killed_run.py::test_a_run_of_another_host_is_not_guessed_dead_and_is_freed_by_hand",
    ),
    Rule(r"^\.venv/bin/python -m roadwork_resources\.pool_slots$", "run"),
    Rule(
        r"roadwork predict --answer",
        "covered",
        "tests/unit/test_answer.py::test_roadwork_predict_answer_from_a_fresh_process",
    ),
    Rule(
        r"roadwork serve --latest",
        "covered",
        "tests/e2e/test_miner.py::test_serve_latest_hot_swaps_a_new_release_with_zero_failed_requests",
    ),
    Rule(
        r"roadwork serve --bundle",
        "covered",
        "tests/unit/test_serve.py::test_predict_returns_answer_probability_and_decision",
    ),
    Rule(
        r"^curl -s 127\.0\.0\.1:8091/(healthz|predict)",
        "covered",
        "tests/e2e/test_miner.py::test_serve_latest_hot_swaps_a_new_release_with_zero_failed_requests",
    ),
    Rule(r"^make postgres-deps\b", "covered", ".ci/run (installs the PostgreSQL server before `make test`)"),
    # The Postgres walk-through (start a throw-away server, point DAGSTER_HOME at deploy/'s instance file,
    # materialize, stop) is what the Postgres test fixture does with the same tools/pg_local.py and file.
    Rule(
        r"^python3 tools/pg_local\.py (start|stop)\b|^eval \"\$\(cat pg\.env\)\"$|"
        r"^export DAGSTER_HOME=\$PWD/state/dagster_home_pg$|^mkdir -p \$DAGSTER_HOME && cp deploy/dagster-postgres\.yaml|"
        r"^\.venv/bin/dagster instance info",
        "covered",
        "tests/integration/test_postgres_instance.py::test_postgres_instance_sensor_launches_two_concurrent_partitions_and_pool_holds",
    ),
    Rule(
        r"-c configs/data_parallel\.yaml",
        "covered",
        "tests/integration/test_distributed_assets.py::test_training_assets_run_data_parallel_through_pipes_and_a_killed_rank_resumes",
    ),
    Rule(r"^\.venv/bin/dagster instance concurrency set gpu \d+$", "run"),
    Rule(r"^\.venv/bin/dagster asset materialize ", "run"),
    Rule(r"^\.venv/bin/mlflow ui\b", "not_here", "a server until stopped"),
    Rule(
        r"mlflow models serve\b",
        "covered",
        "tests/integration/test_graph.py (pyfunc model loaded and predicting)",
    ),
    Rule(r"^curl .*/invocations", "not_here", "needs the `mlflow models serve` server above"),
]


def strip_comment(line: str) -> str:
    """Drop a trailing `  # comment` (README comments are set off by whitespace)."""
    return re.sub(r"(^|\s+)#(\s.*)?$", "", line).rstrip()


def readme_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each command in the ```bash blocks of `text`."""
    commands: list[tuple[int, str]] = []
    in_block, pending, start = False, "", 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip().startswith("```"):
            in_block = line.strip() == "```bash" if not in_block else False
            continue
        if not in_block:
            continue
        code = strip_comment(line)
        if not code.strip() and not pending:
            continue
        if not pending:
            start = lineno
        if code.endswith("\\"):
            pending += code[:-1].rstrip() + " "
            continue
        commands.append((start, (pending + code.strip()).strip()))
        pending = ""
    return commands


def rule_for(command: str) -> Rule | None:
    return next((rule for rule in RULES if re.search(rule.pattern, command)), None)


def selection_of(command: str) -> str | None:
    tokens = shlex.split(command)
    return tokens[tokens.index("--select") + 1] if "--select" in tokens else None


def test_readme_commands_parse() -> None:
    """The parser sees the README's commands whole (continuations joined, comments dropped)."""
    text = "```bash\nmake demo   # a comment\nfoo --a 1 \\\n  --b 2\n```\n```python\nprint(1)\n```\n"
    assert readme_commands(text) == [(2, "make demo"), (3, "foo --a 1 --b 2")]


def test_every_readme_command_is_accounted_for() -> None:
    commands = readme_commands(README.read_text())
    assert len(commands) >= 10, f"found only {len(commands)} commands in README.md: is the parser broken?"
    unknown = [f"README.md:{n}: {cmd}" for n, cmd in commands if rule_for(cmd) is None]
    assert not unknown, (
        "README commands that no test runs or explains; add a Rule in tests/e2e/test_readme.py:\n"
        + "\n".join(unknown)
    )
    for _, cmd in commands:
        rule = rule_for(cmd)
        if rule.kind == "covered":
            path, _, name = rule.detail.partition("::")
            source = (REPO / path.split(" ")[0]).read_text()
            assert not name or f"def {name}(" in source, f"{rule.detail} (named for `{cmd}`) does not exist"


def test_make_targets_exist() -> None:
    """`make -n` parses each make target the README names (demo and bench are run by their own CI
    paths; -n proves the target exists and its recipe expands)."""
    targets = {
        m.group(1)
        for _, cmd in readme_commands(README.read_text())
        for m in [re.match(r"make (\S+)", cmd)]
        if m
    }
    assert {"demo", "test"} <= targets
    for target in sorted(targets):
        proc = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"`make -n {target}` failed: {proc.stderr[-2000:]}"


def test_readme_selections_are_valid_dagster_selections() -> None:
    """Each `--select` in README parsed as `dagster asset materialize --select` parses it (dagster/_cli/
    asset.py: comma-split, AssetSelection.from_coercible) and resolved against the real Definitions, in
    process (a `dagster asset list` per selection costs ~10 s)."""
    import dagster as dg

    from roadwork_assets.definitions import defs

    selections = sorted({s for _, cmd in readme_commands(README.read_text()) if (s := selection_of(cmd))})
    assert selections, "README names no --select; the parser or the README changed"
    graph = defs.resolve_asset_graph()
    for selection in selections:
        keys = dg.AssetSelection.from_coercible(selection.split(",")).resolve(graph)
        assert keys, f"README selection {selection!r} selects no asset"
    with pytest.raises(Exception, match="Invalid selection string"):  # the README's old, broken form
        dg.AssetSelection.from_coercible(["image_table splits"]).resolve(graph)


def test_readme_runnable_commands_run_as_written(e2e_home: dict) -> None:
    """The commands marked "run", in README order, in the Makefile's environment pointed at a temporary
    state folder (the README asks the reader to export the same variables)."""
    env = os.environ.copy()  # e2e_home set DAGSTER_HOME, ROADWORK_STATE, ROADWORK_INBOX, MLFLOW_TRACKING_URI
    inbox = Path(env["ROADWORK_INBOX"])
    ran = []
    for lineno, cmd in readme_commands(README.read_text()):
        rule = rule_for(cmd)
        if rule is None or rule.kind != "run":
            continue
        # README paths are relative to the repository and its default inbox; point them at the test's
        command = cmd.replace("--out data/inbox", f"--out {inbox}")
        proc = subprocess.run(
            ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, (
            f"README.md:{lineno}: `{cmd}` exited {proc.returncode}:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        )
        ran.append(cmd)
    assert any("asset materialize" in c for c in ran) and any("make-demo-data" in c for c in ran), ran
