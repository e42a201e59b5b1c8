"""Hadamard matrices and the plain-PyTorch reference of the rotation G = S·H.

Conventions (used by every kernel, module and test in the package):
- ``perm`` is an int32/int64 vector of length K; S is the permutation matrix with
  ``(x·S)[..., j] = x[..., perm[j]]`` (a gather).
- H is block-diagonal with ``K // block`` copies of the Sylvester Hadamard matrix of size
  ``block`` (a power of two), scaled by ``1/sqrt(block)`` so that H is orthogonal and symmetric.
- ``rotate(x) = x·S·H``; for a Linear with weight W [N, K], ``Y = X·Wᵀ = (X·G)·(W·G)ᵀ``, so
  weights are rotated with the same function as activations.
"""

from __future__ import annotations

import functools
import math

import torch

# Largest Hadamard block the fused Triton kernel applies itself; larger power-of-two blocks
# are split as H_B = H_(B/inner) ⊗ H_inner (Sylvester ordering), the outer factor in PyTorch.
MAX_KERNEL_BLOCK = 256


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Unnormalized Sylvester Hadamard matrix of size ``n`` (power of two), entries ±1.

    ``H[i, j] = (-1) ** popcount(i & j)``; ``H @ H.T == n * I``.
    """
    if not is_power_of_two(n):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def check_block(block: int | None, k: int) -> None:
    """``block`` is None (no rotation) or a power of two >= 16 that divides K."""
    if block is None:
        return
    if not isinstance(block, int) or not is_power_of_two(block) or block < 16:
        raise ValueError(f"hadamard block must be None or a power of two >= 16, got {block!r}")
    if k % block != 0:
        raise ValueError(f"K={k} is not a multiple of the Hadamard block size {block}")


def check_perm(perm: torch.Tensor | None, k: int, values: bool = True) -> None:
    """``perm`` is None or a 1-D integer permutation of range(K).

    ``values=False`` checks dtype and shape only: the value check reads the tensor back (a
    device sync), so callers that validated ``perm`` once (QuantLinear) skip it per call."""
    if perm is None:
        return
    if perm.dtype not in (torch.int32, torch.int64) or perm.dim() != 1 or perm.numel() != k:
        raise ValueError(
            f"perm must be a 1-D int32/int64 tensor of length K={k}, "
            f"got {perm.dtype} shape {tuple(perm.shape)}"
        )
    if not values:
        return
    seen = torch.zeros(k, dtype=torch.bool, device=perm.device)
    seen[perm.long()] = True
    if not bool(seen.all()):
        raise ValueError("perm is not a permutation of range(K)")


PERM_RUN = 8  # channels a run-structured permutation moves together: 16 bytes of bf16


def find_perm_runs(perm: torch.Tensor | None) -> int:
    """8 when ``perm`` (a permutation, see :func:`check_perm`) moves aligned runs of 8
    channels — perm[8i + j] = perm[8i] + j with perm[8i] a multiple of 8, as
    :func:`clq_triton.smoothing.outlier_permutation` makes them —, else 1 (also for None).
    Reads perm back (a device sync)."""
    if perm is None or perm.numel() % PERM_RUN:
        return 1
    runs = perm.reshape(-1, PERM_RUN).long()
    ok = (runs[:, :1] % PERM_RUN == 0) & (runs == runs[:, :1] + torch.arange(
        PERM_RUN, device=perm.device))
    return PERM_RUN if bool(ok.all()) else 1


def _block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """x·H along the last dim; Kronecker-split blocks larger than MAX_KERNEL_BLOCK."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    inner = min(block, MAX_KERNEL_BLOCK)
    outer = block // inner
    h_in = hadamard_matrix(inner, x.dtype, x.device)
    y = x.reshape(*lead, k // block, outer, inner) @ h_in
    if outer > 1:
        h_out = hadamard_matrix(outer, x.dtype, x.device)
        y = torch.einsum("...ab,ac->...cb", y, h_out)
    return y.reshape(*lead, k) * (1.0 / math.sqrt(block))


@functools.lru_cache(maxsize=None)
def outer_factor(outer: int, device: torch.device) -> torch.Tensor:
    """H_outer / sqrt(outer), float32 [outer, outer], kept per device (built ahead of a
    CUDA-graph capture by ``rotate_quantize.prepare``)."""
    return hadamard_matrix(outer, torch.float32, device) * (1.0 / math.sqrt(outer))


def apply_outer_hadamard(x: torch.Tensor, block: int, inner: int) -> torch.Tensor:
    """x·(H_outer ⊗ I_inner) with outer = block / inner, normalized by 1/sqrt(outer): the
    kernel then applies the inner factor (H_block = H_outer ⊗ H_inner). Returns float32.
    One batched matmul with the cached factor (H is symmetric):
    y[..., c, :] = Σ_a H[c, a]·x[..., a, :]."""
    k = x.shape[-1]
    outer = block // inner
    xs = x.reshape(*x.shape[:-1], k // block, outer, inner).float()
    return torch.matmul(outer_factor(outer, x.device), xs).reshape(x.shape)


def rotate_ref(
    x: torch.Tensor,
    perm: torch.Tensor | None = None,
    block: int | None = None,
    inverse: bool = False,
) -> torch.Tensor:
    """Reference x·G (or x·Gᵀ when ``inverse``) along the last dim.

    x: [..., K] any float dtype; computed and returned in float64 if x is float64, else float32.
    """
    k = x.shape[-1]
    check_block(block, k)
    check_perm(perm, k)
    return rotate_unchecked(x, perm, block, inverse)


def rotate_unchecked(
    x: torch.Tensor, perm: torch.Tensor | None, block: int | None, inverse: bool = False
) -> torch.Tensor:
    """:func:`rotate_ref` without its checks (checking ``perm`` reads it back, a device
    sync): for the per-call paths whose perm and block were validated once."""
    y = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if not inverse:
        if perm is not None:
            y = y.index_select(-1, perm.long())  # 2-4× faster than y[..., perm] on CPU
        if block is not None:
            y = _block_hadamard(y, block)
        return y
    if block is not None:
        y = _block_hadamard(y, block)  # H is symmetric and orthogonal: H⁻¹ = Hᵀ = H
    if perm is not None:
        y = y.index_select(-1, torch.argsort(perm.long()))
    return y
