"""Training checkpoints: safetensors for every tensor, JSON for everything else, atomic writes, no pickle.

`<dir>/last.safetensors`  model.* (training-time keys, adapters unmerged), ema.*, optim.<param>.<name>;
                          its metadata["state"] is the run state JSON, so weights and state are
                          committed together by one atomic rename.
`<dir>/state.json`        a readable copy of that state (epoch finished, best epoch / MCC, history,
                          config, fingerprint, optimizer hyper-parameters); written after last.
`<dir>/best.safetensors`  model weights (EMA when enabled) of the best epoch; metadata["epoch"].
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from roadwork_core.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "Checkpoint",
    "epoch_seed",
    "load_best",
    "load_checkpoint",
    "optimizer_state_from_tensors",
    "optimizer_state_to_tensors",
    "save_best",
    "save_checkpoint",
]

LAST, BEST, STATE = "last.safetensors", "best.safetensors", "state.json"


def epoch_seed(seed: int, epoch: int) -> int:
    """The RNG seed of one epoch: a resumed run replays exactly the shuffles / augmentations it missed."""
    return int(hashlib.sha256(f"{seed}:{epoch}".encode()).hexdigest()[:8], 16)


@dataclass
class Checkpoint:
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any]  # ready for optimizer.load_state_dict
    state: dict[str, Any]  # the run state JSON


def _plain(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    return {f"{prefix}{k}": v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name): stored in a checkpoint's
    metadata and checked on load, so a bit flipped at rest is found instead of resumed and shipped."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu")
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _verify(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], ckpt_dir: Path) -> None:
    expected = metadata.get("sha256")
    if (
        expected is not None and tensors_sha256(tensors) != expected
    ):  # checkpoints before the digest: unchecked
        raise ValueError(
            f"checkpoint {path} does not match the sha256 written with it: its bytes changed at rest (disk "
            f"error, an edit by hand), so resuming would train on, and ship, damaged weights; delete {ckpt_dir} "
            "to start the run from scratch"
        )


def optimizer_state_to_tensors(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """optimizer.state_dict() -> (tensors keyed `optim.<param id>.<name>`, JSON-able remainder)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, per_param in opt_state["state"].items():
        scalars[str(pid)] = {}
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars[str(pid)][name] = value
    return _plain(tensors, ""), {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(values) for pid, values in meta["scalars"].items()}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    ckpt_dir: str | Path,
    *,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write last.safetensors (tensors + state in its metadata), then state.json. Both atomic."""
    ckpt_dir = Path(ckpt_dir)
    optim_tensors, optim_meta = optimizer_state_to_tensors(optimizer_state)
    tensors = {**_plain(model_state, "model."), **optim_tensors}
    if ema_state is not None:
        tensors.update(_plain(ema_state, "ema."))
    full_state = {**state, "optimizer": optim_meta, "has_ema": ema_state is not None}
    text = json.dumps(full_state, sort_keys=True)
    metadata = {"state": text, "sha256": tensors_sha256(tensors)}
    path = atomic_write_bytes(ckpt_dir / LAST, safetensors.torch.save(tensors, metadata=metadata))
    atomic_write_text(ckpt_dir / STATE, json.dumps(full_state, indent=2, sort_keys=True))
    return path


def load_checkpoint(ckpt_dir: str | Path) -> Checkpoint | None:
    """The last finished epoch's checkpoint, or None when `ckpt_dir` has none."""
    path = Path(ckpt_dir) / LAST
    if not path.exists():
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = safetensors.torch.load_file(str(path))
        state = json.loads(metadata["state"])
    except Exception as exc:
        raise ValueError(
            f"checkpoint {path} is unreadable ({exc}); delete {Path(ckpt_dir)} to start the run from scratch"
        ) from exc
    _verify(path, tensors, metadata, Path(ckpt_dir))
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")}
    optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    return Checkpoint(
        model_state=model,
        ema_state=ema if state.get("has_ema") else None,
        optimizer_state=optimizer_state_from_tensors(optim, state["optimizer"]),
        state=state,
    )


def save_best(ckpt_dir: str | Path, model_state: dict[str, torch.Tensor], epoch: int) -> Path:
    tensors = _plain(model_state, "")
    data = safetensors.torch.save(tensors, metadata={"epoch": str(epoch), "sha256": tensors_sha256(tensors)})
    return atomic_write_bytes(Path(ckpt_dir) / BEST, data)


def load_best(ckpt_dir: str | Path, expected_epoch: int) -> dict[str, torch.Tensor]:
    """best.safetensors, checked to come from `expected_epoch` (the run state's best epoch)."""
    path = Path(ckpt_dir) / BEST
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; delete {Path(ckpt_dir)} and rerun the training")
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    epoch = int(metadata.get("epoch", -1))
    if epoch != expected_epoch:
        raise ValueError(
            f"{path} holds epoch {epoch} but the run state says the best epoch is {expected_epoch} "
            f"(a crash between the two writes); delete {Path(ckpt_dir)} and rerun the training"
        )
    tensors = safetensors.torch.load_file(str(path))
    _verify(path, tensors, metadata, Path(ckpt_dir))
    return tensors
