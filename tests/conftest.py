"""Test setup: without CUDA, Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, so this happens
at configuration, before any test module imports clq_triton. On a CUDA machine the same
tests run the compiled kernels. ``pytest --benchmark-only`` (which skips these tests) leaves
it unset: on CPU the benchmarks in bench/ time the PyTorch reference path.
"""

import os

import pytest
import torch


def pytest_configure(config):
    if not torch.cuda.is_available() and not config.getoption("benchmark_only", False):
        os.environ.setdefault("TRITON_INTERPRET", "1")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def kernel_device():
    """The device on which launchers run their Triton kernel (fails if they would not)."""
    from clq_triton.kernels._runtime import use_triton

    if not use_triton(torch.empty(0, device=DEVICE)):
        pytest.fail("Triton kernels are not active: need CUDA or TRITON_INTERPRET=1")
    return DEVICE


@pytest.fixture
def gen():
    """A fresh, unseeded-by-default generator: every run draws new data (seed printed)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe_and_data():
    """A 2-block DiT pipeline with planted outliers and 4 captured sampler steps."""
    import clq_triton
    from toy_models import dit_pipeline, sample

    pipe = dit_pipeline(seed=1, layers=2)
    data = clq_triton.capture_calibration(
        pipe.transformer, lambda: sample(pipe, [1, 3], steps=4), progress=False)
    return pipe, data
