"""DatasetSource: where data drops arrive and how they are read."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field


class DatasetSource(dg.ConfigurableResource):
    """The inbox of data drops. A drop is `<inbox>/<version>/`, complete once it holds `_READY`.

    Version `v` of the dataset is the union of every complete drop whose name sorts at or before `v`.
    """

    inbox: str = Field(
        "",
        description="folder holding one sub-folder per data drop; empty: the inbox the Definitions were built with "
        "($ROADWORK_INBOX, default ./data/inbox)",
    )
    format: Literal["auto", "labels_csv", "imagefolder", "hf_parquet", "yolo", "coco"] = Field(
        "auto",
        description="drop format; auto detects labels.csv, ImageFolder, Hugging Face parquet, YOLO or COCO",
    )
    positive_class: str = Field("roadwork", description="ImageFolder / class-name label for label 1")
    negative_class: str = Field("no_roadwork", description="ImageFolder / class-name label for label 0")
    box_classes: list[str] = Field(
        [],
        description="YOLO / COCO: class names (or ids) whose boxes make an image roadwork; empty = any box",
    )

    @property
    def inbox_path(self) -> Path:
        """`inbox`, or where the environment puts the inbox when it is empty: a run config that sets only
        `format` (or another field) of this resource leaves `inbox` empty, since Dagster does not keep
        the Definitions' values of a resource whose config a run gives."""
        from roadwork_resources.paths import resource_default

        return Path(self.inbox) if self.inbox else resource_default("inbox")

    @property
    def class_names(self) -> dict[str, int]:
        return {self.positive_class: 1, self.negative_class: 0}

    def ready_drops(self) -> list[str]:
        from roadwork_core.data.drops import list_ready_drops

        return list_ready_drops(self.inbox_path)

    def unusable_drops(self) -> dict[str, str]:
        """Complete drops whose folder name cannot be a dataset version -> the problem and the fix."""
        from roadwork_core.data.drops import unusable_ready_drops

        return unusable_ready_drops(self.inbox_path)

    def drops_for_version(self, version: str) -> list[Path]:
        from roadwork_core.data.drops import drops_up_to

        return drops_up_to(self.inbox_path, version)
