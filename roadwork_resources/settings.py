"""Settings resources: knobs that an asset, its checks or a sensor read at run time, set per
deployment in Definitions or in run config (`resources:`)."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from roadwork_core.contracts import Split


class SplitSettings(dg.ConfigurableResource):
    """Split ratios and the split contract's thresholds, shared by the `splits` asset and its checks."""

    train: float = 0.60
    val_select: float = 0.10
    val_calib: float = 0.15
    val_test: float = 0.15
    radius: int = Field(6, ge=0, le=63, description="near-duplicate radius: phash Hamming distance")
    group_column: str = Field(
        "meta.group_id",
        description="image table column whose equal values go to one split, like near-duplicates: frames of one "
        "video, photos of one drive (a drop's `group_id` column arrives as meta.group_id); '' turns it off",
    )
    balance_tolerance: float = Field(0.05, ge=0, description="max |positive rate of a split - overall rate|")
    min_per_class: int = Field(10, ge=0, description="minimum images of each class in each split")

    def ratios(self) -> dict[str, float]:
        return {s.value: getattr(self, s.value) for s in Split}


class RetrainSettings(dg.ConfigurableResource):
    """What new_drop_sensor does with a drop whose partition already has a released bundle."""

    force_retrain: bool = Field(
        False,
        description="retrain every new drop, even one whose partition already has a released bundle built from "
        "the same files (the environment variable ROADWORK_FORCE_RETRAIN=1 sets it)",
    )


class DriftSettings(dg.ConfigurableResource):
    """Where monitored (incoming, unlabelled) images land, and when drift counts as significant."""

    monitor_dir: str = Field(
        "",
        description="folder of recent production images to compare with training images; empty: the one the "
        "Definitions were built with ($ROADWORK_MONITOR_DIR, default <state>/monitor)",
    )
    # PSI over 10 quantile bins is biased upwards on small samples: with n images per side its mean
    # under no drift is about 9 * 2 / n (0.58 at n=48, 0.34 at 64, 0.08 at 256; measured in
    # tests/e2e/test_sensors.py), so fewer than ~128 images per side would flag drift at 0.25 by chance.
    sample: int = Field(256, ge=2, description="images per side (monitoring and training reference)")
    alpha: float = Field(
        0.01, gt=0, lt=1, description="significance level of the MMD permutation and KS tests"
    )
    psi_threshold: float = Field(0.25, gt=0, description="PSI above this is drift")
    n_permutations: int = Field(
        500, ge=1, description="permutations of the MMD test (p-value resolution 1/(n+1))"
    )
    min_images: int = Field(
        128,
        ge=2,
        description="skip while the monitoring folder holds fewer images (PSI is noise below ~128; the test needs 2)",
    )

    @property
    def monitor_path(self) -> Path:
        """`monitor_dir`, or the environment's (ROADWORK_MONITOR_DIR, else <state>/monitor) when it is empty:
        a run config that sets only the thresholds leaves it empty."""
        from roadwork_resources.paths import resource_default

        return Path(self.monitor_dir) if self.monitor_dir else resource_default("monitor")
