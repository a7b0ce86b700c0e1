"""GPUResource: where and how the PyTorch core runs (device, precision, compile, threads, seeds)."""

from __future__ import annotations

import random
from typing import Literal

import dagster as dg
from pydantic import Field

from roadwork_core.config import Precision, precision_dtype


class GPUResource(dg.ConfigurableResource):
    """Compute settings handed to every training and inference asset.

    Assets that train (explora_backbone, classifier) also run in the Dagster pool `gpu`, so a
    queued run coordinator with a pool limit serializes them across runs. When a run starts this
    resource (before its first step claims a slot) it tags the run with its host and frees the pool
    slots of runs whose processes are gone (`roadwork_resources.pool_slots`): a killed run never
    blocks the pool for the next one, with or without the daemon.
    """

    device: Literal["auto", "cuda", "mps", "cpu"] = Field(
        "auto", description="auto picks cuda, then mps, then cpu"
    )
    precision: Precision = Field("fp32", description="fp16-mixed uses a gradient scaler and needs CUDA")
    compile: bool = Field(
        False,
        description="torch.compile (inductor) the classifier's training forward; the prediction assets and "
        "the bundle stay eager (their logits must match within 1e-4)",
    )
    attn_backend: Literal["sdpa", "flash_attn", "eager"] = Field("sdpa", description="attention kernel")
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0 keeps torch's default")
    seed: int = Field(0, description="seed for python, numpy and torch")
    deterministic: bool = Field(
        False,
        description="torch.use_deterministic_algorithms (strict: an op without a deterministic kernel raises) "
        "and cudnn flags, in every training process (torchrun ranks too); false: TF32 on CUDA for training",
    )
    nproc_per_node: int = Field(
        1,
        ge=1,
        description="training processes on this machine (one per GPU). 1: train in the asset's process; "
        ">1: explora_backbone and classifier train data-parallel (DDP) under torchrun, launched through Pipes",
    )
    nnodes: int = Field(1, ge=1, description="machines in a data-parallel job; the launching one is node 0")
    master_addr: str = Field(
        "127.0.0.1", description="multi-node: address of node 0 that the other nodes' torchrun reach"
    )
    master_port: int = Field(29500, description="multi-node: rendezvous port on node 0")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        from roadwork_resources.pool_slots import HOST_TAG, free_slots_of_dead_runs, this_host

        if (
            self.precision != "fp32"
            and self.device in ("cpu", "auto")
            and self.effective_precision() == "fp32"
        ):
            context.log.warning(
                f"GPUResource.precision is {self.precision!r} but the device is the CPU: running fp32 (fp16 needs "
                "CUDA; bf16 on CPU is slower than fp32 here). Set precision: fp32 to silence this"
            )
        instance, run = context.instance, context.dagster_run
        if instance is None or run is None:
            return  # built outside a run (direct invocation, tests)
        if run.tags.get(HOST_TAG) != this_host():
            instance.add_run_tags(run.run_id, {HOST_TAG: this_host()})
        free_slots_of_dead_runs(
            instance, f"run {run.run_id} at start", log=context.log.warning, exclude_run_id=run.run_id
        )

    def torch_device(self):
        import torch

        if self.device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                return torch.device("mps")
            return torch.device("cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "GPUResource.device is 'cuda' but torch sees no CUDA device; set device: auto or cpu"
            )
        if self.device == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(
                "GPUResource.device is 'mps' but MPS is not available; set device: auto or cpu"
            )
        return torch.device(self.device)

    def effective_precision(self) -> str:
        """fp16-mixed needs CUDA; bf16 on CPU is slow, so CPU falls back to fp32 with a clear rule."""
        device = self.torch_device()
        if device.type == "cpu" and self.precision != "fp32":
            return "fp32"
        return self.precision

    def autocast_dtype(self):
        return precision_dtype(self.effective_precision())

    def setup(self, seed_offset: int = 0) -> None:
        """Apply threads, seeds and determinism flags to this process; call at the start of an asset."""
        import numpy as np
        import torch

        from roadwork_core.config import apply_torch_flags

        apply_torch_flags(threads=self.threads, deterministic=self.deterministic)
        seed = self.seed + seed_offset
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    @property
    def data_parallel(self) -> bool:
        """More than one training process asked for: the training assets launch torchrun."""
        return self.nproc_per_node * self.nnodes > 1

    def torchrun_args(self) -> list[str]:
        """torchrun's process and rendezvous options: standalone on one node (a free local port),
        static rendezvous at master_addr:master_port as node 0 of `nnodes` otherwise."""
        if self.nnodes == 1:
            return ["--standalone", f"--nproc-per-node={self.nproc_per_node}"]
        return [
            f"--nnodes={self.nnodes}",
            "--node-rank=0",
            f"--nproc-per-node={self.nproc_per_node}",
            f"--master-addr={self.master_addr}",
            f"--master-port={self.master_port}",
        ]

    def describe(self) -> dict:
        return {
            "device": str(self.torch_device()),
            "precision": self.effective_precision(),
            "compile": self.compile,
            "attn_backend": self.attn_backend,
            "threads": self.threads,
            "seed": self.seed,
            "deterministic": self.deterministic,
            "nproc_per_node": self.nproc_per_node,
            "nnodes": self.nnodes,
        }
