"""Training: the supervised loop (head / lora / dora / full), its feature cache and checkpoints.

The names below resolve on first use: importing a submodule (`roadwork_core.training.explora`, the
ExPLoRA ranks of a data-parallel step) runs this file first, and the supervised loop's torchmetrics
(with the scipy, matplotlib and transformers it imports) costs ~3 s of a process that never uses it."""

from importlib import import_module

_LAZY = {
    "FeatureCache": "roadwork_core.training.feature_cache",
    "TrainConfig": "roadwork_core.training.supervised",
    "TrainResult": "roadwork_core.training.supervised",
    "train_classifier": "roadwork_core.training.supervised",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
