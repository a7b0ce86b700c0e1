"""The `dataset_version` partitions: one per data drop. `python -m roadwork_commands.partitions` adds
versions by hand (the new-drop sensor does it on its own)."""

import dagster as dg

# One partition per data drop; version v = every complete drop whose name sorts at or before v.
dataset_version = dg.DynamicPartitionsDefinition(name="dataset_version")
