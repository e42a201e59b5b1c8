"""GPTQ weight rounding: codes chosen column by column with error feedback through the inverse
Hessian of the layer's inputs (Frantar et al., "GPTQ", 2023), in the package's weight format.

The scales are round-to-nearest's (:func:`kernels.quantize.quantize_weight_ref`: a float32
scale per output channel, with 4 bits and a group size an integer per group), fixed before
the columns are visited, so a GPTQ layer is stored and computed exactly like an RTN one; only
the codes differ. The Hessian must be of the inputs in the weight's own basis: for a
QuantLinear, after shift, smoothing, permutation and rotation (:func:`transform_hessian`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.formats import qmax_for
from .kernels.hadamard import rotate_ref
from .kernels.quantize import quantize_weight_ref


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs of a layer's Hessian, computed once (:func:`factor_hessian`) and reused
    by every weight-clip candidate and fused-layer segment of the layer: ``upper``, float64
    [K, K], the upper Cholesky factor U of (H + λ·I)⁻¹ (UᵀU = that inverse); ``dead``, bool
    [K], the columns never seen (zero diagonal), whose codes are 0."""

    upper: torch.Tensor
    dead: torch.Tensor


def factor_hessian(hessian: torch.Tensor, damp: float = 0.01,
                   escalate: int = 3, overwrite: bool = False) -> HessianFactor:
    """:class:`HessianFactor` of ``hessian`` = Σ xᵀx [K, K]; ``damp``: fraction of the mean
    diagonal added to it (dead columns' diagonals count as 1), multiplied by 10 up to
    ``escalate`` times while the damped matrix is not positive definite (then ValueError).
    Float64; three O(K³) steps (two Cholesky factorizations and an inverse), the part of
    GPTQ that does not depend on the weight or its scales. ``overwrite``: damp a float64
    ``hessian`` in place instead of a copy (one K × K buffer fewer at the peak). At most three
    K × K float64 buffers live at once besides the input."""
    h = hessian if overwrite and hessian.dtype == torch.float64 else hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    mean, added = torch.diagonal(h).mean(), 0.0
    for attempt in range(escalate + 1):
        d = damp * 10 ** attempt
        h.diagonal().add_(d * mean - added)
        added = d * mean
        try:
            lower = torch.linalg.cholesky(h)
        except torch.linalg.LinAlgError:
            continue
        del h  # (freed here unless it is the caller's hessian)
        inverse = torch.cholesky_inverse(lower)
        del lower
        return HessianFactor(torch.linalg.cholesky(inverse, upper=True), dead)
    raise ValueError(f"the Hessian ({len(h)} columns) is not positive definite even damped by "
                     f"{d:g} × its mean diagonal (non-finite calibration inputs?)")


def gptq_weight(w: torch.Tensor, hessian: torch.Tensor | HessianFactor,
                group_size: int | None, bits: int, clip: float = 1.0, block: int = 128,
                damp: float = 0.01):
    """GPTQ codes of ``w`` [N, K] for inputs with Hessian ``hessian`` = Σ xᵀx [K, K], or its
    :class:`HessianFactor` (then ``damp`` is the factor's).

    Returns (codes int8 [N, K], scale float32 [N], group_int uint8 [N, K/G] or None), the
    format of ``quantize_weight_ref`` with its scales. ``damp``: fraction of the mean
    diagonal added to it; columns never seen (zero diagonal) get code 0. Float64 throughout;
    columns in ``block``-wide batches with lazy updates (the result does not depend on
    ``block``). Works on Wᵀ, so that each column's update is a contiguous row update."""
    n, k = w.shape
    f = hessian if isinstance(hessian, HessianFactor) else factor_hessian(hessian, damp)
    if f.upper.shape != (k, k):
        raise ValueError(f"the Hessian is {tuple(f.upper.shape)} for a weight of {k} columns")
    _, scale, group_int = quantize_weight_ref(w, group_size, bits, clip)
    step = scale.double()[None, :].expand(k, n)  # [K, N], like Wᵀ
    if group_int is not None:
        step = step * group_int.double().T.repeat_interleave(group_size, dim=0)
    step = step.contiguous()
    inv_step = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    qmax = qmax_for(bits)
    u = f.upper.to(w.device)
    wt = w.double().T.contiguous()
    wt[f.dead.to(w.device)] = 0.0
    qt = torch.empty_like(wt)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wt[i1:i2]  # a view: updated in place
        err = torch.empty_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            x = w1[i]
            q = torch.copysign((x.abs() * inv_step[col]).add_(0.5).floor_().clamp_(max=qmax), x)
            qt[col] = q
            e = (x - q * step[col]).div_(u[col, col])
            w1[i + 1:].addr_(u[col, col + 1:i2], e, alpha=-1.0)
            err[i] = e
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1.0)
    return qt.T.to(torch.int8).contiguous(), scale, group_int


def transform_hessian(gram: torch.Tensor, total: torch.Tensor, rows: float,
                      shift: torch.Tensor | None, scale: torch.Tensor | None,
                      perm: torch.Tensor | None, block: int | None) -> torch.Tensor:
    """The Hessian of the inputs in a QuantLinear's basis, x' = ((x − δ)·D)·S·H, from the raw
    inputs' Σ xᵀx (``gram`` [K, K]), Σ x (``total`` [K]) and row count: float64 [K, K].
    Σ (x − δ)ᵀ(x − δ) = Σ xᵀx − δ·(Σ x)ᵀ − (Σ x)·δᵀ + rows·δ·δᵀ; then D on both sides; then
    Gᵀ·H·G with G = S·H (the rotation applied to rows and columns). Updated in place on one
    copy of ``gram``; the rotations hold two more K × K buffers at most."""
    h = gram.double().clone()
    if shift is not None:
        d, s = shift.double().to(h.device), total.double().to(h.device)
        h.addr_(d, s, alpha=-1).addr_(s, d, alpha=-1).addr_(d, d, alpha=rows)
    if scale is not None:
        c = scale.double().to(h.device)
        h.mul_(c[:, None]).mul_(c[None, :])
    perm = perm.to(h.device) if perm is not None else None
    h = rotate_ref(h, perm, block)  # H·G (each rebinding frees the previous buffer)
    h = h.T.contiguous()  # Gᵀ·H, H being symmetric
    return rotate_ref(h, perm, block)
