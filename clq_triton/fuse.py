"""Fused projections: the Linears that read one tensor (q/k/v of self-attention, k/v of
cross-attention, SD3/FLUX's context q/k/v) become one Linear with the concatenated outputs,
built by diffusers' own ``fuse_qkv_projections`` / ``Attention.fuse_projections``. A fused
layer quantized by patch() costs one activation pass and one wider GEMM instead of three."""

from __future__ import annotations

from torch import nn

# fused layer → the layers it replaces, which its attention module no longer calls
_REPLACED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
             "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


_SEGMENTS = "_clq_segments"  # attribute of a fused Linear: its parts' out_features


def segments(linear: nn.Module) -> tuple[int, ...]:
    """Out-features of the layers a fused Linear replaced, in its output order (q, k, v);
    () for any other layer. Calibration searches a weight clip per segment."""
    return getattr(linear, _SEGMENTS, ())


def _fused(module: nn.Module) -> bool:
    return getattr(module, "fused_projections", False)


def is_fused(model: nn.Module) -> bool:
    """Whether any attention module of ``model`` runs fused projections."""
    return any(_fused(m) for m in model.modules())


def fuse_projections(model: nn.Module) -> list[str]:
    """Fuse ``model``'s attention projections in place (function-preserving) and drop the
    unfused Linears, which no processor calls any more; returns the fused layers' names.

    Uses the model's ``fuse_qkv_projections()`` where it has one (PixArt, SD3, FLUX,
    CogVideoX, …); elsewhere every ``Attention`` running diffusers' default processor
    (``AttnProcessor2_0``, e.g. DiT's) is fused and given ``FusedAttnProcessor2_0``. Models
    with neither are left as they are (an empty list), and so is a model that is already
    fused (in part or whole)."""
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor2_0,
        FusedAttnProcessor2_0,
    )

    if is_fused(model):
        return []
    if callable(getattr(model, "fuse_qkv_projections", None)):
        model.fuse_qkv_projections()
    else:
        for m in model.modules():
            if isinstance(m, Attention) and type(m.processor) is AttnProcessor2_0:
                m.fuse_projections()
                m.set_processor(FusedAttnProcessor2_0())
    names = []
    for name, m in model.named_modules():
        if not _fused(m):
            continue
        for new, old in _REPLACED.items():
            lin = getattr(m, new, None)
            if isinstance(lin, nn.Linear):
                names.append(f"{name}.{new}" if name else new)
                parts = tuple(getattr(m, o).out_features for o in old
                              if isinstance(getattr(m, o, None), nn.Linear))
                if sum(parts) == lin.out_features:
                    setattr(lin, _SEGMENTS, parts)
                for o in old:
                    if hasattr(m, o):
                        delattr(m, o)
    return names
