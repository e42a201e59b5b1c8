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

Only what is known to be exact is folded: diffusers' own ``FeedForward`` class (by type, not
by name) with one of diffusers' own activations. Any other module of the same shape (a user
MLP, whose forward may normalize or mix channels between the two layers) is left as it is
and listed by :func:`unproven_mlps` (``PatchReport.unfolded``).

Gated activations (GEGLU, SwiGLU: the first layer's output is [hidden, gate], the activation
multiplies them channel by channel) reorder both halves alike.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant_linear import QuantLinear

# diffusers' FeedForward activations (models/activations.py), by class: each holds its
# Linear as ``proj`` and computes act(proj(x)) channel by channel; the gated ones split
# proj's output into [hidden, gate] halves and return hidden · act(gate).
ELEMENTWISE = ("GELU", "ApproximateGELU", "LinearActivation")
GATED = ("GEGLU", "SwiGLU")
# what LinearActivation may apply (diffusers.models.activations.get_activation's modules)
_POINTWISE = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU)


def _unproven(mod: nn.Module) -> str | None:
    """Why ``mod``, an MLP shaped like diffusers' FeedForward, is not known to compute
    net[-1](act(net[0].proj(x))) with an elementwise act; None when it is."""
    from diffusers.models import activations
    from diffusers.models.attention import FeedForward

    if type(mod) is not FeedForward or "forward" in vars(mod):
        return f"{type(mod).__module__}.{type(mod).__qualname__} is not diffusers' FeedForward"
    act = mod.net[0]
    if type(act) not in {getattr(activations, n) for n in ELEMENTWISE + GATED} or \
            "forward" in vars(act):
        return f"activation {type(act).__qualname__} is not one of diffusers' own"
    if type(act).__name__ == "LinearActivation" and \
            type(act.activation) not in _POINTWISE:
        return f"LinearActivation applies {type(act.activation).__qualname__}"
    return None


def _pairs(model: nn.Module):
    """(name, producer, consumer, gated, why not proven or None) for every module with a
    ``net`` ModuleList of act (holding a QuantLinear ``proj``), then one QuantLinear with
    nothing but Dropout around it."""
    for name, mod in model.named_modules():
        net = getattr(mod, "net", None)
        if not isinstance(net, nn.ModuleList) or not len(net):
            continue
        act, *rest = net
        linears = [i for i, m in enumerate(rest) if not isinstance(m, nn.Dropout)]
        if not isinstance(getattr(act, "proj", None), QuantLinear) or len(linears) != 1 or \
                not isinstance(rest[linears[0]], QuantLinear):
            continue
        prefix = f"{name}.net" if name else "net"
        yield (name, f"{prefix}.0.proj", f"{prefix}.{linears[0] + 1}",
               type(act).__name__ in GATED, _unproven(mod))


def mlp_pairs(model: nn.Module) -> list[tuple[str, str, bool]]:
    """(producer name, consumer name, gated) for every diffusers ``FeedForward`` (that class,
    with one of diffusers' activations: a computation known to be elementwise between the
    two) in ``model`` whose two Linears are both QuantLinears: ``net.0.proj`` and the one
    Linear after it, with nothing but Dropout in between."""
    return [(p, c, gated) for _, p, c, gated, why in _pairs(model) if why is None]


def unproven_mlps(model: nn.Module) -> dict[str, str]:
    """name → reason for the modules shaped like a FeedForward (``net`` = [activation with a
    quantized ``proj``, quantized Linear with a permutation]) that :func:`fold_permutations`
    leaves alone, since what their forward computes between the two layers is not known."""
    return {name: why for name, _, consumer, _, why in _pairs(model)
            if why is not None and model.get_submodule(consumer).perm is not None}


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
