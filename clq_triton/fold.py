"""Input permutations folded into the layer that produces the input.

CLQ permutes each layer's input channels (OBS's S) before its Hadamard rotation. On the GPU
that permutation is a gather in the activation pass: 2-byte loads, where an unpermuted input
is read 16 bytes per load (docs/gpu.md). When a layer's input is an elementwise function of
another quantized layer's output, the permutation can be applied offline to that layer's
output rows instead, and the second layer reads its input as it comes. In a DiT this is the
MLP, diffusers' ``FeedForward``: ``net[2](act(net[0].proj(x)))``, the layer with the widest
input of its block (4 × hidden). The folded model computes the same function: the GEMM of
the first layer computes each output column the same way wherever it sits, and the second
layer's channel shift, multiplier and low-rank branch are reordered with its input.

Gated activations (GEGLU, SwiGLU: the first layer's output is [hidden, gate], the activation
multiplies them channel by channel) reorder both halves alike.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant_linear import QuantLinear

# diffusers' FeedForward activations (models/activations.py): each holds its Linear as
# ``proj`` and computes act(proj(x)) channel by channel; the gated ones split proj's output
# into [hidden, gate] halves and return hidden · act(gate).
ELEMENTWISE = ("GELU", "ApproximateGELU", "LinearActivation")
GATED = ("GEGLU", "SwiGLU")


def mlp_pairs(model: nn.Module) -> list[tuple[str, str, bool]]:
    """(producer name, consumer name, gated) for every diffusers ``FeedForward`` in
    ``model`` whose two Linears are both QuantLinears: ``net.0.proj`` and the one Linear
    after it, with nothing but Dropout in between."""
    out = []
    for name, mod in model.named_modules():
        if type(mod).__name__ != "FeedForward" or not isinstance(getattr(mod, "net", None),
                                                                 nn.ModuleList):
            continue
        act, *rest = mod.net
        kind = type(act).__name__
        if kind not in ELEMENTWISE + GATED or not isinstance(getattr(act, "proj", None),
                                                            QuantLinear):
            continue
        linears = [i for i, m in enumerate(rest) if not isinstance(m, nn.Dropout)]
        if len(linears) != 1 or not isinstance(rest[linears[0]], QuantLinear):
            continue
        prefix = f"{name}.net" if name else "net"
        out.append((f"{prefix}.0.proj", f"{prefix}.{linears[0] + 1}", kind in GATED))
    return out


def fold_permutations(model: nn.Module) -> list[str]:
    """Move the input permutation of every :func:`mlp_pairs` consumer into its producer's
    output rows, in place; returns the consumers' names. Layers without a permutation, and
    producers whose rows cannot move (weight clips per output segment), are left as they are.
    Exact: the model computes the same function (same values up to the order in which the
    first layer's outputs are summed, which this does not change)."""
    folded = []
    for producer_name, consumer_name, gated in mlp_pairs(model):
        producer = model.get_submodule(producer_name)
        consumer = model.get_submodule(consumer_name)
        if consumer.perm is None or producer.config.w_clip_segments:
            continue
        rows = consumer.perm.to(producer.qweight.device, torch.long)
        if gated:
            half = consumer.in_features
            if producer.out_features != 2 * half:
                continue
            rows = torch.cat([rows, rows + half])
        elif producer.out_features != consumer.in_features:
            continue
        producer.permute_outputs(rows)
        consumer.take_permuted_input()
        folded.append(consumer_name)
    return folded
