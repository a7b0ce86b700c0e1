"""The evaluation report on val_test: metrics with bootstrap CIs, risk-coverage, slices, robustness,
plots and the check of the released policy's stated guarantee.

Input is the test predictions table after calibration and the policy: one row per image with
`label`, `p_roadwork`, `decision` (roadwork / no_roadwork / defer), optionally `confidence`
(higher = more confident; defaults to max(p, 1-p)) and metadata columns for slices.

Guarantee check (FNR, and FPR when the policy states `alpha_fpr`): FNR is taken among ACCEPTED
roadwork images by default (what SCRC guarantees; `fnr_scope="all"` for all roadwork images). The
realized test rate may exceed α by sampling noise alone. The check passes when the one-sided 95% Clopper-Pearson LOWER
bound on the true rate, given k errors among the n test images of that class, is <= α, i.e. an
exact one-sided binomial test at 5% does not reject "true rate <= α". `tolerance` is the largest
realized rate that still passes, minus α.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import beta

from roadwork_core.contracts.labels import hard_label
from roadwork_core.io import atomic_write_bytes, atomic_write_text
from roadwork_core.metrics import subnet_eval
from roadwork_core.metrics.bootstrap import bootstrap_ci
from roadwork_core.metrics.selective import (
    augrc,
    augrc_optimal,
    check_decisions,
    risk_coverage_table,
    selective_summary,
)

LABEL_COL = "label"
GUARANTEE_CONFIDENCE = 0.95
REPORT_SCHEMA_VERSION = 1
# Shown first in summaries, in this order.
KEY_METRICS: tuple[str, ...] = (
    "accuracy",
    "mcc",
    "reward_proxy",
    "auroc",
    "auprc",
    "brier",
    "nll",
    "ece",
    "ace",
    "augrc",
    "augrc_excess",
    "coverage",
    "fnr",
    "fnr_accepted",
    "fpr",
    "selective_accuracy",
)


@dataclass
class EvaluationReport:
    metrics: dict[str, dict[str, float | None]]  # name -> {"value", "low", "high", "n_valid"}
    risk_coverage: pd.DataFrame
    slices: pd.DataFrame
    robustness: pd.DataFrame
    plots: dict[str, bytes]
    guarantee_check: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    subnet: dict[str, Any] = field(default_factory=dict)  # roadwork_core.metrics.subnet_eval.subnet_section

    def to_json(self) -> str:
        """Everything but the PNG bytes (listed by name; `read_report` loads them); NaN -> null."""
        doc = {
            "schema_version": REPORT_SCHEMA_VERSION,
            "metrics": self.metrics,
            "guarantee_check": self.guarantee_check,
            "notes": self.notes,
            "config": self.config,
            "risk_coverage": self.risk_coverage.to_dict(orient="records"),
            "slices": self.slices.to_dict(orient="records"),
            "robustness": self.robustness.to_dict(orient="records"),
            "plots": sorted(self.plots),
            "subnet": self.subnet,
        }
        return json.dumps(_jsonable(doc), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, plots_by_name: dict[str, bytes] | None = None) -> EvaluationReport:
        doc = json.loads(text)
        if doc.get("schema_version") != REPORT_SCHEMA_VERSION:
            raise ValueError(
                f"report schema_version {doc.get('schema_version')!r} is not {REPORT_SCHEMA_VERSION}; "
                "rebuild the report with this version of roadwork"
            )
        return cls(
            metrics=doc["metrics"],
            risk_coverage=pd.DataFrame.from_records(doc["risk_coverage"]),
            slices=pd.DataFrame.from_records(doc["slices"]),
            robustness=pd.DataFrame.from_records(doc["robustness"]),
            plots=dict(plots_by_name or {}),
            guarantee_check=doc["guarantee_check"],
            notes=list(doc.get("notes", [])),
            config=dict(doc.get("config", {})),
            subnet=dict(doc.get("subnet") or {}),
        )

    def summary_markdown(self) -> str:
        lines = ["### Evaluation on val_test", ""]
        n = self.metrics.get("n", {}).get("value")
        level = self.config.get("level", 0.95)
        lines += [
            f"{n} images; {int(level * 100)}% bootstrap CIs over {self.config.get('n_bootstrap')} resamples.",
            "",
        ]
        lines += ["| metric | value | CI |", "|---|---|---|"]
        for name in KEY_METRICS:
            m = self.metrics.get(name)
            if m is not None:
                lines.append(f"| {name} | {_fmt(m['value'])} | [{_fmt(m['low'])}, {_fmt(m['high'])}] |")
        g = self.guarantee_check
        status = {True: "PASSED", False: "FAILED", None: "n/a"}[g.get("passed")]
        lines += ["", f"**Guarantee check: {status}.** {g.get('message', '')}"]
        if not self.robustness.empty:
            cols = [
                c
                for c in ("level", "accuracy", "mcc", "reward_proxy", "coverage", "fnr")
                if c in self.robustness
            ]
            lines += ["", "Robustness by distortion level:", "", "| " + " | ".join(cols) + " |"]
            lines.append("|" + "---|" * len(cols))
            for row in self.robustness[cols].to_dict(orient="records"):
                lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
        if not self.slices.empty:
            worst = self.slices.sort_values("accuracy", kind="stable").iloc[0]
            lines += [
                "",
                f"{len(self.slices)} slices; lowest accuracy: {worst['column']}={worst['value']} "
                f"({_fmt(worst['accuracy'])}, n={int(worst['n'])}).",
            ]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n" + subnet_eval.summary_markdown(self.subnet)


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.4f}"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def point_metrics(
    p: np.ndarray, labels: np.ndarray, decisions: np.ndarray, confidence: np.ndarray
) -> dict[str, float]:
    """Classification metrics + AUGRC (and its optimum / excess) + the policy's decision summary."""
    from roadwork_core.metrics.classification import classification_metrics  # torchmetrics: on use

    out: dict[str, float] = dict(classification_metrics(p, labels))
    correct = hard_label(p) == (np.asarray(labels) == 1)
    error_rate = 1.0 - float(correct.mean()) if correct.size else math.nan
    out["error_rate"] = error_rate
    out["augrc"] = augrc(confidence, correct)
    out["augrc_optimal"] = augrc_optimal(error_rate)
    out["augrc_excess"] = out["augrc"] - out["augrc_optimal"]
    sel = selective_summary(decisions, labels)
    for name in ("coverage", "fnr", "fnr_accepted", "fpr", "selective_accuracy"):
        out[name] = sel[name]
    return out


def check_guarantee(
    decisions: np.ndarray, labels: np.ndarray, guarantee: dict[str, Any] | None
) -> dict[str, Any]:
    """Compare the realized test FNR (and FPR if `alpha_fpr` is stated) with the policy's α.

    `guarantee` is the policy's JSON fields (e.g. `ScrcPolicy.model_dump()`): `alpha` (required),
    optional `fnr_scope` ("accepted", the default: FN / accepted roadwork images, what SCRC
    guarantees; or "all": FN / all roadwork images), `alpha_fpr`, and `delta`, `mode`, `bound`, `n`,
    `guarantee` (copied into the result). The binomial tolerance covers test-sampling noise only,
    not the variability of the calibration draw behind an in-expectation (CRC) guarantee.
    """
    if not guarantee or guarantee.get("alpha") is None:
        return {
            "passed": None,
            "message": "the released policy states no guarantee (empirical thresholds); nothing to check",
        }
    scope = guarantee.get("fnr_scope", "accepted")
    if scope not in ("accepted", "all"):
        raise ValueError(f"policy guarantee fnr_scope = {scope!r}; use 'accepted' or 'all'")
    sel = selective_summary(decisions, labels)
    n_fnr = sel["n_positive_accepted"] if scope == "accepted" else sel["n_positive"]
    name = "FNR among accepted roadwork images" if scope == "accepted" else "FNR over all roadwork images"
    checks = {"fnr": _rate_check(sel["n_false_negative"], n_fnr, float(guarantee["alpha"]), name)}
    if guarantee.get("alpha_fpr") is not None:
        checks["fpr"] = _rate_check(
            sel["n_false_positive"], sel["n_negative"], float(guarantee["alpha_fpr"]), "FPR"
        )
    extra = {
        k: guarantee[k]
        for k in ("policy", "guarantee", "delta", "mode", "bound", "n", "conditioning")
        if k in guarantee
    }
    return {
        "passed": all(c["passed"] for c in checks.values()),
        "realized_fnr": checks["fnr"]["realized"],
        "alpha": checks["fnr"]["alpha"],
        "tolerance": checks["fnr"]["tolerance"],
        "fnr_scope": scope,
        "test": f"one-sided exact binomial (Clopper-Pearson lower bound at {GUARANTEE_CONFIDENCE:.0%})",
        "checks": checks,
        "policy_guarantee": extra,
        "message": " ".join(c["message"] for c in checks.values()),
    }


def _rate_check(errors: int, n: int, alpha: float, name: str) -> dict[str, Any]:
    if n == 0:
        return {
            "passed": True,
            "realized": math.nan,
            "alpha": alpha,
            "tolerance": math.nan,
            "lower_bound": math.nan,
            "n": 0,
            "errors": 0,
            "message": f"{name}: no test images of that class, the guarantee cannot be checked.",
        }
    ks = np.arange(n + 1)
    # one-sided lower Clopper-Pearson bound for k errors out of n (0 when k = 0)
    lower = np.where(ks == 0, 0.0, beta.ppf(1.0 - GUARANTEE_CONFIDENCE, np.maximum(ks, 1), n - ks + 1))
    k_max = int(ks[lower <= alpha].max())
    realized = errors / n
    passed = bool(lower[errors] <= alpha)
    verdict = "within" if passed else "EXCEEDS"
    message = (
        f"{name} {realized:.4f} ({errors}/{n}) vs α = {alpha:.4f}: {verdict} the statistical tolerance "
        f"(up to {k_max}/{n} = {k_max / n:.4f} is consistent with α at {GUARANTEE_CONFIDENCE:.0%}; "
        f"lower bound {lower[errors]:.4f})."
    )
    return {
        "passed": passed,
        "realized": realized,
        "alpha": alpha,
        "tolerance": k_max / n - alpha,
        "lower_bound": float(lower[errors]),
        "n": n,
        "errors": errors,
        "message": message,
    }


def _columns(df: pd.DataFrame, p_col: str, decision_col: str, confidence_col: str, what: str):
    missing = [c for c in (LABEL_COL, p_col, decision_col) if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what}: columns {missing} missing (have {list(df.columns)}); the table needs "
            f"'{LABEL_COL}', the calibrated probability '{p_col}' and the policy decision '{decision_col}'"
        )
    p = df[p_col].to_numpy(dtype=np.float64)
    labels = df[LABEL_COL].to_numpy()
    decisions = check_decisions(df[decision_col].to_numpy())
    if confidence_col in df.columns:
        confidence, source = df[confidence_col].to_numpy(dtype=np.float64), confidence_col
    else:
        confidence, source = np.maximum(p, 1.0 - p), f"max({p_col}, 1-{p_col})"
    return p, labels, decisions, confidence, source


def build_evaluation_report(
    test: pd.DataFrame,
    *,
    p_col: str = "p_roadwork",
    decision_col: str = "decision",
    confidence_col: str = "confidence",
    group_col: str = "group_id",
    policy_guarantee: dict | None = None,
    robustness: dict[int, pd.DataFrame] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    slice_columns: list[str] | None = None,
    min_slice_count: int = 30,
    level: float = 0.95,
) -> EvaluationReport:
    """Evaluate the released policy on the val_test predictions table (see module docstring)."""
    from roadwork_core.metrics import plots  # matplotlib, torchmetrics: imported on use, not by readers
    from roadwork_core.metrics.slices import slice_metrics

    p, labels, decisions, confidence, conf_source = _columns(
        test, p_col, decision_col, confidence_col, "test"
    )
    notes = []
    if conf_source != confidence_col:
        notes.append(f"no '{confidence_col}' column: risk-coverage ranks images by {conf_source}")

    # metrics with CIs: every statistic is resampled from the same seeded index draws, by
    # near-duplicate group when the table says which images belong together
    groups = test[group_col].to_numpy() if group_col in test.columns else None
    if groups is None:
        notes.append(f"no '{group_col}' column: the bootstrap resamples images, not near-duplicate groups")
    metrics = bootstrap_ci(
        point_metrics,
        p,
        labels,
        decisions,
        confidence,
        n_resamples=n_bootstrap,
        seed=seed,
        level=level,
        groups=groups,
    )
    n = len(test)
    metrics["n"] = {"value": n, "low": n, "high": n, "n_valid": n_bootstrap}

    correct = hard_label(p) == (labels == 1)
    rc = risk_coverage_table(confidence, correct)
    slices = slice_metrics(
        test, p_col, LABEL_COL, decision_col, columns=slice_columns, min_count=min_slice_count
    )

    rob_rows = []
    for lvl, table in sorted((robustness or {}).items()):
        arrays = _columns(table, p_col, decision_col, confidence_col, f"robustness level {lvl}")[:4]
        rob_rows.append({"level": int(lvl), "n": len(table), **point_metrics(*arrays)})
    rob = pd.DataFrame(rob_rows)

    figures = {
        "reliability": plots.reliability_diagram(p, labels),
        "risk_coverage": plots.risk_coverage_plot(confidence, correct),
    }
    if not slices.empty:
        figures["slices"] = plots.slice_bars(slices, "accuracy")
    if not rob.empty:
        figures["robustness"] = plots.robustness_plot(rob)

    return EvaluationReport(
        metrics=metrics,
        risk_coverage=rc,
        slices=slices,
        robustness=rob,
        plots=figures,
        guarantee_check=check_guarantee(decisions, labels, policy_guarantee),
        notes=notes,
        config={
            "p_col": p_col,
            "decision_col": decision_col,
            "confidence": conf_source,
            "n_bootstrap": n_bootstrap,
            "bootstrap_unit": group_col if groups is not None else "image",
            "bootstrap_n_units": int(np.unique(groups).size) if groups is not None else len(test),
            "seed": seed,
            "level": level,
            "min_slice_count": min_slice_count,
        },
    )


def distorted_predictions(
    images: Sequence[Any],
    labels: Sequence[int],
    predict_fn: Callable[[list[Any]], pd.DataFrame],
    distort_fn: Callable[[Any, int, int], Any],
    levels: Sequence[int] = (0, 1, 2, 3),
    seed: int = 0,
    chunk_size: int = 8,
) -> dict[int, pd.DataFrame]:
    """Per level: predict on every image distorted by `distort_fn(img, level, seed + i)`.

    `predict_fn(images)` returns one row per image with at least p_roadwork and decision (e.g.
    `Bundle.predict`); `label` and `level` are added. The result feeds `robustness=`.

    Images are taken `chunk_size` at a time (`images[i]`, so a lazy sequence decodes each once) and every
    level is predicted on a chunk before the next is read: memory holds one chunk of full-size images and
    their distorted copies, not the whole test split (12 MP photos: ~90 MB each). Each image's distortion
    depends on (level, seed + i) only, so the result does not depend on `chunk_size`.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels; pass one label per image")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    parts: dict[int, list[pd.DataFrame]] = {int(lvl): [] for lvl in levels}
    for start in range(0, len(images), chunk_size):
        chunk = [images[i] for i in range(start, min(len(images), start + chunk_size))]
        for lvl in parts:
            distorted = [distort_fn(img, lvl, seed + start + j) for j, img in enumerate(chunk)]
            table = pd.DataFrame(predict_fn(distorted)).reset_index(drop=True)
            if len(table) != len(chunk):
                raise ValueError(
                    f"predict_fn returned {len(table)} rows for {len(chunk)} images at level {lvl}"
                )
            parts[lvl].append(table)
            del distorted
        del chunk
    out = {}
    for lvl, tables in parts.items():
        table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(predict_fn([]))
        table[LABEL_COL] = np.asarray(labels)
        table["level"] = lvl
        out[lvl] = table
    return out


def _table_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "parquet":
        df.to_parquet(buf, index=False)
    else:
        buf.write(df.to_csv(index=False).encode("utf-8"))
    return buf.getvalue()


def write_report(report: EvaluationReport, out_dir: Path) -> dict[str, str]:
    """Write report.json, summary.md, tables (parquet + csv) and PNGs atomically; return name -> path."""
    from roadwork_core.metrics import plots

    out_dir = Path(out_dir)
    paths: dict[str, str] = {}
    paths["report.json"] = str(atomic_write_text(out_dir / "report.json", report.to_json()))
    paths["summary.md"] = str(atomic_write_text(out_dir / "summary.md", report.summary_markdown()))
    tables = {"risk_coverage": report.risk_coverage, "slices": report.slices, "robustness": report.robustness}
    for name, df in tables.items():
        for fmt in ("parquet", "csv"):
            fname = f"{name}.{fmt}"
            paths[fname] = str(atomic_write_bytes(out_dir / fname, _table_bytes(df, fmt)))
    for name, png in report.plots.items():
        fname = f"{name}.png"
        paths[fname] = str(plots.save_png(png, out_dir / fname))
    return paths


def read_report(out_dir: Path) -> EvaluationReport:
    """Load a report written by `write_report` (report.json plus the PNGs it lists)."""
    out_dir = Path(out_dir)
    path = out_dir / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write the report with write_report(report, {out_dir})")
    text = path.read_text(encoding="utf-8")
    names = json.loads(text).get("plots", [])
    missing = [n for n in names if not (out_dir / f"{n}.png").is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: report.json lists plots {missing} whose PNG files are missing")
    return EvaluationReport.from_json(text, {n: (out_dir / f"{n}.png").read_bytes() for n in names})
