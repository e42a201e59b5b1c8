import pytest
import torch

from clq_triton.kernels.hadamard import hadamard_matrix, rotate_ref
from clq_triton.kernels.rotate_quantize import rotate
from helpers import TOL, explicit_hadamard, explicit_rotation


@pytest.mark.parametrize("n", [1, 2, 4, 16, 128, 1024])
def test_hadamard_matrix_closed_form_and_orthogonal(n):
    h = hadamard_matrix(n)
    assert torch.equal(h, explicit_hadamard(n))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [0, 3, 12, 48])
def test_hadamard_matrix_rejects_non_power_of_two(n):
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(n)


@pytest.mark.parametrize("block", [None, 16, 64, 256, 512])
@pytest.mark.parametrize("use_perm", [False, True])
def test_rotate_ref_matches_dense_rotation(block, use_perm, gen):
    k = 1024
    x = torch.randn(5, k, generator=gen, dtype=torch.float64)
    perm = torch.randperm(k, generator=gen) if use_perm else None
    g = explicit_rotation(k, perm, block)
    torch.testing.assert_close(rotate_ref(x, perm, block), x @ g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rotate_ref(x, perm, block, inverse=True), x @ g.T,
                               rtol=1e-12, atol=1e-12)


def test_rotation_leaves_linear_output_unchanged(gen):
    k, n = 256, 40
    x = torch.randn(7, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    perm = torch.randperm(k, generator=gen)
    y = rotate_ref(x, perm, 64) @ rotate_ref(w, perm, 64).T
    torch.testing.assert_close(y, x @ w.T, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", [None, 16, 32, 128, 256, 512])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_rotate_kernel_matches_float64(kernel_device, dtype, block, m, gen):
    k = 512
    x = torch.randn(m, k, generator=gen).to(dtype)
    perm = torch.randperm(k, generator=gen)
    out = torch.full((m, k), float("nan"), dtype=dtype, device=kernel_device)
    y = rotate(x.to(kernel_device), perm.to(kernel_device), block, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == dtype
    expect = x.double() @ explicit_rotation(k, perm, block)
    torch.testing.assert_close(y.cpu().double(), expect, rtol=TOL[dtype], atol=TOL[dtype] * 4)


def test_rotate_kernel_3d_and_strided_rows(kernel_device, gen):
    base = torch.randn(2, 3, 128, generator=gen)
    x = base[:, 1:, :64]  # rows strided, columns contiguous
    y = rotate(x.to(kernel_device), None, 32)
    assert y.shape == x.shape
    torch.testing.assert_close(y.cpu().double(), x.double() @ explicit_rotation(64, None, 32),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "block, perm_len, match",
    [(24, 64, "power of two"), (128, 64, "multiple of the Hadamard block"), (16, 63, "perm")],
)
def test_rotate_errors(block, perm_len, match):
    x = torch.randn(2, 64)
    perm = torch.arange(perm_len)
    with pytest.raises(ValueError, match=match):
        rotate(x, perm, block)


def test_rotate_rejects_duplicate_perm_and_int_input():
    perm = torch.arange(64)
    perm[3] = 4
    with pytest.raises(ValueError, match="not a permutation"):
        rotate(torch.randn(2, 64), perm, 16)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        rotate(torch.ones(2, 64, dtype=torch.int32), None, 16)
