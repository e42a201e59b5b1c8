"""Per-channel statistics and the channel transforms built from them: the OBS permutation
(CLQ) and the SmoothQuant diagonal."""

from __future__ import annotations

import torch
from torch import nn


class ChannelMax:
    """Running max |x| per input channel of a set of Linears, fed by forward pre-hooks."""

    def __init__(self, layers: dict[str, nn.Linear]):
        self.amax = {n: torch.zeros(m.in_features) for n, m in layers.items()}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach()
            m = x.reshape(-1, x.shape[-1]).abs().float().amax(0).cpu()
            self.amax[name] = torch.maximum(self.amax[name], torch.nan_to_num(m))
        return hook

    def close(self):
        for h in self._handles:
            h.remove()


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
