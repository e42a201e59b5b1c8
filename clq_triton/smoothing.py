"""Per-channel statistics and the channel transforms built from them: the OBS permutation
(CLQ) and the SmoothQuant diagonal (CLQ's shift is the channel mean, ChannelRange.mean)."""

from __future__ import annotations

import torch
from torch import nn


class ChannelRange:
    """Running min, max and mean per input channel of a set of Linears, fed by forward
    pre-hooks (non-finite values are left out).

    After :meth:`close`: ``lo[name]`` / ``hi[name]`` / ``mean[name]`` float32 [K] (0 for
    channels never seen finite); ``amax(name)`` = max |x| per channel."""

    def __init__(self, layers: dict[str, nn.Linear]):
        self.lo = {n: torch.full((m.in_features,), float("inf")) for n, m in layers.items()}
        self.hi = {n: torch.full((m.in_features,), -float("inf")) for n, m in layers.items()}
        self._sum = {n: torch.zeros(m.in_features, dtype=torch.float64)
                     for n, m in layers.items()}
        self._count = {n: torch.zeros(m.in_features, dtype=torch.float64)
                       for n, m in layers.items()}
        self.mean: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            ok = torch.isfinite(x)
            lo = torch.where(ok, x, float("inf")).amin(0).cpu()
            hi = torch.where(ok, x, -float("inf")).amax(0).cpu()
            self.lo[name] = torch.minimum(self.lo[name], lo)
            self.hi[name] = torch.maximum(self.hi[name], hi)
            self._sum[name] += torch.where(ok, x, 0.0).double().sum(0).cpu()
            self._count[name] += ok.double().sum(0).cpu()
        return hook

    def close(self):
        for h in self._handles:
            h.remove()
        for d in (self.lo, self.hi):
            for n, v in d.items():
                d[n] = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
        self.mean = {n: (self._sum[n] / self._count[n].clamp(min=1)).float() for n in self.lo}

    def amax(self, name: str) -> torch.Tensor:
        return abs_max(self.lo[name], self.hi[name])


def abs_max(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """max |x| per channel from its min ``lo`` and max ``hi``."""
    return torch.maximum(lo.abs(), hi.abs())


def outlier_permutation(score: torch.Tensor, block: int) -> torch.Tensor:
    """OBS permutation S: channels sorted by outlier score and dealt round-robin over the
    K // block Hadamard blocks, so every block gets an even share of the outliers.

    score: [K] (e.g. max |x| per channel). Returns int32 perm [K] with perm[j] = source channel.
    """
    k = score.numel()
    n_blocks = k // block
    order = torch.argsort(score.float(), descending=True, stable=True)
    rank = torch.arange(k)
    position = (rank % n_blocks) * block + rank // n_blocks
    perm = torch.empty(k, dtype=torch.int64)
    perm[position] = order
    return perm.to(torch.int32)


def smoothquant_scale(x_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's activation multiplier 1/s with s_c = max|X_c|^α / max|W_c|^(1-α).

    Returns float32 [K]; channels never seen non-zero (or with zero weight) keep 1."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_alpha must be in [0, 1], got {alpha!r}")
    w_amax = weight.detach().abs().float().amax(0).cpu()
    s = x_amax.float().pow(alpha) / w_amax.pow(1 - alpha)
    ok = torch.isfinite(s) & (s > 0)
    s = torch.where(ok, s, torch.ones_like(s)).clamp(1e-4, 1e4)
    return (1.0 / s).to(torch.float32)
