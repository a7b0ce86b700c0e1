"""The gpu resource's torch settings in an asset's process."""

from __future__ import annotations

import pytest
import torch

from roadwork_resources.gpu import GPUResource


@pytest.fixture
def restore_torch_flags():
    threads = torch.get_num_threads()
    state = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


def test_deterministic_is_strict_not_a_warning(restore_torch_flags):
    """warn_only would let an op without a deterministic kernel (and SDPA's fused CUDA backward, which
    takes its deterministic path only in strict mode) drift between runs while the config says otherwise."""
    GPUResource(device="cpu", deterministic=True, threads=1).setup()
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert torch.get_num_threads() == 1


def test_not_deterministic_leaves_the_algorithms_free(restore_torch_flags):
    torch.use_deterministic_algorithms(False)
    GPUResource(device="cpu", deterministic=False).setup()
    assert not torch.are_deterministic_algorithms_enabled()
