"""docs/architecture.md stays true: its picture is the one tools/architecture_diagram.py draws from the
code now, and every path in its "where does X live" table exists."""

import re
from pathlib import Path

from tools import architecture_diagram

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"


def test_committed_picture_is_the_one_the_code_draws(capsys) -> None:
    assert architecture_diagram.main(["--check"]) == 0, capsys.readouterr().err


def test_every_path_in_the_where_table_exists() -> None:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ") and " | `" in line]
    paths = [p for row in rows for p in re.findall(r"`([\w./-]+/[\w./-]*)`", row.split(" | ", 1)[1])]
    assert len(paths) > 40, paths  # the table was parsed
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_core_never_imports_dagster_and_the_picture_knows_every_core_package() -> None:
    graph, core_dagster = architecture_diagram.package_graph()
    assert core_dagster == []
    subpackages = {p.name for p in (REPO / "roadwork_core").iterdir() if (p / "__init__.py").is_file()}
    assert {f"roadwork_core.{name}" for name in subpackages} <= set(graph.nodes)
