"""The release bundle: export, load with integrity checks, predict, ONNX export."""

from roadwork_core.bundle.bundle import (
    BUNDLE_FILES,
    BUNDLE_SCHEMA_VERSION,
    Bundle,
    BundleError,
    BundleIntegrityError,
    BundleManifest,
    Prediction,
)
from roadwork_core.bundle.export import current_code_version, export_bundle

__all__ = [
    "BUNDLE_FILES",
    "BUNDLE_SCHEMA_VERSION",
    "Bundle",
    "BundleError",
    "BundleIntegrityError",
    "BundleManifest",
    "Prediction",
    "current_code_version",
    "export_bundle",
]
