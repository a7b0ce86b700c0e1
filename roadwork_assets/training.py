"""Training stage: explora_backbone -> classifier. Both run in the Dagster pool `gpu`."""

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pandas as pd
from pydantic import Field

from roadwork_assets._config import config_from
from roadwork_assets._util import json_meta, md_table, reader_metadata
from roadwork_assets.data import require_green_splits
from roadwork_assets.partitions import dataset_version
from roadwork_core.config import (
    BackboneConfig,
    ExploraConfig,
    HeadConfig,
    MultiViewConfig,
    TrainConfig,
    from_mapping,
)
from roadwork_core.contracts import SPLIT_CONTRACT, Split, SplitReader
from roadwork_core.io import atomic_write_bytes
from roadwork_resources.artifact_store import ArtifactStore
from roadwork_resources.dataset import DatasetSource
from roadwork_resources.gpu import GPUResource
from roadwork_resources.io_manager import new_artifact_dir
from roadwork_resources.mlflow_tracking import MLFLOW_HOOKS, MlflowParam, log_metrics, log_params
from roadwork_resources.settings import SplitSettings

BackboneSettings = config_from("BackboneSettings", BackboneConfig, exclude=("attn_backend", "model_kwargs"))

ExploraSettings = config_from(
    "ExploraSettings",
    ExploraConfig,
    exclude=("seed",),  # GPUResource.seed
    extra={
        "backbone": (BackboneSettings, Field(BackboneSettings(), description="the backbone to adapt")),
        "max_images": (
            int | None,
            Field(
                None,
                description="cap on images per epoch: the train split first, then the unlabelled pool",
            ),
        ),
        "use_unlabelled": (
            bool,
            Field(True, description="add the drops' unlabelled/ folders to the train split"),
        ),
    },
    doc="explora_backbone: ExploraConfig's knobs plus the backbone and the image pool.",
)


def _backbone_config(settings, attn_backend: str) -> BackboneConfig:
    return from_mapping(BackboneConfig, settings.model_dump(), attn_backend=attn_backend)


@dg.asset(
    partitions_def=dataset_version,
    group_name="training",
    pool="gpu",
    kinds={"pytorch", "safetensors"},
    hooks=MLFLOW_HOOKS,
    description="Backbone weights after ExPLoRA extended self-supervised pretraining on train + unlabelled images "
    "(or the base weights when disabled).",
)
def explora_backbone(
    context: dg.AssetExecutionContext,
    mlflow: MlflowParam,
    config: ExploraSettings,
    gpu: GPUResource,
    dataset: DatasetSource,
    split_settings: SplitSettings,
    store: ArtifactStore,
    splits: pd.DataFrame,
) -> dg.Output[Path]:
    from roadwork_core.models.backbone import create_backbone, require_whole_patches, state_dict_sha256
    from roadwork_core.models.serialization import save_backbone
    from roadwork_core.training.explora import run_explora

    gpu.setup()
    require_green_splits(context)
    reader = SplitReader("explora_backbone", splits)
    uris, pool, rejects_path, pool_used = _explora_images(
        context, config, dataset, split_settings, store, reader
    )
    backbone_cfg = _backbone_config(config.backbone, gpu.attn_backend)
    backbone = create_backbone(backbone_cfg)  # random init is seeded by gpu.setup(): reproducible
    require_whole_patches(backbone_cfg, backbone)
    base_sha256 = state_dict_sha256(backbone)
    cfg = from_mapping(ExploraConfig, config.model_dump(), seed=gpu.seed)
    log_params(mlflow, {"run_config": context.run.run_config, "explora": config.model_dump()})
    on_step = _explora_step_logger(context, mlflow, config.epochs * math.ceil(len(uris) / config.batch_size))

    if gpu.data_parallel and config.enabled:  # torchrun + DDP through Pipes; rank 0 writes the weights
        result = _explora_data_parallel(
            context, gpu, backbone, backbone_cfg, uris, cfg, on_step,
            checkpoint_dir=store.checkpoint_dir("explora_backbone", context.partition_key),
        )  # fmt: skip
    else:
        result = run_explora(
            backbone,
            uris,
            cfg,
            device=gpu.torch_device(),
            on_step=on_step,
            checkpoint_dir=store.checkpoint_dir("explora_backbone", context.partition_key),
            precision=gpu.effective_precision(),
        )
    report = {**result.report, "enabled": config.enabled, "unlabelled_images": pool_used}
    out = new_artifact_dir("explora_backbone")
    save_backbone(out, result.state_dict, backbone_cfg, seed=gpu.seed, base_sha256=base_sha256, report=report)
    return dg.Output(out, metadata=_explora_metadata(config, report, pool, rejects_path, reader, pool_used))


def _explora_images(context, config, dataset: DatasetSource, split_settings, store: ArtifactStore, reader):
    """The train split's images + the drops' unlabelled pool (near-copies of evaluation images removed,
    listed in the side file pool_rejects.parquet), cut to max_images, train first (`cap_explora_images`).
    (uris, pool, rejects path, pool images among the uris)."""
    from roadwork_core.data.drops import list_unlabelled
    from roadwork_core.data.pool import cap_explora_images, filter_unlabelled_pool

    train = reader.read(Split.TRAIN)
    uris = list(train["uri"])
    unlabelled: list[str] = []
    if config.use_unlabelled:
        for drop in dataset.drops_for_version(context.partition_key):
            unlabelled += list_unlabelled(drop)
    # near-copies of evaluation images must not enter self-supervised training
    others = sorted(SPLIT_CONTRACT["explora_backbone"].hashes_of)
    reference = pd.concat([reader.read_phashes(s) for s in others], ignore_index=True)
    pool = filter_unlabelled_pool(unlabelled, reference, radius=split_settings.radius)
    rejects_path = store.side_dir("explora_backbone", context.partition_key) / "pool_rejects.parquet"
    atomic_write_bytes(rejects_path, pool.dropped.to_parquet(index=False))
    if len(pool.dropped):
        context.log.warning(f"{len(pool.dropped)} unlabelled images dropped; see {rejects_path}")
    uris, pool_used = cap_explora_images(uris, pool.kept, config.max_images)
    if pool_used < len(pool.kept):
        context.log.warning(
            f"max_images = {config.max_images} keeps {pool_used} of the {len(pool.kept)} unlabelled pool "
            f"images (the train split's {len(train)} come first); raise explora_backbone.max_images or set "
            "it to null to adapt on the whole pool"
        )
    return uris, pool, rejects_path, pool_used


def _explora_step_logger(context, mlflow: MlflowParam, total_steps: int) -> Callable[[dict], None]:
    """on_step for run_explora: every step to MLflow, a progress line at most every ~10 s to the run log."""
    from roadwork_core.progress import ProgressClock

    clock = ProgressClock(total=total_steps)  # the loop's steps
    last_line = [clock.start]

    def on_step(row: dict) -> None:
        log_metrics(mlflow, {f"explora_{k}": v for k, v in row.items() if k != "step"}, row.get("step"))
        done, now = int(row["step"]) + 1, time.perf_counter()
        if now - last_line[0] >= 10.0 or done in (1, clock.total):  # a line at most every ~10 s
            last_line[0] = now
            context.log.info(
                f"ExPLoRA step {done}/{clock.total}: DINO loss {row['loss']:.3f}, {clock.describe(done)}"
            )

    return on_step


def _explora_metadata(
    config, report: dict, pool, rejects_path: Path, reader: SplitReader, pool_used: int
) -> dict:
    from roadwork_core.metrics.embed import markdown_images
    from roadwork_core.metrics.stage_plots import ssl_loss_curve

    meta = {
        "enabled": config.enabled,
        "note": "ExPLoRA ran"
        if config.enabled
        else "ExPLoRA disabled: base weights passed through unchanged",
        "backbone": config.backbone.name,
        "images_used": report.get("images_used", 0),
        "unlabelled_kept": len(pool.kept),
        "unlabelled_used": pool_used,  # of the kept ones, in the (max_images-capped) epoch
        "unlabelled_dropped": len(pool.dropped),
        "unlabelled_dropped_list": md_table(pool.dropped),
        "pool_rejects_path": dg.MetadataValue.path(str(rejects_path)),
        **reader_metadata(reader),
    }
    if config.enabled:
        meta |= {
            "trainable_params": int(report["trainable_params"]),
            "trainable_pct": float(report["trainable_pct"]),
            "blocks_unfrozen": json_meta(report.get("blocks_unfrozen")),
            "lora_rank": int(report.get("rank", config.lora_rank)),
            "epochs": int(report["epochs"]),
            "resumed_from_epoch": -1
            if report["resumed_from_epoch"] is None
            else int(report["resumed_from_epoch"]),
            "final_ssl_loss": float(report["loss_curve"][-1]) if report.get("loss_curve") else float("nan"),
            "ssl_loss_curve": json_meta([round(float(x), 5) for x in report.get("loss_curve", [])]),
        }
        if report.get("loss_curve"):
            meta["ssl_loss_plot"] = dg.MetadataValue.md(
                markdown_images([("ExPLoRA SSL loss", ssl_loss_curve(report["loss_curve"]))])
            )
    return meta


ClassifierSettings = config_from(
    "ClassifierSettings",
    TrainConfig,
    MultiViewConfig,
    HeadConfig,
    exclude=("seed",),  # GPUResource.seed
    doc="classifier: TrainConfig's, MultiViewConfig's and HeadConfig's knobs.",
)


@dg.asset(
    partitions_def=dataset_version,
    group_name="training",
    pool="gpu",
    kinds={"pytorch", "safetensors"},
    hooks=MLFLOW_HOOKS,
    description="Backbone (+adapters) + head + aggregator trained on train, selected on val_select MCC.",
)
def classifier(
    context: dg.AssetExecutionContext,
    mlflow: MlflowParam,
    config: ClassifierSettings,
    gpu: GPUResource,
    store: ArtifactStore,
    splits: pd.DataFrame,
    explora_backbone: Path,
) -> dg.Output[Path]:
    from roadwork_core.models.classifier import build_classifier
    from roadwork_core.models.serialization import load_backbone, save_classifier
    from roadwork_core.progress import BatchProgress
    from roadwork_core.training.supervised import train_classifier

    gpu.setup()
    require_green_splits(context)
    reader = SplitReader("classifier", splits)
    train, select = reader.read(Split.TRAIN), reader.read(Split.VAL_SELECT)
    saved = load_backbone(explora_backbone)
    values = config.model_dump()
    mv, head = from_mapping(MultiViewConfig, values), from_mapping(HeadConfig, values)
    model = build_classifier(saved.backbone_cfg, mv, **dataclasses.asdict(head))
    model.backbone.load_state_dict(saved.state_dict)
    train_cfg = from_mapping(TrainConfig, values, seed=gpu.seed)
    log_params(
        mlflow,
        {"run_config": context.run.run_config, "classifier": config.model_dump(), "gpu": gpu.describe()},
    )

    out = new_artifact_dir("classifier")
    places = {
        "precision": gpu.effective_precision(),
        "checkpoint_dir": store.checkpoint_dir("classifier", context.partition_key),
        "feature_cache_dir": store.feature_cache_dir(),
        "compile_backend": "inductor" if gpu.compile else None,  # the training forward
    }
    if gpu.data_parallel:  # torchrun + DDP through Pipes; rank 0 writes checkpoints and `out`
        result = _classifier_data_parallel(context, gpu, model, train, select, train_cfg, places, out, mlflow)
    else:
        progress = _EpochProgress(context, mlflow, config.epochs)
        with BatchProgress(model, math.ceil(len(train) / config.batch_size), progress.on_batch) as batches:
            progress.batches = batches
            result = train_classifier(
                model,
                train,
                select,
                train_cfg,
                device=gpu.torch_device(),
                on_epoch=progress.on_epoch,
                **places,
            )
        save_classifier(
            out, model, result.state_dict, extra={"train": train_cfg.__dict__, "history": result.history}
        )
    return dg.Output(out, metadata=_classifier_metadata(config, result, reader))


class _EpochProgress:
    """train_classifier's callbacks: a run-log line and MLflow metrics per epoch, a line per batch."""

    def __init__(self, context, mlflow: MlflowParam, epochs: int) -> None:
        from roadwork_core.progress import ProgressClock

        self.context, self.mlflow, self.epochs = context, mlflow, epochs
        self.clock, self.done = ProgressClock(total=epochs), 0  # epochs this process ran (resume: fewer)
        self.batches = None  # the BatchProgress while training runs

    def on_epoch(self, row: dict) -> None:
        from roadwork_core.progress import epoch_line

        self.done += 1
        self.batches.epoch_done()
        self.clock.total = self.epochs - int(row["epoch"]) + self.done
        self.context.log.info(epoch_line(row, self.epochs, self.clock.describe(self.done)))
        log_metrics(self.mlflow, {k: v for k, v in row.items() if k != "epoch"}, row.get("epoch"))

    def on_batch(
        self, batch: int, of: int
    ) -> None:  # the demo's heartbeat shows these; one line per epoch stays
        self.context.log.info(
            f"batch {batch}/{of} of epoch {self.done + 1}/{self.epochs}, "
            f"{self.clock.describe(self.done + batch / of)}"
        )


def _classifier_metadata(config, result, reader: SplitReader) -> dict:
    from roadwork_core.metrics.embed import markdown_images
    from roadwork_core.metrics.stage_plots import training_curves

    times = [h.get("seconds", float("nan")) for h in result.history]
    meta = {
        "mode": config.mode,
        "best_epoch": result.best_epoch,
        "best_select_mcc": float(result.best_select_mcc),
        "epochs_run": len(result.history),
        "resumed_from_epoch": result.resumed_from_epoch if result.resumed_from_epoch is not None else -1,
        "trainable_params": int(result.trainable_params),
        "total_params": int(result.total_params),
        "epoch_seconds": json_meta([round(float(t), 3) for t in times]),
        "history": json_meta(result.history),
        "training_curves": dg.MetadataValue.md(
            markdown_images([("training curves", training_curves(result.history, result.best_epoch))])
        )
        if result.history
        else dg.MetadataValue.md("_(no epochs run)_"),
        **reader_metadata(reader),
    }
    if config.mode == "head" and len(times) > 1:
        later = sorted(times[1:])[len(times[1:]) // 2]
        meta["cache_speedup_first_vs_later_epochs"] = float(times[0] / max(later, 1e-9))
    return meta


# ---------------------------------------------------------------- data-parallel launches (gpu.nproc_per_node > 1)


def _explora_data_parallel(
    context, gpu: GPUResource, backbone, backbone_cfg, uris, cfg, on_step, checkpoint_dir: Path
):
    import tempfile

    from roadwork_assets._torchrun import train_data_parallel
    from roadwork_core.training.ddp_jobs import read_explora_weights, write_explora_job
    from roadwork_core.training.explora import ExploraResult

    with tempfile.TemporaryDirectory(prefix="roadwork-ddp-explora-") as tmp:
        job = write_explora_job(
            Path(tmp), backbone, backbone_cfg.__dict__, uris, cfg, checkpoint_dir, gpu.effective_precision()
        )
        report = train_data_parallel(context, gpu, job, on_record=on_step, checkpoint_dir=checkpoint_dir)
        return ExploraResult(state_dict=read_explora_weights(job), report=report)


def _classifier_data_parallel(
    context, gpu: GPUResource, model, train, select, train_cfg, places, out, mlflow
):
    import tempfile

    from roadwork_assets._torchrun import train_data_parallel
    from roadwork_core.training.ddp_jobs import write_classifier_job
    from roadwork_core.training.supervised import TrainResult

    def on_record(row: dict) -> None:  # rank 0 already logged the epoch into the event log
        log_metrics(mlflow, {k: v for k, v in row.items() if k != "epoch"}, row.get("epoch"))

    with tempfile.TemporaryDirectory(prefix="roadwork-ddp-classifier-") as tmp:
        job = write_classifier_job(Path(tmp), model, train, select, train_cfg, out_dir=out, **places)
        summary = train_data_parallel(
            context, gpu, job, on_record=on_record, checkpoint_dir=places["checkpoint_dir"]
        )
    fields = (
        "best_epoch",
        "best_select_mcc",
        "history",
        "resumed_from_epoch",
        "trainable_params",
        "total_params",
    )
    return TrainResult(state_dict={}, **{k: summary[k] for k in fields})
