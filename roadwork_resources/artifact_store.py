"""ArtifactStore: side folders an asset owns besides its output (checkpoints, feature cache, tables)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from pydantic import Field


class ArtifactStore(dg.ConfigurableResource):
    """Working folders under the state root. Paths include the partition so that two runs on
    different partitions never share a checkpoint folder; the feature cache is content-addressed and
    safe to share."""

    root: str = Field(
        "",
        description="state folder for checkpoints, caches and side tables; empty: the state folder the Definitions "
        "were built with ($ROADWORK_STATE, default ./state)",
    )

    @property
    def root_path(self) -> Path:
        """`root`, or the environment's state folder when it is empty (a run config that sets this resource
        without `root`)."""
        from roadwork_resources.paths import resource_default

        return Path(self.root) if self.root else resource_default("state")

    def checkpoint_dir(self, asset: str, partition: str) -> Path:
        path = self.root_path / "checkpoints" / asset / partition
        path.mkdir(parents=True, exist_ok=True)
        return path

    def feature_cache_dir(self) -> Path:
        path = self.root_path / "feature_cache"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def side_dir(self, asset: str, partition: str) -> Path:
        path = self.root_path / "side" / asset / partition
        path.mkdir(parents=True, exist_ok=True)
        return path

    def release_dir(self, asset: str, partition: str) -> Path:
        """Where each bundle of a partition keeps its own copy, `<root>/releases/<asset>/<partition>/<bundle id>/`:
        the IO manager's directory holds the partition's latest materialization, which a re-run replaces before
        its blocking checks run, so a release lives on here when a later bundle fails them."""
        path = self.root_path / "releases" / asset / partition
        path.mkdir(parents=True, exist_ok=True)
        return path
