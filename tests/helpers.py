"""Independent float64 oracles for the tests (no code shared with the package)."""

import math

import torch


def explicit_hadamard(n: int) -> torch.Tensor:
    """±1 Hadamard matrix from the closed form H[i, j] = (-1)^popcount(i & j), float64."""
    idx = torch.arange(n)
    both = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(both)
    for b in range(max(1, int(math.log2(n)))):
        parity ^= (both >> b) & 1
    return (1 - 2 * parity).double()


def explicit_rotation(k: int, perm, block) -> torch.Tensor:
    """Dense float64 G = S·H [K, K] with (x·S)[:, j] = x[:, perm[j]]."""
    s = torch.eye(k, dtype=torch.float64)
    if perm is not None:
        s = s[:, perm.long()]
    if block is None:
        return s
    h = explicit_hadamard(block) / math.sqrt(block)
    return s @ torch.block_diag(*([h] * (k // block)))


def dequant64(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes [R, K] × scales [R, K/group] (group = K / scales.shape[1]) → float64 [R, K],
    by explicit repeat."""
    group = codes.shape[1] // scales.shape[1]
    return codes.double() * scales.double().repeat_interleave(group, dim=1)


def nibble_columns(k: int) -> list[tuple[int, int]]:
    """For each byte of a packed row: (column in the low nibble, column in the high nibble),
    from the format's wording: pack tiles of 64 columns, byte j of a tile holds j and j + 32."""
    out = []
    for tile in range(k // 64):
        for j in range(32):
            out.append((64 * tile + j, 64 * tile + j + 32))
    return out


def unpack64(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/2] → int64 [R, K] with plain Python-style arithmetic."""
    p = packed.long()
    lo, hi = p % 16, p // 16
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    out = torch.empty(p.shape[0], p.shape[1] * 2, dtype=torch.int64)
    for b, (cl, ch) in enumerate(nibble_columns(p.shape[1] * 2)):
        out[:, cl] = lo[:, b]
        out[:, ch] = hi[:, b]
    return out


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
