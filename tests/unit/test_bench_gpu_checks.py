"""bench.gpu_checks and the direct pipeline's device rule: what a session with a lent GPU runs."""

from __future__ import annotations

import pytest
import torch

from bench.direct_pipeline import _device_and_precision
from bench.gpu_checks import main, resolve_gpu_config


def test_the_direct_pipeline_takes_the_gpu_resources_device_rule() -> None:
    """auto -> CUDA when torch sees it; a CPU always runs fp32 (as GPUResource.effective_precision)."""
    gpu = {"device": "auto", "precision": "bf16-mixed"}
    if torch.cuda.is_available():
        assert _device_and_precision(gpu) == ("cuda", "bf16-mixed")
    else:
        assert _device_and_precision(gpu) == ("cpu", "fp32")
        with pytest.raises(RuntimeError, match="'cuda' but torch sees no CUDA device"):
            _device_and_precision({**gpu, "device": "cuda"})
    assert _device_and_precision({**gpu, "device": "cpu"}) == ("cpu", "fp32")


def test_the_gpu_run_config_is_the_shipped_one_with_random_init_and_fewer_epochs() -> None:
    """configs/dinov3_base_gpu.yaml through the assets' Config classes: nothing may reach the hub."""
    resolved = resolve_gpu_config(epochs=2, backbone="vit_test_tiny")
    gpu = resolved["resources"]["gpu"]
    assert (gpu["device"], gpu["precision"], gpu["compile"], gpu["attn_backend"]) == (
        "cuda",
        "bf16-mixed",
        True,
        "sdpa",
    )
    backbone = resolved["ops"]["explora_backbone"]["backbone"]
    assert backbone["name"] == "vit_test_tiny" and backbone["pretrained"] is False
    assert backbone["weights_file"] is None
    assert resolved["ops"]["classifier"]["epochs"] == 2 and resolved["ops"]["classifier"]["num_workers"] == 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_checks_refuses_a_machine_without_cuda_instead_of_timing_the_cpu(tmp_path, capsys) -> None:
    assert main(["--out", str(tmp_path)]) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "gpu_checks.json").exists()
