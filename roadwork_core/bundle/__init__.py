"""The release bundle: export, load with integrity checks, predict, ONNX export.

Names are re-exported from the submodules on first use (PEP 562), as in roadwork_core.metrics: importing
a light submodule (`roadwork_core.bundle.predict_cli` to build `roadwork`'s argument parser, the schema)
must not import torch and timm, seconds of start-up for `roadwork make-demo-data` or `roadwork --help`."""

import importlib

_EXPORTS = {
    **dict.fromkeys(("Bundle", "Prediction"), "bundle"),
    **dict.fromkeys(("current_code_version", "export_bundle"), "export"),
    **dict.fromkeys(
        ("BUNDLE_FILES", "BUNDLE_SCHEMA_VERSION", "BundleError", "BundleIntegrityError", "BundleManifest"),
        "schema",
    ),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
