"""Give a trained DiT the activation outliers of real DiTs without changing its FP function.

Real DiTs (PixArt, SD3, FLUX, OpenSora) carry two kinds of channel-wise outliers in the inputs
of their QKV / FC1 / attention-output linears, mostly put there by the adaLN modulation:
a few channels 10–100× larger than the rest (*scale outliers*) and large per-channel offsets,
the same in every token (*offset outliers*, the adaLN shift). The tiny toy DiT learned none.
:func:`add_outliers` puts both into a diffusers ``ada_norm_zero`` block (DiT) exactly:

- scale, QKV / FC1 input channel c: the adaLN rows of shift_c and scale_c are scaled so the
  modulated channel becomes α·x_c (``1 + s → α(1 + s)``, ``shift → α·shift``), and column c of
  the consumers (to_q, to_k, to_v or ff.net.0.proj) is divided by α;
- offset, QKV / FC1 input channel c: the adaLN shift bias gains δ_c (every token's x_c + δ_c)
  and the consumers' biases lose W[:, c]·δ_c;
- scale, attention-output input channel c: row c of to_v (and its bias) times α, column c of
  to_out.0 divided by α (attention is linear in V, channel by channel).

Every FP output stays the same up to float32 rounding (tests/test_outliers.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _modulation(block) -> tuple[nn.Linear, int]:
    norm = getattr(block, "norm1", None)
    lin = getattr(norm, "linear", None)
    if type(norm).__name__ != "AdaLayerNormZero" or not isinstance(lin, nn.Linear):
        raise TypeError("add_outliers expects diffusers BasicTransformerBlocks with "
                        f"norm_type='ada_norm_zero' (DiT), got {type(block).__name__}")
    dim = lin.out_features // 6
    return lin, dim


def _scale_input(mod: nn.Linear, shift_row: int, scale_row: int, consumers, c: int,
                 alpha: float) -> None:
    """Modulated channel c → α·x_c, consumers' column c / α."""
    w, b = mod.weight, mod.bias
    w[scale_row + c] *= alpha
    b[scale_row + c] = alpha * b[scale_row + c] + (alpha - 1.0)
    w[shift_row + c] *= alpha
    b[shift_row + c] *= alpha
    for lin in consumers:
        lin.weight[:, c] /= alpha


def _offset_input(mod: nn.Linear, shift_row: int, consumers, c: int, delta: float) -> None:
    """Modulated channel c → x_c + δ, consumers' bias − W[:, c]·δ."""
    mod.bias[shift_row + c] += delta
    for lin in consumers:
        lin.bias -= lin.weight[:, c] * delta


@torch.no_grad()
def add_outliers(model: nn.Module, scale_channels: int = 3, scale_range=(10.0, 100.0),
                 offset_channels: int = 4, offset_range=(10.0, 30.0), seed: int = 0) -> dict:
    """Put scale and offset outliers into every block of a diffusers DiT, in place (float32).

    Per block, ``scale_channels`` channels of each of the three inputs (attention QKV, FC1,
    attention output) are scaled by α drawn log-uniformly from ``scale_range``, and
    ``offset_channels`` other channels of the QKV and FC1 inputs get an offset δ of random sign
    and magnitude uniform in ``offset_range`` (the modulated activations have std ≈ 1).
    Channels differ per block and input, drawn with ``seed``.
    Returns {block index: {"qkv"|"fc1"|"out": {"scale": {c: α}, "offset": {c: δ}}}}.
    """
    gen = torch.Generator().manual_seed(seed)
    lo, hi = math.log(scale_range[0]), math.log(scale_range[1])
    report = {}
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError("add_outliers expects a diffusers DiT (transformer_blocks of "
                        f"norm_type='ada_norm_zero'), got {type(model).__name__}")
    for bi, block in enumerate(blocks):
        mod, dim = _modulation(block)
        attn, fc1, out = block.attn1, block.ff.net[0].proj, block.attn1.to_out[0]
        qkv = (attn.to_q, attn.to_k, attn.to_v)
        entry = {}
        # adaLN rows: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
        for key, shift_row, scale_row, consumers in (("qkv", 0, dim, qkv),
                                                     ("fc1", 3 * dim, 4 * dim, (fc1,))):
            chans = torch.randperm(dim, generator=gen)[:scale_channels + offset_channels]
            scales, offsets = {}, {}
            for c in chans[:scale_channels].tolist():
                alpha = math.exp(lo + (hi - lo) * float(torch.rand((), generator=gen)))
                _scale_input(mod, shift_row, scale_row, consumers, c, alpha)
                scales[c] = alpha
            for c in chans[scale_channels:].tolist():
                mag = offset_range[0] + (offset_range[1] - offset_range[0]) * float(
                    torch.rand((), generator=gen))
                delta = mag if bool(torch.rand((), generator=gen) < 0.5) else -mag
                _offset_input(mod, shift_row, consumers, c, delta)
                offsets[c] = delta
            entry[key] = {"scale": scales, "offset": offsets}
        scales = {}
        for c in torch.randperm(out.in_features, generator=gen)[:scale_channels].tolist():
            alpha = math.exp(lo + (hi - lo) * float(torch.rand((), generator=gen)))
            attn.to_v.weight[c] *= alpha
            if attn.to_v.bias is not None:
                attn.to_v.bias[c] *= alpha
            out.weight[:, c] /= alpha
            scales[c] = alpha
        entry["out"] = {"scale": scales, "offset": {}}
        report[bi] = entry
    return report
