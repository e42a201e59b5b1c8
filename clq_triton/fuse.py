"""Fused projections: the Linears that read one tensor (q/k/v of self-attention, k/v of
cross-attention, SD3/FLUX's context q/k/v) become one Linear with the concatenated outputs,
built by diffusers' own ``fuse_qkv_projections`` / ``Attention.fuse_projections``. A fused
layer quantized by patch() costs one activation pass and one wider GEMM instead of three.

Where a block calls two such layers from its own code rather than its attention's (FLUX's
single blocks: ``proj_mlp`` and ``attn.to_qkv`` on the same normalized input), one Linear
``to_qkv_mlp`` of the block computes both, and :class:`SharedOutput` modules stand in for
the two: the first called runs the shared layer, the other takes its slice of that output."""

from __future__ import annotations

import inspect
import re
import sys
import warnings

import torch
from torch import nn

FUSION_VERSION = 2  # checkpoints' "fused_projections": 1 (True) = diffusers' fusion only

# fused layer → the layers it replaces, which its attention module no longer calls
_REPLACED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
             "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
             "to_added_kv": ("add_k_proj", "add_v_proj")}  # Wan I2V's image k/v


# fused layers whose replaced layers the processor still tests (Wan's ``attn.add_k_proj is
# not None`` marks image cross-attention): those stay as weightless :class:`Replaced`
_KEPT_AS_FLAGS = ("to_added_kv",)


class Replaced(nn.Module):
    """Stands where a layer was that a fused layer replaced and no processor calls (it
    holds no weights, so nothing quantizes or stores it); calling it raises."""

    def __init__(self, by: str):
        super().__init__()
        self.by = by

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"this layer was fused into {self.by}; call that instead")

    def extra_repr(self) -> str:
        return f"fused into {self.by}"


_SEGMENTS = "_clq_segments"  # attribute of a fused Linear: its parts' out_features


def segments(linear: nn.Module) -> tuple[int, ...]:
    """Out-features of the layers a fused Linear replaced, in its output order (q, k, v);
    () for any other layer. Calibration searches a weight clip per segment."""
    return getattr(linear, _SEGMENTS, ())


class _Stash:
    """The shared layer's last output, kept until every user has taken its slice."""

    __slots__ = ("x", "layer", "y", "left")

    def __init__(self):
        self.x = self.layer = self.y = None
        self.left = 0


class _DropStash:
    """Forward hook of the block that owns a shared layer: drops what a user left kept when
    the other was not called (e.g. attention skipped by a cache), so nothing outlives the
    block's forward."""

    def __init__(self, stash: _Stash):
        self.stash = stash

    def __call__(self, module, args, output):
        s = self.stash
        s.x = s.layer = s.y = None
        s.left = 0


class SharedOutput(nn.Module):
    """Stands in for one of the Linears a shared layer replaced: x → columns [start, stop) of
    ``getattr(owner, name)(x)`` (looked up per call, so a quantized layer swapped in is used).

    The first of the ``users`` called on a tensor runs the shared layer and keeps its output;
    the others, called on the same tensor object and layer, take their slice of it, and the
    last of them drops it. Any other input runs the layer again, so the result is always the
    shared layer's on this input (the input must not be changed in place between the calls).
    Traced by ``torch.compile(fullgraph=True)`` as one call."""

    def __init__(self, owner: nn.Module, name: str, start: int, stop: int, stash: _Stash,
                 users: int):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a child: the layer has one place
        self.name, self.start, self.stop, self.users = name, start, stop, users
        self._stash = stash

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, s = getattr(self._owner, self.name), self._stash
        if s.x is x and s.layer is layer:
            y = s.y
            s.left -= 1
            if s.left <= 0:
                s.x = s.layer = s.y = None
        else:
            y = layer(x)
            s.x, s.layer, s.y, s.left = x, layer, y, self.users - 1
        return y[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"{self.name}[..., {self.start}:{self.stop}]"


def _concat(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear with the rows of ``linears`` stacked (a missing bias counts as zeros)."""
    w = torch.cat([lin.weight.detach() for lin in linears])
    biased = any(lin.bias is not None for lin in linears)
    out = nn.Linear(w.shape[1], w.shape[0], bias=biased, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if biased:
            out.bias.copy_(torch.cat([
                lin.bias.detach() if lin.bias is not None else
                torch.zeros(lin.out_features, device=w.device, dtype=w.dtype)
                for lin in linears]))
    return out


def _share_block_inputs(model: nn.Module, names: list[str]) -> None:
    """FLUX single blocks: ``proj_mlp`` and the fused ``attn.to_qkv`` (same input size) become
    ``to_qkv_mlp`` with two :class:`SharedOutput`; ``names`` (of the fused layers) is
    updated."""
    def pair(block):
        mlp, attn = getattr(block, "proj_mlp", None), getattr(block, "attn", None)
        qkv = getattr(attn, "to_qkv", None)
        ok = type(mlp) is nn.Linear and type(qkv) is nn.Linear and \
            mlp.in_features == qkv.in_features
        return (mlp, attn, qkv) if ok else None

    for name, block, (mlp, attn, qkv) in [(n, b, p) for n, b in model.named_modules()
                                          if (p := pair(b))]:
        shared = _concat([qkv, mlp])
        setattr(shared, _SEGMENTS, (segments(qkv) or (qkv.out_features,)) + (mlp.out_features,))
        block.to_qkv_mlp = shared
        stash, n = _Stash(), qkv.out_features
        attn.to_qkv = SharedOutput(block, "to_qkv_mlp", 0, n, stash, users=2)
        block.proj_mlp = SharedOutput(block, "to_qkv_mlp", n, shared.out_features, stash, 2)
        block.register_forward_hook(_DropStash(stash))
        prefix = f"{name}." if name else ""
        if prefix + "attn.to_qkv" in names:
            names.remove(prefix + "attn.to_qkv")
        names.append(prefix + "to_qkv_mlp")


def _fused(module: nn.Module) -> bool:
    return getattr(module, "fused_projections", False)


def reads_fused(processor) -> bool:
    """Whether an attention ``processor`` computes q/k/v with the fused layer once its
    attention is fused: diffusers' ``Fused*`` processors, and those whose ``__call__``
    dispatches on ``attn.fused_projections`` itself or through a helper of its module
    (FLUX's and Wan's ``_get_qkv_projections``). Others (LTX-Video's) call ``to_q`` /
    ``to_k`` / ``to_v`` whatever the fusion."""
    cls = type(processor)
    if cls.__name__.startswith("Fused"):
        return True
    try:
        src = inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False
    module = sys.modules.get(cls.__module__)
    helpers = [getattr(module, f, None) for f in re.findall(r"\b(_\w+)\(", src)]
    return "fused_projections" in src or any(
        inspect.isfunction(f) and "fused_projections" in inspect.getsource(f) for f in helpers)


def _unfuse(module: nn.Module) -> None:
    """Drop the fused layers diffusers added to ``module`` (its unfused ones are still there)."""
    for new in _REPLACED:
        if isinstance(getattr(module, new, None), nn.Linear):
            delattr(module, new)
    module.fused_projections = False


def _cannot_unfuse(*args, **kwargs):
    raise RuntimeError(
        "clq_triton fused this model's projections and dropped the unfused layers "
        "(to_q, to_k, to_v, ...), so they cannot be unfused; load the model again for "
        "unfused projections")


class FusionUndo:
    """What :func:`fuse_projections` may change in ``model`` (each module's children,
    processor and flags), put back by :meth:`restore`; the layers it drops wait on the CPU
    (:meth:`offload`) so that a GPU holds one copy of the projections."""

    def __init__(self, model: nn.Module):
        self._saved = [(m, dict(m._modules), dict(m._forward_hooks),
                        {k: v for k, v in vars(m).items() if not k.startswith("_")})
                       for m in model.modules()]
        self._model, self._moved = model, []

    def offload(self) -> None:
        live = set(map(id, self._model.modules()))
        for _, children, _, _ in self._saved:
            for child in children.values():
                if child is not None and id(child) not in live and \
                        not any(c is child for c, _ in self._moved):
                    device = next(iter(child.parameters()), torch.empty(0)).device
                    self._moved.append((child.to("cpu"), device))

    def restore(self) -> None:
        for child, device in self._moved:
            child.to(device)
        for m, children, hooks, attrs in self._saved:
            m._modules.clear()
            m._modules.update(children)
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)
            for k in [k for k in vars(m) if not k.startswith("_") and k not in attrs]:
                delattr(m, k)
            vars(m).update(attrs)


def is_fused(model: nn.Module) -> bool:
    """Whether any attention module of ``model`` runs fused projections."""
    return any(_fused(m) for m in model.modules())


def fusion_version(model: nn.Module) -> int:
    """How ``model``'s projections are fused: 0 not at all, 1 diffusers' fusion only, 2 with
    shared-input layers as well (:data:`FUSION_VERSION`); recorded in checkpoints."""
    if not is_fused(model):
        return 0
    return FUSION_VERSION if any(isinstance(m, SharedOutput) for m in model.modules()) else 1


def fuse_projections(model: nn.Module, shared_inputs: bool = True) -> list[str]:
    """Fuse ``model``'s attention projections in place (function-preserving) and drop the
    unfused Linears, which no processor calls any more; returns the fused layers' names.
    ``shared_inputs``: also give FLUX single blocks one ``to_qkv_mlp`` (module docstring);
    False: diffusers' fusion only (checkpoints of fusion version 1).

    Uses the model's ``fuse_qkv_projections()`` where it has one (PixArt, SD3, FLUX,
    CogVideoX, …); elsewhere every ``Attention`` running diffusers' default processor
    (``AttnProcessor2_0``, e.g. DiT's) is fused and given ``FusedAttnProcessor2_0``. Models
    with neither are left as they are (an empty list). A model already fused (by diffusers'
    ``fuse_qkv_projections()``) only loses its unused unfused layers. An attention whose
    processor does not read the fused layer (:func:`reads_fused`, e.g. LTX-Video's) is left
    unfused, with a warning. The model's ``unfuse_qkv_projections()`` then raises (the
    unfused layers are gone)."""
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor2_0,
        FusedAttnProcessor2_0,
    )

    if not is_fused(model):
        if callable(getattr(model, "fuse_qkv_projections", None)):
            model.fuse_qkv_projections()
        else:
            for m in model.modules():
                if isinstance(m, Attention) and type(m.processor) is AttnProcessor2_0:
                    m.fuse_projections()
                    m.set_processor(FusedAttnProcessor2_0())
    names, unfused = [], set()
    for name, m in model.named_modules():
        if not _fused(m):
            continue
        if not reads_fused(getattr(m, "processor", None)):
            _unfuse(m)
            unfused.add(type(m.processor).__name__)
            continue
        for new, old in _REPLACED.items():
            lin = getattr(m, new, None)
            olds = [o for o in old if isinstance(getattr(m, o, None), nn.Linear)]
            if isinstance(lin, nn.Linear) and olds:  # not yet done
                names.append(f"{name}.{new}" if name else new)
                parts = tuple(getattr(m, o).out_features for o in olds)
                if sum(parts) == lin.out_features:
                    setattr(lin, _SEGMENTS, parts)
                for o in olds:
                    if new in _KEPT_AS_FLAGS:
                        setattr(m, o, Replaced(new))
                    else:
                        delattr(m, o)
    if unfused:
        warnings.warn(f"fuse_projections: attention modules with {sorted(unfused)} compute "
                      "q/k/v from the unfused layers: left unfused", stacklevel=3)
    if shared_inputs:
        _share_block_inputs(model, names)
    if names:
        model.unfuse_qkv_projections = _cannot_unfuse
    return names
