"""Plain-PyTorch reference of symmetric per-group quantization and INT4 packing.

Quantizer (used by weights offline and, through the fused kernel, by activations online):
- Groups of ``group_size`` consecutive elements along the last dim K.
- ``qmax = 7`` for 4 bits, ``127`` for 8 bits; codes lie in [-qmax, qmax] (the value -8 / -128
  is never produced, so the grid is symmetric).
- ``scale = amax(|x_group|) * (clip / qmax)``, with ``clip`` in (0, 1] clipping the range;
  ``code = sign(x) * min(floor(|x| / scale + 0.5), qmax)`` (round half away from zero).
- A group of zeros has scale 0 and codes 0 (never NaN).
- A group holding NaN or ±Inf has scale NaN and codes 0, so a GEMM over it yields NaN for that
  token: non-finite input is reported, never silently turned into numbers.

INT4 packing: two codes per uint8 along K; the low nibble holds the even column (2j), the high
nibble the odd column (2j+1); nibbles are two's complement.
"""

from __future__ import annotations

import torch


def qmax_for(bits: int) -> int:
    return 7 if bits == 4 else 127


def scale_multiplier(bits: int, clip: float) -> float:
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip ratio must be in (0, 1], got {clip!r}")
    return float(clip) / qmax_for(bits)


def quantize_ref(
    x: torch.Tensor,
    group_size: int,
    bits: int,
    clip: float = 1.0,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., K] per group along K.

    Returns (codes int8 [..., K], scales [..., K // group_size] of ``scale_dtype``). Codes are
    computed from the scale *after* it is rounded to ``scale_dtype``, so that
    ``codes * scale`` is what a consumer of the stored scale reconstructs.
    """
    qmax = qmax_for(bits)
    mult = torch.tensor(scale_multiplier(bits, clip), dtype=torch.float32)
    k = x.shape[-1]
    g = x.float().reshape(*x.shape[:-1], k // group_size, group_size)
    mag = g.abs()
    amax = mag.amax(dim=-1)  # NaN and Inf propagate into the group max
    bad = ~torch.isfinite(amax)
    any_bad = bool(bad.any())
    if any_bad:
        amax = torch.where(bad, 0.0, amax)
    scale = (amax * mult).to(scale_dtype).float()
    if scale_dtype != torch.float32 and bool(torch.isinf(scale).any()):
        raise OverflowError(f"a group scale overflows {scale_dtype}: values too large to store")
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    mag = mag.mul_(inv.unsqueeze(-1)).add_(0.5).floor_().clamp_(max=qmax)
    codes = torch.copysign(mag, g)
    if any_bad:
        codes = torch.where(bad.unsqueeze(-1), 0.0, codes)
        scale = torch.where(bad, float("nan"), scale)
    return codes.to(torch.int8).reshape(x.shape), scale.to(scale_dtype)


def dequantize_ref(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes int8 [..., K] × scales [..., K // group_size] → float32 [..., K]."""
    k = codes.shape[-1]
    g = codes.float().reshape(*codes.shape[:-1], k // group_size, group_size)
    return (g * scales.float().unsqueeze(-1)).reshape(codes.shape)


def pack_int4_ref(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [..., K] (K even) → uint8 [..., K // 2]; low nibble = even column."""
    if codes.shape[-1] % 2:
        raise ValueError(f"K must be even to pack int4, got {codes.shape[-1]}")
    c = codes.to(torch.int32)
    lo, hi = c[..., 0::2] & 0xF, c[..., 1::2] & 0xF
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] → int8 codes [..., K] in [-8, 7] (inverse of pack_int4_ref)."""
    p = packed.to(torch.int32)
    lo = ((p & 0xF) ^ 8) - 8
    hi = ((p >> 4) ^ 8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1).to(torch.int8)
