"""Column contract of the predictions tables (select / calib / test predictions).

One row per image. `p_raw` is the uncalibrated aggregated probability; calibration maps `logit` to
`p_roadwork` later. The uncertainty features are what the gate policy and SCRC read.
"""

from __future__ import annotations

# Per-image uncertainty features, all computed from uncalibrated view/aggregate probabilities.
UNCERTAINTY_FEATURES: tuple[str, ...] = (
    "max_prob",  # max(p, 1-p) of the aggregated probability
    "entropy",  # binary entropy of the aggregated probability (nats)
    "margin",  # |2p - 1|
    "view_var",  # variance of the per-view probabilities
    "view_disagreement",  # fraction of views whose hard label differs from the aggregate's
    "global_tile_disagreement",  # |p_global - mean(p_tiles)|
)

PREDICTION_COLUMNS: tuple[str, ...] = (
    "image_id",
    "split",
    "label",
    "logit",  # aggregated logit (float)
    "p_raw",  # sigmoid(logit)
    "view_probs",  # list[float], one per view, global first then tiles row-major (then flips)
    *UNCERTAINTY_FEATURES,
)
