"""The evaluation report's "subnet" section: val_test through the validator replica, scored its way.

Every test image goes through each challenge level 0-3 (`roadwork_core.subnet.challenge`, one fixed
random draw per image and level) and is predicted as a miner would see it. Three answers are scored
on the same images: the model's answer (the bundle's `answer` when it has one, else its calibrated
`p_roadwork`), always 0.5 (np.round -> 0: "no roadwork"), and the uncalibrated argmax (`p_raw`).

- Per level and over the 25/25/25/25 mix (every image at every level, pooled): accuracy, MCC and the
  reward proxy (0.5 MCC + 0.5 accuracy)^3 with the validator's rules (`reward.reward_proxy`).
- The expected per-query reward of a simulated query stream: each query draws its label 0/1 with
  probability 0.5, a test image of that label and a level (0.25 each), like the validator; rewards
  come from `reward.query_rewards` (MCC over 100, accuracy over 10, cubed), averaged over the
  queries after the first 100 (the miner's history is full from then on, as for a miner that has
  been answering for a while). The point estimate averages `n_streams` streams over val_test; the CI
  is the percentile interval of one stream each over `n_bootstrap` resamples of the test images
  (with replacement, within each label), so it covers the test-set draw and the stream's order.
  All three answers see the same streams.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from roadwork_core.subnet.reward import MCC_WINDOW, query_rewards, reward_proxy

ANSWERS = ("model", "always_0.5", "argmax")
LEVELS = (0, 1, 2, 3)


def replica_predictions(
    images: Sequence[Any],
    labels: Sequence[int],
    predict_fn: Callable[[list[Any]], pd.DataFrame],
    *,
    levels: Sequence[int] = LEVELS,
    seed: int = 0,
    transform_threads: int | None = None,
    chunk_size: int = 8,
) -> pd.DataFrame:
    """Predict every image at every challenge level. One row per (image, level), level by level.

    `predict_fn(images)` returns one row per image with `p_roadwork` and `p_raw`, and `answer` when
    the bundle gives one. Image i at level l uses the generator seeded (seed, i, l), so a report is
    reproducible and each image's challenges do not depend on the others. `transform_threads` sets
    torch's thread count while the challenges are computed (the model forward keeps its own).
    Images are taken `chunk_size` at a time (`images[i]`: a lazy sequence decodes each once), every level
    on a chunk before the next: memory holds one chunk of full-size images, not the whole test split.
    """
    import torch

    from roadwork_core.subnet.challenge import apply_level

    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels; pass one label per image")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    parts: dict[int, list[pd.DataFrame]] = {int(level): [] for level in levels}
    for start in range(0, len(images), chunk_size):
        chunk = [images[i] for i in range(start, min(len(images), start + chunk_size))]
        for level in parts:
            before = torch.get_num_threads()
            torch.set_num_threads(transform_threads or before)
            try:
                challenged = [
                    apply_level(img, level, np.random.default_rng([seed, start + j, level]))
                    for j, img in enumerate(chunk)
                ]
            finally:
                torch.set_num_threads(before)
            table = pd.DataFrame(predict_fn(challenged)).reset_index(drop=True)
            if len(table) != len(chunk):
                raise ValueError(
                    f"predict_fn returned {len(table)} rows for {len(chunk)} images at level {level}"
                )
            table["image_index"] = np.arange(start, start + len(chunk))
            parts[level].append(table)
            del challenged
        del chunk
    tables = []
    for level, chunks in parts.items():
        table = pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(predict_fn([]))
        if not chunks:
            table["image_index"] = np.arange(0)
        table["label"] = np.asarray(labels, dtype=int)
        table["level"] = level
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def _answer_matrix(table: pd.DataFrame, levels: Sequence[int], model_col: str) -> dict[str, np.ndarray]:
    """answer kind -> (n_images, n_levels) array of the float each would send."""
    wide = {}
    for kind, col in (("model", model_col), ("argmax", "p_raw")):
        pivot = table.pivot(index="image_index", columns="level", values=col)
        wide[kind] = pivot[list(levels)].to_numpy(dtype=np.float64)
    wide["always_0.5"] = np.full_like(wide["model"], 0.5)
    return wide


def simulate_stream_rewards(
    labels: np.ndarray,
    answers: dict[str, np.ndarray],
    rng: np.random.Generator,
    *,
    length: int,
    warmup: int = MCC_WINDOW,
    pools: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """Mean reward after `warmup` of one random query stream, for each answer kind (same stream)."""
    neg, pos = pools if pools is not None else (np.flatnonzero(labels == 0), np.flatnonzero(labels == 1))
    n_levels = next(iter(answers.values())).shape[1]
    y = rng.integers(0, 2, length)
    pick = np.where(
        y == 1, pos[rng.integers(len(pos), size=length)], neg[rng.integers(len(neg), size=length)]
    )
    level = rng.integers(0, n_levels, length)
    return {kind: float(query_rewards(y, a[pick, level])[warmup:].mean()) for kind, a in answers.items()}


def subnet_section(
    table: pd.DataFrame,
    *,
    model_col: str | None = None,
    n_streams: int = 200,
    stream_length: int = 600,
    n_bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """The report's subnet section from `replica_predictions` output (see module docstring)."""
    model_col = model_col or ("answer" if "answer" in table.columns else "p_roadwork")
    levels = sorted(int(v) for v in table["level"].unique())
    per_image = table[table["level"] == levels[0]].sort_values("image_index")
    labels = per_image["label"].to_numpy(dtype=int)
    answers = _answer_matrix(table, levels, model_col)

    rows = []
    for kind in ANSWERS:
        for j, lvl in enumerate(levels):
            rows.append({"answer": kind, "level": str(lvl), **reward_proxy(labels, answers[kind][:, j])})
        pooled = answers[kind].T.reshape(-1)  # level-major, like np.tile(labels, n_levels)
        rows.append({"answer": kind, "level": "mix", **reward_proxy(np.tile(labels, len(levels)), pooled)})

    section: dict[str, Any] = {
        "n_images": len(labels),
        "levels": levels,
        "model_answer": model_col,
        "per_level": rows,
        "stream": [],
        "config": {
            "n_streams": n_streams,
            "stream_length": stream_length,
            "warmup": MCC_WINDOW,
            "n_bootstrap": n_bootstrap,
            "seed": seed,
            "level": level,
        },
    }
    neg, pos = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    if len(neg) == 0 or len(pos) == 0:
        section["note"] = "val_test holds one label only: no query stream can be simulated"
        return section
    if stream_length <= MCC_WINDOW:
        raise ValueError(f"stream_length={stream_length} must exceed the {MCC_WINDOW}-query warm-up")

    rng = np.random.default_rng(seed)
    streams = [simulate_stream_rewards(labels, answers, rng, length=stream_length) for _ in range(n_streams)]
    boot = []
    for _ in range(n_bootstrap):
        pools = (rng.choice(neg, len(neg)), rng.choice(pos, len(pos)))
        boot.append(simulate_stream_rewards(labels, answers, rng, length=stream_length, pools=pools))
    q = [(1 - level) / 2, (1 + level) / 2]
    for kind in ANSWERS:
        low, high = np.quantile([b[kind] for b in boot], q) if boot else (math.nan, math.nan)
        section["stream"].append(
            {
                "answer": kind,
                "expected_reward": float(np.mean([s[kind] for s in streams])),
                "low": float(low),
                "high": float(high),
            }
        )
    return section


def subnet_metrics(section: dict[str, Any]) -> dict[str, float]:
    """Flat figures for MLflow / Dagster metadata: subnet_<answer>_<level>_<metric>, subnet_<answer>_stream_*."""
    out: dict[str, float] = {}
    for row in section.get("per_level", []):
        for m in ("accuracy", "mcc", "reward_proxy"):
            out[f"subnet_{row['answer']}_level{row['level']}_{m}"] = float(row[m])
    for row in section.get("stream", []):
        for m in ("expected_reward", "low", "high"):
            out[f"subnet_{row['answer']}_stream_{m}"] = float(row[m])
    return out


def _f(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{float(x):.4f}"


def summary_markdown(section: dict[str, Any]) -> str:
    """The subnet section as markdown (empty string when the report has none)."""
    if not section:
        return ""
    cfg = section.get("config", {})
    model = section.get("model_answer")
    lines = [
        "",
        "#### Subnet: val_test through the validator replica",
        "",
        f"{section['n_images']} images x levels {section['levels']}; answers: model = `{model}`, "
        "always_0.5 (rounds to no_roadwork), argmax = uncalibrated `p_raw`.",
        "",
        "| answer | level | accuracy | mcc | reward_proxy |",
        "|---|---|---|---|---|",
    ]
    for row in section.get("per_level", []):
        lines.append(
            f"| {row['answer']} | {row['level']} | {_f(row['accuracy'])} | {_f(row['mcc'])} | {_f(row['reward_proxy'])} |"
        )
    if section.get("stream"):
        lines += [
            "",
            f"Expected per-query reward of a simulated query stream ({cfg.get('n_streams')} random streams of "
            f"{cfg.get('stream_length')} queries, windows 100/10, first {cfg.get('warmup')} queries excluded; "
            f"{int(100 * cfg.get('level', 0.95))}% CI over {cfg.get('n_bootstrap')} resamples of the test images):",
            "",
            "| answer | expected reward | CI |",
            "|---|---|---|",
        ]
        for row in section["stream"]:
            lines.append(
                f"| {row['answer']} | {_f(row['expected_reward'])} | [{_f(row['low'])}, {_f(row['high'])}] |"
            )
    if section.get("note"):
        lines += ["", f"- {section['note']}"]
    return "\n".join(lines) + "\n"


__all__ = [
    "replica_predictions",
    "simulate_stream_rewards",
    "subnet_metrics",
    "subnet_section",
    "summary_markdown",
]
