"""bench/common.py's speed reference: fixed work in a fresh interpreter, recorded beside absolute timings."""

from __future__ import annotations

from bench.common import speed_reference


def test_speed_reference_times_a_fresh_interpreter():
    import timm  # noqa: F401  (imported here: the reference must not reuse this process's modules)

    ref = speed_reference("test_vit", repeats=2)  # timm's tiny test ViT, random init
    assert ref["model"] == "test_vit" and ref["repeats"] == 2
    # a fresh interpreter pays the whole import (here the worker's cached modules would make it ~0 s)
    assert ref["import_torch_timm_seconds"] > 0.3, ref
    assert 0 < ref["forward_seconds"] < ref["import_torch_timm_seconds"], ref
    assert ref["python_loop_seconds"] > 0.05, ref
