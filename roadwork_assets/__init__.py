"""Dagster assets, checks, sensors and the Definitions of roadwork."""

import warnings

# first: roadwork_core's garbage-collector setting (roadwork_core/__init__.py) then applies to what the
# definitions and the assets import, and a torchrun rank (`python -m roadwork_assets.torchrun_worker`)
# imports this package before torch
import roadwork_core  # noqa: F401

# Checks on the partitioned assets must be partitioned too (an unpartitioned check loads every
# partition of its asset as soon as there are two). Dagster 1.13 marks `partitions_def` on asset
# checks as a preview feature; we use it deliberately, so its notice is silenced here, narrowly.
warnings.filterwarnings(
    "ignore", message=r"Specifying a partitions_def on an AssetCheckSpec is currently in preview"
)
