"""One rank of data-parallel training, started by torchrun from a training asset through Dagster Pipes.

    python -m torch.distributed.run --nproc-per-node N -m roadwork_assets.torchrun_worker --job <dir> --device cpu

Rank 0 on the launching node opens the Pipes session (the asset's PipesSubprocessClient put its
bootstrap variables in the environment): its log lines appear in the asset's event log as they
happen, and each epoch / step row comes back as a custom message the asset logs to MLflow. Every
rank trains (roadwork_core.training.ddp_jobs.run_job); rank 0 alone writes the checkpoints and the
result. Without Pipes variables (other nodes of a multi-node job, or a run by hand) it logs to stderr.
Imports dagster_pipes only (the light client library), not dagster.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from roadwork_core.config import apply_torch_flags
from roadwork_core.training.ddp_jobs import run_job
from roadwork_core.training.distributed import init_world


def _pipes(is_main: bool):
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    if is_main and PipesEnvVarParamsLoader().is_dagster_pipes_process():
        return open_dagster_pipes()
    return contextlib.nullcontext(None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--job", type=Path, required=True, help="job directory (roadwork_core.training.ddp_jobs)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads per rank; 0: torch's default"
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="the gpu resource's deterministic: strict deterministic algorithms (else TF32 on CUDA)",
    )
    args = parser.parse_args(argv)

    apply_torch_flags(threads=args.threads, deterministic=args.deterministic)  # before any CUDA call
    world = init_world(args.device)
    device = torch.device("cuda", world.local_rank) if args.device == "cuda" else torch.device("cpu")
    logging.basicConfig(level=logging.INFO, format=f"[rank {world.rank}] %(levelname)s %(name)s: %(message)s")
    try:
        with _pipes(world.is_main) as pipes:
            log = pipes.log if pipes is not None else logging.getLogger("roadwork.torchrun")

            def on_record(row: dict) -> None:
                if pipes is not None:
                    pipes.report_custom_message({"record": row})
                if "epoch" in row:
                    log.info(
                        f"epoch {row['epoch']}: "
                        + ", ".join(f"{k}={v}" for k, v in row.items() if k != "epoch")
                    )

            log.info(
                f"data-parallel training: {world.world_size} processes, {device}, job {args.job}, torch "
                f"threads {torch.get_num_threads()}, deterministic algorithms "
                f"{'on' if torch.are_deterministic_algorithms_enabled() else 'off'}"
            )
            run_job(args.job, world, device, on_record if world.is_main else None)
            log.info(f"rank {world.rank} done")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
