"""Calibrated quantization (methods.Calibrated: CLQ, SmoothQuant), block by block.

Blocks are processed in execution order. For block i:
1. CBC: its recorded inputs come from running the model with blocks 0..i-1 already quantized
   (with ``cbc=False`` they come from the full-precision model).
2. Per-channel max |x| of every Linear input in the block (full-precision block on those
   inputs) gives the method's channel transform (CLQ's OBS permutation, SmoothQuant's D).
3. CLPS (CLQ with ``clps``): each Linear in turn (in module order, earlier ones already
   quantized) tries every (w_clip, a_clip) on the grid and keeps the pair with the least
   squared error at the target: the block's output vs the full-precision model's ("block"),
   the transformer's final output ("output"), or the layer's own output ("layer").
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import block_inputs, block_outputs, find_blocks, output_tensors, run_block, run_model
from .capture import CalibrationData
from .config import QuantConfig
from .methods import Calibrated
from .quant_linear import QuantLinear
from .smoothing import ChannelMax

def _sq_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return sum(float((g.float().cpu() - w.float()).pow(2).sum()) for g, w in zip(got, want))


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def calibrate(
    model: nn.Module,
    data: CalibrationData,
    layers: list[tuple[str, nn.Linear, QuantConfig]],
    method: Calibrated,
    progress: bool = True,
) -> dict[str, QuantLinear]:
    """Quantize ``layers`` (name, Linear, its config from ``method.layer_config``) of
    ``model`` in place with ``method``; returns name → installed QuantLinear."""
    if not len(data):
        raise ValueError("calibration data is empty")
    device = next(model.parameters()).device
    blocks = find_blocks(model, data.samples[0], device)
    by_block = {bname: [(n, lin, cfg) for n, lin, cfg in layers
                        if n == bname or n.startswith(bname + ".")] for bname, _ in blocks}
    in_blocks = {n for todo in by_block.values() for n, _, _ in todo}
    outside = [n for n, _, _ in layers if n not in in_blocks]
    if outside:
        raise ValueError(f"calibrated methods quantize layers inside blocks only; outside: {outside}")
    search = method.search
    target = method.clps_target if search else None
    fp_outs = fp_final = None
    if target in ("block", "output"):
        fp_outs, fp_final = block_outputs(model, [b for _, b in blocks], data, device)
    done: dict[str, QuantLinear] = {}
    pending: list[tuple[str, QuantLinear]] = []
    for bi, (bname, block) in enumerate(tqdm(blocks, desc=f"calibrate {method.name}",
                                             disable=not progress)):
        todo = by_block[bname]
        if not todo:
            continue
        calls = block_inputs(model, block, data, device)
        stats = ChannelMax({n: lin for n, lin, _ in todo})
        layer_x: dict[str, list[torch.Tensor]] = {n: [] for n, _, _ in todo}
        grab = [lin.register_forward_pre_hook(lambda m, a, n=n: layer_x[n].append(a[0].cpu()))
                for n, lin, _ in todo] if target == "layer" else []
        try:
            for call in calls:
                run_block(block, call, device)
        finally:
            stats.close()
            for h in grab:
                h.remove()

        def target_error() -> float:
            if target == "block":  # fetched by name: the block may be the layer
                current = model.get_submodule(bname)
                return sum(_sq_err(run_block(current, c, device), fp_outs[bi][s])
                           for s, c in enumerate(calls))
            return sum(_sq_err(output_tensors(run_model(model, smp, device)), fp_final[s])
                       for s, smp in enumerate(data.samples))

        for name, lin, cfg in todo:
            perm, cs = method.channel_transform(stats.amax[name], lin, cfg)
            if not search:
                q = QuantLinear.from_linear(lin, cfg, perm, cs)
            elif target == "layer":
                q = _search_layer(lin, cfg, perm, cs, layer_x[name], method, device)
            else:
                q = _search(model, name, lin, cfg, perm, cs, method, target_error)
            set_submodule(model, name, q)
            done[name] = q
        if not method.cbc:  # later blocks must see full-precision inputs: install at the end
            for name, lin, _ in todo:
                pending.append((name, done[name]))
                set_submodule(model, name, lin)
    for name, q in pending:
        set_submodule(model, name, q)
    return done


def _best_clips(lin, cfg, perm, cs, method, error) -> QuantLinear:
    """Try every (w_clip, a_clip) on the grid; ``error(q)`` scores a candidate QuantLinear.
    Returns the layer quantized with the best pair (ties keep the earlier pair)."""
    best = (float("inf"), 1.0, 1.0)
    for wc in method.w_clip_grid:
        q = QuantLinear.from_linear(lin, cfg.replace(w_clip=wc), perm, cs)
        for ac in method.a_clip_grid:
            q.config = cfg.replace(w_clip=wc, a_clip=ac)
            err = error(q)
            if err < best[0]:
                best = (err, wc, ac)
    return QuantLinear.from_linear(lin, cfg.replace(w_clip=best[1], a_clip=best[2]), perm, cs)


def _search(model, name, lin, cfg, perm, cs, method, target_error) -> QuantLinear:
    """CLPS at a downstream target: the candidate is installed, the model/block replayed."""
    def error(q):
        set_submodule(model, name, q)
        return target_error()

    try:
        return _best_clips(lin, cfg, perm, cs, method, error)
    finally:
        set_submodule(model, name, lin)


def _search_layer(lin, cfg, perm, cs, xs, method, device) -> QuantLinear:
    """The local baseline: error at the layer's own output on its recorded inputs."""
    with torch.no_grad():
        want = [lin(x.to(device)) for x in xs]
        return _best_clips(lin, cfg, perm, cs, method,
                           lambda q: _sq_err([q(x.to(device)) for x in xs], want))
