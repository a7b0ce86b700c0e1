"""The release bundle: export, load with integrity checks, predict, ONNX export."""

from roadwork_core.bundle.bundle import Bundle, Prediction
from roadwork_core.bundle.export import current_code_version, export_bundle
from roadwork_core.bundle.schema import (
    BUNDLE_FILES,
    BUNDLE_SCHEMA_VERSION,
    BundleError,
    BundleIntegrityError,
    BundleManifest,
)

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
