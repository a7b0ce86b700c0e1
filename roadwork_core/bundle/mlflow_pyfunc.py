"""The bundle as an MLflow pyfunc model, logged "from code" (no pickled Python object).

MLflow loads this file, which registers `RoadworkBundleModel` with `mlflow.models.set_model`; the
bundle directory travels as the artifact `bundle` and is verified by `Bundle.load` (checksums,
schema) when the model loads. Input: a DataFrame with a column `image_b64` (base64 JPEG/PNG, the
way the network's synapse carries images) or `path`. Output: one row per image with answer (the
float a miner sends the validator), p_roadwork, decision and logit.

    mlflow models serve -m models:/roadwork/latest --env-manager local --host 127.0.0.1 --port 5001

It predicts on the CPU unless `ROADWORK_SERVE_DEVICE` names another device (cuda, cuda:N, auto).
"""

from __future__ import annotations

import base64

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

DEVICE_VARIABLE = (
    "ROADWORK_SERVE_DEVICE"  # cpu (default) | cuda | cuda:N | auto, as `roadwork serve --device`
)


def serve_device() -> str:
    """The device the pyfunc model predicts on: `$ROADWORK_SERVE_DEVICE` (mlflow models serve has no flag of
    ours), cpu when unset; one this machine cannot run is refused, naming the variable."""
    import os

    from roadwork_core.bundle.parts import device_problem

    device = os.environ.get(DEVICE_VARIABLE, "").strip() or "cpu"
    problem = device_problem(device)
    if problem:
        raise ValueError(f"{DEVICE_VARIABLE}={device!r}: {problem}")
    return device


class RoadworkBundleModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from roadwork_core.bundle.bundle import Bundle

        self.bundle = Bundle.load(context.artifacts["bundle"], device=serve_device())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if "image_b64" in model_input.columns:
            images = [base64.b64decode(s, validate=True) for s in model_input["image_b64"]]
        elif "path" in model_input.columns:
            images = list(model_input["path"])
        else:
            raise ValueError(
                f"input columns {list(model_input.columns)}: send a column 'image_b64' (base64 JPEG) or 'path'"
            )
        preds = self.bundle.predict(images)
        return pd.DataFrame(
            {
                "answer": [p.answer for p in preds],
                "p_roadwork": [p.p_roadwork for p in preds],
                "decision": [p.decision for p in preds],
                "logit": [p.logit for p in preds],
            }
        )


set_model(RoadworkBundleModel())
