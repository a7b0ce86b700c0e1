"""The bundle as an MLflow pyfunc model, logged "from code" (no pickled Python object).

MLflow loads this file, which registers `RoadworkBundleModel` with `mlflow.models.set_model`; the
bundle directory travels as the artifact `bundle` and is verified by `Bundle.load` (checksums,
schema) when the model loads. Input: a DataFrame with a column `image_b64` (base64 JPEG/PNG, the
way the network's synapse carries images) or `path`. Output: one row per image with answer (the
float a miner sends the validator), p_roadwork, decision and logit.

    mlflow models serve -m models:/roadwork@production --env-manager local --host 127.0.0.1 --port 5001

It predicts on the CPU unless `ROADWORK_SERVE_DEVICE` names another device (cuda, cuda:N, auto).
Images by `path` are read only inside the folder `ROADWORK_PYFUNC_PATH_ROOT` names (unset: paths are
refused): under `mlflow models serve` a path is read on the server, for whoever sends the request.
"""

from __future__ import annotations

import base64

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

DEVICE_VARIABLE = (
    "ROADWORK_SERVE_DEVICE"  # cpu (default) | cuda | cuda:N | auto, as `roadwork serve --device`
)
PATH_ROOT_VARIABLE = "ROADWORK_PYFUNC_PATH_ROOT"  # the folder `path` inputs may be read from; unset: none


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
        if not {"image_b64", "path"} & set(model_input.columns):
            raise ValueError(
                f"input columns {list(model_input.columns)}: send a column 'image_b64' (base64 JPEG) or 'path'"
            )
        named = [(f"row {i}", _row_image(i, row)) for i, row in enumerate(model_input.to_dict("records"))]
        preds = []
        for _, result in self.bundle.iter_predict(named):
            if isinstance(result, Exception):
                raise result  # names its row
            preds.append(result)
        return pd.DataFrame(
            {
                "answer": [p.answer for p in preds],
                "p_roadwork": [p.p_roadwork for p in preds],
                "decision": [p.decision for p in preds],
                "logit": [p.logit for p in preds],
            }
        )


def _row_image(i: int, row: dict) -> bytes | str | Exception:
    """Row `i`'s image: its `image_b64` decoded, else its `path` (inside `$ROADWORK_PYFUNC_PATH_ROOT` only),
    else an error naming the row. A row may carry either column (rows of both kinds in one frame)."""
    import binascii
    import os

    encoded, path = row.get("image_b64"), row.get("path")
    if isinstance(encoded, str) and encoded:
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as err:
            return ValueError(
                f"row {i}: image_b64 is not valid base64 ({err}); send the JPEG or PNG bytes base64-encoded"
            )
    if isinstance(path, str) and path:
        root = os.environ.get(PATH_ROOT_VARIABLE, "").strip()
        if not root:
            return ValueError(
                f"row {i}: images by path are off (a path is read on the server); send image_b64, or set "
                f"{PATH_ROOT_VARIABLE} to the folder the model may read images from"
            )
        allowed = os.path.realpath(root)
        real = os.path.realpath(os.path.join(allowed, path))  # a relative path is taken inside the folder
        if os.path.commonpath([real, allowed]) != allowed:
            return ValueError(
                f"row {i}: {path} is outside {PATH_ROOT_VARIABLE}={root}; only images inside it are read"
            )
        from roadwork_core.data.images import ImageRejected, read_uri_bytes

        try:
            return read_uri_bytes(real)  # read here, so that errors name the row and the path as given
        except ImageRejected as err:
            return ValueError(f"row {i}: {path}: {err.reason} ({err.detail})")
        except OSError as err:
            return ValueError(f"row {i}: {path}: {err.strerror or type(err).__name__}")
    return ValueError(f"row {i}: neither image_b64 nor path holds a value")


set_model(RoadworkBundleModel())
