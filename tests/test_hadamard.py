import pytest
import torch

from clq_triton.kernels.hadamard import check_block, check_perm, hadamard_matrix, rotate_ref
from helpers import explicit_hadamard, explicit_rotation


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


@pytest.mark.parametrize(
    "block, perm_len, match",
    [(24, 64, "power of two"), (128, 64, "multiple of the Hadamard block"), (16, 63, "perm")],
)
def test_block_and_perm_errors(block, perm_len, match):
    with pytest.raises(ValueError, match=match):
        check_block(block, 64)
        check_perm(torch.arange(perm_len), 64)


def test_duplicate_perm_is_rejected():
    perm = torch.arange(64)
    perm[3] = 4
    with pytest.raises(ValueError, match="not a permutation"):
        check_perm(perm, 64)
    check_perm(perm, 64, values=False)  # shape and dtype only
