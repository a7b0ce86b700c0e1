"""Training: the supervised loop (head / lora / dora / full), its feature cache and checkpoints."""

from roadwork_core.training.feature_cache import FeatureCache
from roadwork_core.training.supervised import TrainConfig, TrainResult, train_classifier

__all__ = ["FeatureCache", "TrainConfig", "TrainResult", "train_classifier"]
