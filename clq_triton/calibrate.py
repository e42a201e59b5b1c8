"""Calibrated quantization (methods.Calibrated: CLQ, SmoothQuant), block by block.

Blocks are processed in execution order; the calibration samples' block inputs are carried
forward from block to block (stream.BlockStream: O(L) block runs, a replay of the model only
where a block's call does not follow from the previous block's). For block i:
1. CBC: its inputs come from the model with blocks 0..i-1 already quantized (the quantized
   stream); with ``cbc=False`` from the full-precision model (the FP stream).
2. Per-channel max |x| of every Linear input in the block (full-precision block on those
   inputs) gives the method's channel transform (CLQ's OBS, SmoothQuant's D).
3. CLPS (CLQ with ``clps``): each Linear in turn (in module order, earlier ones already
   quantized) tries every (w_clip, a_clip) on the grid and keeps the pair with the least
   squared error at the target vs the full-precision model: the block's output ("block"),
   the output of the block d blocks later where the layer's own error peaks ("depth"), the
   transformer's final output ("output"), or the layer's own output ("layer"). A fused
   layer (q/k/v as one) then refines its weight clip per output segment.
FP block outputs are computed per block from the FP stream, never held for all blocks.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import find_blocks, output_tensors, run_block, run_model
from .capture import CalibrationData, to_device
from .config import QuantConfig
from .fuse import segments
from .gptq import factor_hessian, transform_hessian
from .methods import Calibrated
from .quant_linear import QuantLinear
from .smoothing import ChannelRange
from .stream import BlockStream, Link, block_links, current_blocks
from .swap import Originals, set_submodule


def _sq_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> torch.Tensor:
    """Σ (g − w)² over paired tensors, reduced on the device of ``got`` (0-d float64): callers
    read one scalar per candidate, not one per tensor."""
    return sum(((g.float() - w.to(g.device).float()).pow(2).sum(dtype=torch.float64)
                for g, w in zip(got, want)), torch.zeros((), dtype=torch.float64))


def reach(links: list[Link | None], start: int, depth: int) -> int:
    """How many blocks past ``start`` (at most ``depth``) the links lead without a gap."""
    d = 0
    while d < depth and start + d < len(links) and links[start + d] is not None:
        d += 1
    return d


def run_blocks(blocks, links, start: int, calls, depth: int, device, cpu: bool = True):
    """outs[d][s]: output tensors of blocks[start + d] for call s, d = 0..depth, running each
    block as it is now and building each next call through its link. ``cpu``: the outputs
    are moved to the CPU (to be held); False leaves them on ``device`` (to be scored)."""
    by_depth = []
    for d in range(depth + 1):
        outs = [[t.cpu() if cpu else t for t in run_block(blocks[start + d], c, device)]
                for c in calls]
        by_depth.append(outs)
        if d < depth:
            link = links[start + d]
            calls = [link.next_call(c, o) for c, o in zip(calls, outs)]
    return by_depth


def calibrate(
    model: nn.Module,
    data: CalibrationData,
    layers: list[tuple[str, nn.Linear, QuantConfig]],
    method: Calibrated,
    progress: bool = True,
    depths: dict[str, int] | None = None,
    originals: Originals | None = None,
) -> dict[str, QuantLinear]:
    """Quantize ``layers`` (name, Linear, its config from ``method.layer_config``) of
    ``model`` in place with ``method``; returns name → installed QuantLinear.
    ``depths``: filled with name → the target depth CLPS chose (``clps_target="depth"``).
    ``originals``: where the replaced Linears are kept (patch() rolls back through it)."""
    if not len(data):
        raise ValueError("calibration data is empty")
    originals = Originals(model) if originals is None else originals
    device = next(model.parameters()).device
    counts: dict[str, int] = {}
    named = find_blocks(model, data.samples[0], device, counts)
    names, blocks = [n for n, _ in named], [b for _, b in named]
    repeated = {n for n in names if counts[n] > 1}
    if repeated:
        warnings.warn(
            "block(s) called more than once per forward: "
            + ", ".join(f"{n} ({counts[n]}×)" for n in names if n in repeated)
            + "; each is calibrated on all of its calls (its inputs come from replaying the "
            "model, not carried from the previous block)", stacklevel=3)
    by_block = {bname: [(n, lin, cfg) for n, lin, cfg in layers
                        if n == bname or n.startswith(bname + ".")] for bname in names}
    in_blocks = {n for todo in by_block.values() for n, _, _ in todo}
    outside = [n for n, _, _ in layers if n not in in_blocks]
    if outside:
        raise ValueError("calibrated methods quantize layers inside blocks only; "
                         f"outside: {outside}")
    target = method.clps_target if method.search else None
    links = [None if link is None or {names[i], names[i + 1]} & repeated else link
             for i, link in enumerate(block_links(model, blocks, data.samples[0], device))]
    cbc = method.cbc
    fp_final = None
    if target == "output":
        fp_final = [[t.cpu() for t in output_tensors(run_model(model, s, device))]
                    for s in data.samples]
    # The quantized stream follows the live model; the FP stream's replays (where a link is
    # missing) see the model with the replaced layers lent back in full precision.
    q_stream = BlockStream(model, names, links, data, device, repeated) if cbc else None
    fp_stream = None
    if not cbc or target in ("block", "depth"):
        fp_stream = BlockStream(model, names, links, data, device, repeated,
                                fp_view=originals.fp_view)
    done: dict[str, QuantLinear] = {}
    pending: list[tuple[str, nn.Linear]] = []
    for bi, bname in enumerate(tqdm(names, desc=f"calibrate {method.name}",
                                    disable=not progress)):
        todo = by_block[bname]
        # FP outputs of this block (and, for "depth", of the next ones): blocks bi.. are FP now
        fp_deep = None
        if fp_stream is not None:
            depth = reach(links, bi, method.clps_depth) if target == "depth" else 0
            fp_deep = run_blocks(fp_stream.blocks, links, bi, fp_stream.calls, depth, device)
        if todo:
            calls = q_stream.calls if cbc else fp_stream.calls
            _calibrate_block(model, names, todo, calls, method, target, links, bi, fp_deep,
                             fp_final, data, device, done, depths)
            for name, lin, _ in todo:
                if cbc:
                    originals.install(name, lin, done[name])
                else:  # later blocks must see full-precision inputs: install at the end
                    pending.append((name, lin))
                    set_submodule(model, name, lin)
        if bi + 1 < len(blocks):
            if q_stream is not None:
                q_stream.advance()  # runs block bi as it is now: quantized
            if fp_stream is not None:
                fp_stream.advance(fp_deep[0])
    for name, lin in pending:
        originals.install(name, lin, done[name])
    return done


def _calibrate_block(model, names, todo, calls, method, target, links, bi, fp_deep,
                     fp_final, data, device, done, depths) -> None:
    """Quantize the Linears ``todo`` of block ``names[bi]`` on its ``calls``."""

    def blocks():  # by name: the block may be the layer, replaced by a candidate
        return current_blocks(model, names)

    # the block's calls and FP targets stay on the device while it is calibrated: every
    # candidate runs on them, and its error is reduced there to one scalar
    calls = to_device(calls, device)
    if fp_deep is not None:
        fp_deep = to_device(fp_deep, device)
    stats = ChannelRange({n: lin for n, lin, _ in todo}, gram=method.gptq)
    layer_x: dict[str, list[torch.Tensor]] = {n: [] for n, _, _ in todo}
    grab = [lin.register_forward_pre_hook(lambda m, a, n=n: layer_x[n].append(a[0].cpu()))
            for n, lin, _ in todo] if target == "layer" else []
    try:
        for call in calls:
            run_block(model.get_submodule(names[bi]), call, device)
    finally:
        stats.close()
        for h in grab:
            h.remove()

    def error_at(depth: int):
        """Squared error vs the FP model at block bi + depth, the live model as it is now."""
        got = run_blocks(blocks(), links, bi, calls, depth, device, cpu=False)[depth]
        return float(sum(_sq_err(g, w) for g, w in zip(got, fp_deep[depth])))

    def output_error():
        return float(sum(_sq_err(output_tensors(run_model(model, smp, device)), fp_final[s])
                         for s, smp in enumerate(data.samples)))

    for name, lin, cfg in todo:
        tf = method.channel_transform(stats.lo[name], stats.hi[name], stats.mean[name], lin,
                                      cfg)
        if method.gptq and stats.rows[name]:  # a layer its block never called: RTN
            # factored once here: every clip candidate and segment reuses the factor
            try:
                tf = dataclasses.replace(tf, hessian=factor_hessian(transform_hessian(
                    stats.gram[name], stats.total[name], stats.rows[name], tf.shift, tf.scale,
                    tf.perm, cfg.hadamard_block), overwrite=True))
            except (ValueError, torch.linalg.LinAlgError) as e:
                raise ValueError(f"GPTQ on layer {name}: {e}") from e
        if target is None:
            q = _quantize(lin, cfg, tf)
        elif target == "layer":
            q = _search_layer(lin, cfg, tf, layer_x[name], method, device)
        elif target == "output":
            q = _search(model, name, lin, cfg, tf, method, output_error)
        else:
            depth = 0
            if target == "depth":
                depth = _peak_depth(model, name, lin, cfg, tf, blocks, links, bi, calls,
                                    len(fp_deep) - 1, device)
                if depths is not None:
                    depths[name] = depth
            q = _search(model, name, lin, cfg, tf, method, lambda: error_at(depth))
        set_submodule(model, name, q)
        done[name] = q


def _peak_depth(model, name, lin, cfg, tf, blocks, links, bi, calls, max_depth, device) -> int:
    """CLPS's target depth: the number of blocks after the layer's own at which the squared
    error its quantization (clips 1.0) causes is largest (the error-versus-depth curve's
    peak) — measured against the same model with the layer in full precision, at block
    outputs 0..max_depth."""
    if max_depth == 0:
        return 0
    clean = run_blocks(blocks(), links, bi, calls, max_depth, device, cpu=False)
    set_submodule(model, name, _quantize(lin, cfg, tf))
    try:
        noisy = run_blocks(blocks(), links, bi, calls, max_depth, device, cpu=False)
    finally:
        set_submodule(model, name, lin)
    err = [float(sum(_sq_err(n, c) for n, c in zip(noisy[d], clean[d])))
           for d in range(max_depth + 1)]
    return max(range(max_depth + 1), key=lambda d: err[d])


def _quantize(lin, cfg, tf, split=None) -> QuantLinear:
    return QuantLinear.from_linear(lin, cfg, tf.perm, tf.scale, tf.shift, tf.hessian, split)


def _best_clips(lin, cfg, tf, method, error) -> QuantLinear:
    """Try every (w_clip, a_clip) on the grid; ``error(q)`` scores a candidate QuantLinear.
    A fused layer (:func:`clq_triton.fuse.segments`) then tries, one output segment at a
    time, every other w_clip for that segment alone (the activation clip stays shared: one
    activation pass). Returns the layer quantized with the best clips (ties keep the
    earlier)."""
    # the low-rank split does not depend on the clips: one for every candidate
    split = QuantLinear.lowrank_parts(lin, cfg.lowrank, tf.scale) if cfg.lowrank else None
    best = (float("inf"), 1.0, 1.0, None)
    for wc in method.w_clip_grid:
        q = _quantize(lin, cfg.replace(w_clip=wc), tf, split)
        for ac in method.a_clip_grid:
            q.config = cfg.replace(w_clip=wc, a_clip=ac)
            err = error(q)
            if err < best[0]:
                best = (err, wc, ac, q)
    err, wc, ac, best_q = best
    cfg = cfg.replace(w_clip=wc, a_clip=ac)
    parts = segments(lin)
    if len(parts) > 1 and len(method.w_clip_grid) > 1:
        clips = [wc] * len(parts)
        for i in range(len(parts)):
            for c in method.w_clip_grid:
                if c == clips[i]:
                    continue
                trial = cfg.replace(w_clip_segments=tuple(
                    zip(parts, clips[:i] + [c] + clips[i + 1:])))
                e = error(_quantize(lin, trial, tf, split))
                if e < err:
                    err, clips[i] = e, c
        if len(set(clips)) > 1:
            cfg = cfg.replace(w_clip_segments=tuple(zip(parts, clips)))
    if best_q is None or cfg.w_clip_segments:  # no finite score, or segments of their own
        return _quantize(lin, cfg, tf, split)
    best_q.config = cfg  # the activation clip is a run-time setting: same weights
    return best_q


def _search(model, name, lin, cfg, tf, method, target_error) -> QuantLinear:
    """CLPS at a downstream target: the candidate is installed, the model/blocks replayed."""
    def error(q):
        set_submodule(model, name, q)
        return target_error()

    try:
        return _best_clips(lin, cfg, tf, method, error)
    finally:
        set_submodule(model, name, lin)


def _search_layer(lin, cfg, tf, xs, method, device) -> QuantLinear:
    """The local baseline: error at the layer's own output on its recorded inputs (held on
    the CPU; the FP output is recomputed per candidate rather than held on the device)."""
    def error(q):
        err = torch.zeros((), dtype=torch.float64, device=device)
        for x in xs:
            x = x.to(device)
            err += _sq_err([q(x)], [lin(x)]).to(device)
        return float(err)

    with torch.no_grad():
        return _best_clips(lin, cfg, tf, method, error)
