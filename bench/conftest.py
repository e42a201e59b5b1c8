"""Fixtures of the benchmark suite (settings live in bench_utils.py)."""

import pytest
import torch

from bench_utils import BACKEND, CUDA, DTYPE


@pytest.fixture
def info(benchmark):
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu",
                                backend=BACKEND, dtype=str(DTYPE).removeprefix("torch."))
    return benchmark.extra_info
