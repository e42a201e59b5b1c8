"""GPTQ weight rounding: codes chosen column by column with error feedback through the inverse
Hessian of the layer's inputs (Frantar et al., "GPTQ", 2023), in the package's weight format.

The scales are round-to-nearest's (:func:`kernels.quantize.quantize_weight_ref`: a float32
scale per output channel, with 4 bits and a group size an integer per group), fixed before
the columns are visited, so a GPTQ layer is stored and computed exactly like an RTN one; only
the codes differ. The Hessian must be of the inputs in the weight's own basis: for a
QuantLinear, after shift, smoothing, permutation and rotation (:func:`transform_hessian`).
"""

from __future__ import annotations

import torch

from .kernels.formats import qmax_for
from .kernels.hadamard import rotate_ref
from .kernels.quantize import quantize_weight_ref


def gptq_weight(w: torch.Tensor, hessian: torch.Tensor, group_size: int | None, bits: int,
                clip: float = 1.0, block: int = 128, damp: float = 0.01):
    """GPTQ codes of ``w`` [N, K] for inputs with Hessian ``hessian`` = Σ xᵀx [K, K].

    Returns (codes int8 [N, K], scale float32 [N], group_int uint8 [N, K/G] or None), the
    format of ``quantize_weight_ref`` with its scales. ``damp``: fraction of the mean diagonal
    added to it; columns never seen (zero diagonal) get code 0. Float64 throughout; columns
    in ``block``-wide batches with lazy updates (the result does not depend on ``block``)."""
    n, k = w.shape
    _, scale, group_int = quantize_weight_ref(w, group_size, bits, clip)
    step = scale.double()[:, None].expand(n, k)
    if group_int is not None:
        step = step * group_int.double().repeat_interleave(group_size, dim=1)
    inv_step = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    qmax = qmax_for(bits)
    W = w.double().clone()
    H = hessian.double().to(w.device).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            q = torch.copysign((W1[:, i].abs() * inv_step[:, col]).add(0.5).floor()
                               .clamp(max=qmax), W1[:, i])
            Q[:, col] = q
            e = (W1[:, i] - q * step[:, col]) / U[col, col]
            W1[:, i:] -= e[:, None] * U[col, col:i2][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return Q.to(torch.int8), scale, group_int


def transform_hessian(gram: torch.Tensor, total: torch.Tensor, rows: float,
                      shift: torch.Tensor | None, scale: torch.Tensor | None,
                      perm: torch.Tensor | None, block: int | None) -> torch.Tensor:
    """The Hessian of the inputs in a QuantLinear's basis, x' = ((x − δ)·D)·S·H, from the raw
    inputs' Σ xᵀx (``gram`` [K, K]), Σ x (``total`` [K]) and row count: float64 [K, K].
    Σ (x − δ)ᵀ(x − δ) = Σ xᵀx − δ·(Σ x)ᵀ − (Σ x)·δᵀ + rows·δ·δᵀ; then D on both sides; then
    Gᵀ·H·G with G = S·H (the rotation applied to rows and columns)."""
    h = gram.double()
    if shift is not None:
        d, s = shift.double().to(h.device), total.double().to(h.device)
        h = h - torch.outer(d, s) - torch.outer(s, d) + rows * torch.outer(d, d)
    if scale is not None:
        c = scale.double().to(h.device)
        h = h * c[:, None] * c[None, :]
    perm = perm.to(h.device) if perm is not None else None
    return rotate_ref(rotate_ref(h, perm, block).T.contiguous(), perm, block)
