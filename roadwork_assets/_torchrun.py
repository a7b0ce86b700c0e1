"""Launch data-parallel training from a training asset: torchrun through Dagster Pipes.

The asset writes a job (roadwork_core.training.ddp_jobs), this module runs
`python -m torch.distributed.run <gpu.torchrun_args()> -m roadwork_assets.torchrun_worker --job <dir>`
with PipesSubprocessClient: rank 0's log lines stream into the step's event log, its per-epoch /
per-step rows come back as custom messages (handed to `on_record`, e.g. for MLflow), and rank 0's
result file is read back. A failed rank fails the step with what to do next.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from roadwork_core.training.ddp_jobs import read_result
from roadwork_resources.gpu import GPUResource


def torchrun_command(gpu: GPUResource, job_dir: Path) -> list[str]:
    device = gpu.torch_device().type
    if device not in ("cpu", "cuda"):
        raise ValueError(
            f"data-parallel training runs on cuda (nccl) or cpu (gloo), not {device}; set gpu.device"
        )
    # --log-dir: torchrun's per-run folders go into the job directory (removed with it), not into a
    # torchelastic_* folder under $TMPDIR that nothing removes
    return [
        sys.executable, "-m", "torch.distributed.run", *gpu.torchrun_args(),
        f"--log-dir={Path(job_dir) / 'torchrun_logs'}",
        "-m", "roadwork_assets.torchrun_worker", "--job", str(job_dir), "--device", device,
        "--threads", str(gpu.threads), *(["--deterministic"] if gpu.deterministic else []),
    ]  # fmt: skip


def _finished_epoch(checkpoint_dir: Path | None) -> str:
    state = None if checkpoint_dir is None else Path(checkpoint_dir) / "state.json"
    if state is None or not state.is_file():
        return "no checkpoint was written yet, so a rerun starts from the beginning"
    epoch = json.loads(state.read_text()).get("epoch")
    return f"{checkpoint_dir} holds finished epoch {epoch}: rerunning the step resumes from it"


def train_data_parallel(
    context: dg.AssetExecutionContext,
    gpu: GPUResource,
    job_dir: Path,
    *,
    on_record: Callable[[dict], None] | None = None,
    checkpoint_dir: Path | None = None,
) -> dict:
    """Run the job on gpu.nproc_per_node x gpu.nnodes processes; return rank 0's result summary."""
    command = torchrun_command(gpu, job_dir)
    world = gpu.nproc_per_node * gpu.nnodes
    context.log.info(f"data-parallel training on {world} processes: {' '.join(command)}")
    if gpu.nnodes > 1:  # the other nodes are started by the cluster (e.g. an indexed Job), not by this step
        others = " ".join(command).replace("--node-rank=0", "--node-rank=<1..N-1>")
        context.log.info(f"start nodes 1..{gpu.nnodes - 1} with: {others} (the job directory must be shared)")
    try:
        invocation = dg.PipesSubprocessClient().run(context=context, command=command)
    except Exception as exc:  # torchrun's non-zero exit (DagsterPipesExecutionError, not exported) or a
        # Pipes failure; a cancelled run raises an interrupt (BaseException) that passes through
        raise RuntimeError(
            f"data-parallel training ({world} processes under torchrun) failed: {exc}. A rank died or raised; "
            f"its traceback, or torchrun's report naming the failed rank and its exit code or signal, is in "
            f"this step's stderr. {_finished_epoch(checkpoint_dir)}."
        ) from exc
    for message in invocation.get_custom_messages():
        if on_record is not None and isinstance(message, dict) and "record" in message:
            on_record(message["record"])
    return read_result(job_dir)
