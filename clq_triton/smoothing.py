"""Per-channel statistics and the channel transforms built from them: the OBS permutation
(CLQ) and the SmoothQuant diagonal (CLQ's shift is the channel mean, ChannelRange.mean)."""

from __future__ import annotations

import torch
from torch import nn


class ChannelRange:
    """Running min, max and mean per input channel of a set of Linears, fed by forward
    pre-hooks (non-finite values are left out).

    The running values live on the inputs' device and are reduced there (no copy or sync
    per call; sums in float64 without a float64 copy of x); :meth:`close` moves them to the
    CPU once. After it: ``lo[name]`` / ``hi[name]`` / ``mean[name]`` float32 [K] on the CPU
    (0 for channels never seen finite); ``amax(name)`` = max |x| per channel."""

    def __init__(self, layers: dict[str, nn.Linear], gram: bool = False):
        self._k = {n: m.in_features for n, m in layers.items()}
        self._acc: dict[str, list[torch.Tensor]] = {}  # name → [lo, hi, sum, count]
        self._gram = gram
        self.lo: dict[str, torch.Tensor] = {}
        self.hi: dict[str, torch.Tensor] = {}
        self.mean: dict[str, torch.Tensor] = {}
        # with ``gram`` (for GPTQ): Σ xᵀx float64 [K, K] and Σ x float64 [K] (non-finite
        # values as 0, on the inputs' device) and the number of rows (0, and no Σ xᵀx, for a
        # layer never called)
        self.gram: dict[str, torch.Tensor] = {}
        self.total: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if x.shape[0] == 0:  # a call with no rows (e.g. an empty text context) adds nothing
                return
            ok = torch.isfinite(x)
            lo = torch.where(ok, x, float("inf")).amin(0).float()
            hi = torch.where(ok, x, -float("inf")).amax(0).float()
            xz = torch.where(ok, x, 0)
            total = xz.sum(0, dtype=torch.float64)
            count = ok.sum(0, dtype=torch.float64)
            acc = self._acc.get(name)
            if acc is None:
                self._acc[name] = [lo, hi, total, count]
            else:
                torch.minimum(acc[0], lo, out=acc[0])
                torch.maximum(acc[1], hi, out=acc[1])
                acc[2] += total
                acc[3] += count
            if self._gram:
                # float64: a channel offset of 200 against a spread of 1 (a DiT's adaLN
                # shift) leaves a raw float32 Gram nothing of the spread once the mean is
                # subtracted, and GPTQ's Hessian is then not positive definite
                xd = xz.double()
                g = xd.T @ xd
                self.gram[name] = self.gram[name] + g if name in self.gram else g
                self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        return hook

    def close(self):
        for h in self._handles:
            h.remove()
        for n, k in self._k.items():
            lo, hi, total, count = (t.cpu() for t in self._acc[n]) if n in self._acc else (
                torch.zeros(k), torch.zeros(k), torch.zeros(k, dtype=torch.float64),
                torch.zeros(k, dtype=torch.float64))
            self.lo[n] = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
            self.hi[n] = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
            self.mean[n] = (total / count.clamp(min=1)).float()
            self.total[n] = total
            if self._gram and n not in self.gram:  # a layer its block never called
                self.rows[n] = 0
        self._acc.clear()

    def amax(self, name: str) -> torch.Tensor:
        return abs_max(self.lo[name], self.hi[name])


def abs_max(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """max |x| per channel from its min ``lo`` and max ``hi``."""
    return torch.maximum(lo.abs(), hi.abs())


def outlier_permutation(score: torch.Tensor, block: int, run: int = 1) -> torch.Tensor:
    """OBS permutation S: channels — or aligned runs of ``run`` channels, ranked by their
    highest outlier score — sorted by outlier score and dealt round-robin over the K // block
    Hadamard blocks, so every block gets an even share of the outliers. With ``run`` = 8 the
    channels of a run stay together and in order, and the activation kernel reads each run
    16 bytes at a time (kernels.hadamard.find_perm_runs; CLQ(perm_run=8)). Runs fall back to
    single channels where K or the block is not a multiple of ``run``.

    score: [K] (e.g. max |x| per channel). Returns int32 perm [K] with perm[j] = source channel.
    """
    k = score.numel()
    if k % run or block % run:
        run = 1
    n_blocks = k // block
    order = torch.argsort(score.float().reshape(-1, run).amax(1), descending=True, stable=True)
    rank = torch.arange(k // run)
    start = (rank % n_blocks) * block + (rank // n_blocks) * run
    lanes = torch.arange(run)
    perm = torch.empty(k, dtype=torch.int64)
    perm[(start[:, None] + lanes).flatten()] = (order[:, None] * run + lanes).flatten()
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
