"""The command-line programs that drive the Dagster graph (they import roadwork_assets; the asset
modules never import them): `python -m roadwork_commands.demo` (`make demo`),
`python -m roadwork_commands.ablation`, `python -m roadwork_commands.partitions`. The dagster-free
`roadwork` console script (predict, serve, make-demo-data) is roadwork_core.cli."""

import roadwork_core  # noqa: F401  (first: its garbage-collector setting applies to the imports after it)
