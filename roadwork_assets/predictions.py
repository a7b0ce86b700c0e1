"""Predictions stage: the classifier applied to val_select, val_calib and val_test, one asset each."""

from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from roadwork_assets._util import reader_metadata
from roadwork_assets.data import require_green_splits
from roadwork_assets.partitions import dataset_version
from roadwork_assets.types import PredictionsTable
from roadwork_core.contracts import Split, SplitReader
from roadwork_core.contracts.labels import hard_label
from roadwork_resources.gpu import GPUResource
from roadwork_resources.mlflow_tracking import MLFLOW_HOOKS


class PredictConfig(dg.Config):
    batch_size: int = Field(16, ge=1, description="images per forward")
    num_workers: int = Field(
        0,
        ge=0,
        description="DataLoader processes decoding the images (0: in the step's process; a GPU wants several)",
    )


def _predictions_asset(name: str, split: Split) -> dg.AssetsDefinition:
    @dg.asset(
        name=name,
        partitions_def=dataset_version,
        group_name="predictions",
        kinds={"pytorch", "pandas"},
        dagster_type=PredictionsTable,
        hooks=MLFLOW_HOOKS,
        description=f"Per-image logit, per-view probabilities and uncertainty features on {split.value} only.",
    )
    def _asset(
        context: dg.AssetExecutionContext,
        config: PredictConfig,
        gpu: GPUResource,
        splits: pd.DataFrame,
        classifier: Path,
    ) -> dg.Output:
        from roadwork_core.config import exact_fp32
        from roadwork_core.models.predict import predict_frame
        from roadwork_core.models.serialization import load_classifier

        gpu.setup()
        require_green_splits(context)
        reader = SplitReader(name, splits)
        rows = reader.read(split)
        # never compiled (gpu.compile speeds up training): these logits must be the eager model's, which the
        # bundle serves and check_bundle_reproduces_predictions compares within 1e-4
        model = load_classifier(classifier, device=gpu.torch_device(), inference=True)
        if gpu.effective_precision() != "fp32":
            context.log.info(
                f"predictions run in fp32 (not {gpu.effective_precision()}): the bundle serves in fp32, and "
                "calibration and policies must be fitted on the logits it will produce"
            )
        with exact_fp32():
            frame = predict_frame(
                model,
                rows,
                device=gpu.torch_device(),
                batch_size=config.batch_size,
                num_workers=config.num_workers,
            )
        return dg.Output(
            frame,
            metadata={
                "split": split.value,
                "num_images": len(frame),
                "num_positive": int(frame["label"].sum()),
                "mean_p_raw": float(frame["p_raw"].mean()) if len(frame) else float("nan"),
                "accuracy_at_0.5": float(
                    (hard_label(frame["p_raw"].to_numpy()) == (frame["label"] == 1)).mean()
                )
                if len(frame)
                else float("nan"),
                "dagster/row_count": len(frame),
                **reader_metadata(reader),
            },
        )

    return _asset


select_predictions = _predictions_asset("select_predictions", Split.VAL_SELECT)
calib_predictions = _predictions_asset("calib_predictions", Split.VAL_CALIB)
test_predictions = _predictions_asset("test_predictions", Split.VAL_TEST)
