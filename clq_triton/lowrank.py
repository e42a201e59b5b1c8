"""The low-rank branch of SVDQuant (Li et al., "SVDQuant", 2025): a weight split into its best
rank-r part, kept in 16 bits, and a residual that is quantized."""

from __future__ import annotations

import torch


def lowrank_split(w: torch.Tensor, rank: int, channel_scale: torch.Tensor | None,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the smoothed weight ``w`` = W·D⁻¹ (float32 [N, K]) as w = (D⁻¹·down·up)ᵀ + R.

    down: [K, r], up: [r, N] in ``dtype`` (the branch the layer stores: x·down·up is the
    branch's output for a raw input row x, D folded into ``down``); their product before
    rounding is the best rank-r approximation of w (truncated SVD, the singular values split
    evenly between the two factors by their square roots). R: float32 [N, K], the residual
    against the *rounded* factors, so the quantized residual also corrects their rounding.
    channel_scale: float32 [K], the diagonal of D, or None (D = I)."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    root = s[:rank].double().sqrt()
    a = vh[:rank].double().T * root  # [K, r]
    b = root[:, None] * u[:, :rank].double().T  # [r, N]
    d = channel_scale.double()[:, None] if channel_scale is not None else 1.0
    down, up = (a * d).to(dtype), b.to(dtype)
    branch = (down.double() / d) @ up.double()  # D⁻¹·down·up, [K, N]
    return down, up, (w.double() - branch.T).float()
