"""The low-rank branch of SVDQuant (Li et al., "SVDQuant", 2025): a weight split into its best
rank-r part, kept in 16 bits, and a residual that is quantized."""

from __future__ import annotations

import torch


def lowrank_split(w: torch.Tensor, rank: int, channel_scale: torch.Tensor | None,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the smoothed weight ``w`` = W·D⁻¹ (float32 [N, K]) as w = (D⁻¹·down·up)ᵀ + R.

    down: [K, r], up: [r, N] in ``dtype`` (the branch the layer stores: x·down·up is the
    branch's output for a raw input row x, D folded into ``down``); their product before
    rounding is the best rank-r approximation of w (Eckart–Young): w projected on its top r
    singular vectors of the smaller side, found by a float64 eigendecomposition of the
    min(N, K)² Gram matrix (exact subspace, no division by singular values; a fraction of an
    SVD's time at DiT sizes). R: float32 [N, K], the residual against the *rounded* factors,
    so the quantized residual also corrects their rounding. channel_scale: float32 [K], the
    diagonal of D, or None (D = I)."""
    w64 = w.double()
    n, k = w64.shape
    if n <= k:  # top left singular vectors U_r: w_r = U_r·(U_rᵀ·w)
        u = torch.linalg.eigh(w64 @ w64.T)[1][:, -rank:]
        a, b = w64.T @ u, u.T  # [K, r], [r, N]
    else:  # top right singular vectors V_r: w_r = (w·V_r)·V_rᵀ
        v = torch.linalg.eigh(w64.T @ w64)[1][:, -rank:]
        a, b = v, (w64 @ v).T
    d = channel_scale.double()[:, None] if channel_scale is not None else 1.0
    down, up = (a * d).to(dtype), b.to(dtype)
    branch = (down.double() / d) @ up.double()  # D⁻¹·down·up, [K, N]
    return down, up, (w64 - branch.T).float()
