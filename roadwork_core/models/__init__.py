"""Model core: timm backbone factory, multi-view extraction, aggregators, the roadwork classifier.

PEFT adapters live in `roadwork_core.models.adapters` (imported on demand: peft is a heavy import).
"""

from roadwork_core.models.aggregators import AGGREGATORS, create_aggregator
from roadwork_core.models.backbone import (
    PRESETS,
    BackboneConfig,
    backbone_data_config,
    create_backbone,
    state_dict_sha256,
)
from roadwork_core.models.classifier import RoadworkClassifier, build_classifier, classifier_config_dict
from roadwork_core.models.multiview import (
    MultiViewConfig,
    extract_views,
    num_views,
    resolve_canvas_size,
    tile_boxes,
)
from roadwork_core.models.predict import predict_frame, uncertainty_features

__all__ = [
    "AGGREGATORS",
    "PRESETS",
    "BackboneConfig",
    "MultiViewConfig",
    "RoadworkClassifier",
    "backbone_data_config",
    "build_classifier",
    "classifier_config_dict",
    "create_aggregator",
    "create_backbone",
    "extract_views",
    "num_views",
    "predict_frame",
    "resolve_canvas_size",
    "state_dict_sha256",
    "tile_boxes",
    "uncertainty_features",
]
