"""Training jobs handed from the launching process to torchrun's ranks: written once, read by each.

A job is a directory: `job.json` (kind, configs, where to checkpoint and where rank 0 writes the
result), the initial weights (safetensors, through the model's own serialization) and the inputs
(parquet rows or a URI list). Every rank rebuilds exactly the model the launcher built, so one and
N processes start from the same weights. `run_job` trains; rank 0 alone writes the outputs:

  classifier: `out_dir` receives the classifier directory (save_classifier); job_dir/result.json the summary
  explora:    job_dir/backbone.safetensors (merged weights); job_dir/result.json the report
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from roadwork_core.io import atomic_write_text
from roadwork_core.training.distributed import World

__all__ = ["JOB_FILE", "read_result", "run_job", "write_classifier_job", "write_explora_job"]

JOB_FILE = "job.json"
RESULT_FILE = "result.json"
EXPLORA_WEIGHTS_FILE = "backbone.safetensors"  # the explora job's merged weights, written by rank 0


def write_classifier_job(
    job_dir: Path,
    model: nn.Module,
    train_rows: pd.DataFrame,
    select_rows: pd.DataFrame,
    cfg: Any,  # TrainConfig
    *,
    precision: str,
    checkpoint_dir: Path,
    feature_cache_dir: Path | None,
    out_dir: Path,
    compile_backend: str | None = None,
) -> Path:
    from roadwork_core.models.serialization import save_classifier

    job_dir = Path(job_dir)
    save_classifier(job_dir / "init", model)
    train_rows[["image_id", "uri", "label"]].to_parquet(job_dir / "train.parquet")
    select_rows[["image_id", "uri", "label"]].to_parquet(job_dir / "select.parquet")
    job = {
        "kind": "classifier",
        "train": dataclasses.asdict(cfg),
        "precision": precision,
        "checkpoint_dir": str(checkpoint_dir),
        "feature_cache_dir": None if feature_cache_dir is None else str(feature_cache_dir),
        "out_dir": str(out_dir),
        "compile_backend": compile_backend,
    }
    atomic_write_text(job_dir / JOB_FILE, json.dumps(job, indent=2))
    return job_dir


def write_explora_job(
    job_dir: Path,
    backbone: nn.Module,
    backbone_cfg: dict,
    uris: list[str],
    cfg: Any,
    checkpoint_dir: Path | None = None,
    precision: str = "fp32",
) -> Path:
    """An explora job; with `checkpoint_dir`, rank 0 checkpoints every finished epoch there and a rerun of
    the same job resumes from it (as `run_explora` does in one process)."""
    job_dir = Path(job_dir)
    save_file(
        {k: v.detach().contiguous() for k, v in backbone.state_dict().items()},
        str(job_dir / "base.safetensors"),
    )
    job = {
        "kind": "explora",
        "backbone": {**backbone_cfg, "pretrained": False, "weights_file": None},  # weights: base.safetensors
        "explora": cfg.to_dict(),
        "uris": list(uris),
        "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
        "precision": precision,
    }
    atomic_write_text(job_dir / JOB_FILE, json.dumps(job, indent=2))
    return job_dir


def read_result(job_dir: Path) -> dict:
    path = Path(job_dir) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} missing: rank 0 of the data-parallel job did not finish writing its result"
        )
    return json.loads(path.read_text())


def read_explora_weights(job_dir: Path) -> dict[str, torch.Tensor]:
    """The merged weights an explora job's rank 0 wrote (read after `read_result` succeeded)."""
    return load_file(str(Path(job_dir) / EXPLORA_WEIGHTS_FILE))


def _run_classifier(job: dict, job_dir: Path, world: World, device: torch.device, on_record) -> dict:
    from roadwork_core.models.serialization import load_classifier, save_classifier
    from roadwork_core.training.supervised import TrainConfig, train_classifier

    model = load_classifier(job_dir / "init")
    cfg = TrainConfig(**job["train"])
    result = train_classifier(
        model,
        pd.read_parquet(job_dir / "train.parquet"),
        pd.read_parquet(job_dir / "select.parquet"),
        cfg,
        device=device,
        precision=job["precision"],
        checkpoint_dir=Path(job["checkpoint_dir"]),
        feature_cache_dir=None if job["feature_cache_dir"] is None else Path(job["feature_cache_dir"]),
        on_epoch=on_record,
        compile_backend=job.get("compile_backend"),
    )
    summary = {
        "best_epoch": result.best_epoch,
        "best_select_mcc": result.best_select_mcc,
        "history": result.history,
        "resumed_from_epoch": result.resumed_from_epoch,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "world_size": world.world_size,
    }
    if world.is_main:
        out = Path(job["out_dir"])
        save_classifier(
            out, model, result.state_dict, extra={"train": job["train"], "history": result.history}
        )
        atomic_write_text(job_dir / RESULT_FILE, json.dumps(summary, default=str))
    return summary


def _run_explora(job: dict, job_dir: Path, world: World, device: torch.device, on_record) -> dict:
    from roadwork_core.models.backbone import BackboneConfig, create_backbone
    from roadwork_core.training.explora import ExploraConfig, run_explora

    backbone = create_backbone(BackboneConfig(**job["backbone"]))
    backbone.load_state_dict(load_file(str(job_dir / "base.safetensors")))
    checkpoint_dir = job.get("checkpoint_dir")
    result = run_explora(
        backbone,
        job["uris"],
        ExploraConfig(**job["explora"]),
        device=device,
        on_step=on_record,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        precision=job.get("precision", "fp32"),
    )
    report = {**result.report, "world_size": world.world_size}
    if world.is_main:
        weights = {k: v.contiguous() for k, v in result.state_dict.items()}
        save_file(weights, str(job_dir / EXPLORA_WEIGHTS_FILE))  # job_dir is the launcher's scratch
        atomic_write_text(job_dir / RESULT_FILE, json.dumps(report, default=str))
    return report


_KINDS: dict[str, Callable[..., dict]] = {"classifier": _run_classifier, "explora": _run_explora}


def run_job(
    job_dir: Path, world: World, device: torch.device, on_record: Callable[[dict], None] | None = None
) -> dict:
    """Train the job in `job_dir` as this rank; `on_record` gets each epoch (classifier) / step (explora) row."""
    job_dir = Path(job_dir)
    job = json.loads((job_dir / JOB_FILE).read_text())
    if job.get("kind") not in _KINDS:
        raise ValueError(f"{job_dir / JOB_FILE}: kind {job.get('kind')!r} is not one of {sorted(_KINDS)}")
    return _KINDS[job["kind"]](job, job_dir, world, device, on_record)
