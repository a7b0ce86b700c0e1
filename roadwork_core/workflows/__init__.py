"""Workflows that run a bundle over images and write results: `evaluate` (the val_test evaluation
report: clean, robustness, subnet replica) and `drift_check` (monitored images against the bundle's
training images). The statistics they compute live in roadwork_core.metrics, which runs no model."""
