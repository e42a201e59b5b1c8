import pytest
import torch

import clq_triton
from clq_triton.kernels import _runtime


def test_backend_is_not_read_from_the_environment_per_call(monkeypatch):
    x = torch.zeros(2)
    before = _runtime.use_triton(x)
    monkeypatch.setenv("CLQ_BACKEND", "torch" if before else "triton")
    assert _runtime.use_triton(x) == before  # read once, at import


def test_set_backend_and_context_manager():
    x = torch.zeros(2)
    start = clq_triton.get_backend()
    with clq_triton.backend("torch"):
        assert clq_triton.get_backend() == "torch" and not _runtime.use_triton(x)
        with clq_triton.backend("triton"):
            assert _runtime.use_triton(x)
        assert clq_triton.get_backend() == "torch"
    assert clq_triton.get_backend() == start
    with pytest.raises(ValueError, match="backend must be one of"):
        clq_triton.set_backend("cuda")


def test_aligned_copies_only_odd_views():
    t = torch.zeros(8, 64, dtype=torch.uint8)
    assert _runtime.aligned(t, rows=True) is t
    odd = torch.zeros(8, 70, dtype=torch.uint8)[:, 3:67]
    fixed = _runtime.aligned(odd, rows=True)
    assert fixed is not odd and torch.equal(fixed, odd)
    assert fixed.data_ptr() % 16 == 0 and fixed.stride(0) % 16 == 0
    assert _runtime.aligned(None) is None
