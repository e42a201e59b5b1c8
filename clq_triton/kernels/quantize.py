"""Plain-PyTorch reference of the quantizers (layouts: :mod:`clq_triton.kernels.formats`).

Activations (online, by the fused kernel; this is its reference):
- groups of ``group_size`` consecutive elements along K, or the whole row when None;
- ``scale = amax(|x_group|) · clip / qmax``; ``code = sign(x)·min(floor(|x|/scale + 0.5), qmax)``
  (round half away from zero), so codes lie in [-qmax, qmax];
- a group of zeros has scale 0 and codes 0; a group holding NaN or ±Inf has scale NaN and
  codes 0, so the GEMM yields NaN for that token: non-finite input is reported, never hidden.

Weights (offline): one float32 scale per output channel; with 4 bits and a group size, a
two-level code ``w ≈ s_n · z_{n,g} · code`` with integer z in [1, GROUP_INT_MAX] per group:
``s_n = amax(|w_n|) · clip / (7 · GROUP_INT_MAX)``, ``z = clamp(ceil(amax_g · clip / (7·s_n)))``
(never smaller than the group needs, so ``clip`` is the only clipping).
"""

from __future__ import annotations

import torch

from .formats import GROUP_INT_MAX, check_group_size, n_groups, qmax_for


def scale_multiplier(bits: int, clip: float) -> float:
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip ratio must be in (0, 1], got {clip!r}")
    return float(clip) / qmax_for(bits)


def _round_codes(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """sign(x)·min(floor(|x|/scale + 0.5), qmax) with scale broadcast; 0 where scale is 0."""
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    mag = (x.abs() * inv).add_(0.5).floor_().clamp_(max=qmax)
    return torch.copysign(mag, x)


def quantize_ref(
    x: torch.Tensor,
    group_size: int | None,
    bits: int,
    clip: float = 1.0,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [..., K] per group along K (per row when ``group_size`` is None).

    Returns (codes int8 [..., K], scales [..., n_groups] of ``scale_dtype``). Codes are
    computed from the scale *after* rounding it to ``scale_dtype``.
    """
    check_group_size(group_size)
    qmax = qmax_for(bits)
    mult = torch.tensor(scale_multiplier(bits, clip), dtype=torch.float32)
    k = x.shape[-1]
    ng = n_groups(group_size, k)
    g = x.float().reshape(*x.shape[:-1], ng, k // ng)
    amax = g.abs().amax(dim=-1)  # NaN and Inf propagate into the group max
    # branch-free (no read-back, so no device sync and nothing a CUDA graph cannot hold)
    bad = ~torch.isfinite(amax)
    scale = (torch.where(bad, 0.0, amax) * mult).to(scale_dtype).float()
    if scale_dtype != torch.float32 and bool(torch.isinf(scale).any()):
        raise OverflowError(f"a group scale overflows {scale_dtype}: values too large to store")
    codes = torch.where(bad.unsqueeze(-1), 0.0, _round_codes(g, scale.unsqueeze(-1), qmax))
    scale = torch.where(bad, float("nan"), scale)
    return codes.to(torch.int8).reshape(x.shape), scale.to(scale_dtype)


def dequantize_ref(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes int8 [..., K] × scales [..., n_groups] (group = K / n_groups) → float32."""
    k, ng = codes.shape[-1], scales.shape[-1]
    g = codes.float().reshape(*codes.shape[:-1], ng, k // ng)
    return (g * scales.float().unsqueeze(-1)).reshape(codes.shape)


def quantize_weight_ref(
    w: torch.Tensor, group_size: int | None, bits: int, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize a weight [N, K] (finite) offline.

    Returns (codes int8 [N, K], scale float32 [N], group_int uint8 [N, K/G] or None).
    ``group_int`` exists for 4 bits with a group size (two-level code), else None.
    """
    check_group_size(group_size)
    if bits == 8 or group_size is None:
        codes, scale = quantize_ref(w, None, bits, clip)
        return codes, scale[:, 0].contiguous(), None
    qmax = qmax_for(bits)
    n, k = w.shape
    wf = w.float()
    g = wf.reshape(n, k // group_size, group_size)
    mult = torch.tensor(scale_multiplier(bits, clip), dtype=torch.float32)
    ideal = g.abs().amax(-1) * mult  # the one-level group scale [N, G]
    s = wf.abs().amax(-1) * (mult / GROUP_INT_MAX)  # [N]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.ceil(ideal / safe[:, None]).clamp_(1, GROUP_INT_MAX)
    codes = _round_codes(g, (s[:, None] * z).unsqueeze(-1), qmax)
    return codes.to(torch.int8).reshape(n, k), s, z.to(torch.uint8)


def dequantize_weight_ref(
    codes: torch.Tensor, scale: torch.Tensor, group_int: torch.Tensor | None
) -> torch.Tensor:
    """Inverse of :func:`quantize_weight_ref`: float32 [N, K]."""
    if group_int is None:
        return codes.float() * scale.float()[:, None]
    return dequantize_ref(codes, scale.float()[:, None] * group_int.float())
