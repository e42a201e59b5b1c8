"""Carrying every calibration sample's block inputs forward block by block (O(L) block runs).

In most DiTs block i+1 is called with block i's output plus arguments that every block shares
(timestep embedding, text states, rotary embedding ...). :func:`block_links` finds, from one
full-precision forward pass, how each tensor of block i+1's call is made from block i's call
and outputs; :class:`BlockStream` then builds the next calls from the current ones without
running the rest of the model. Where a call cannot be built that way (computation between
two blocks, a changed call structure) the link is None and the stream replays the model up to
that block instead (:func:`blocks.block_inputs`), which gives the same inputs at O(i) cost.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .blocks import block_inputs, output_tensors, run_block, run_model
from .capture import CalibrationData, to_cpu


def current_blocks(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The blocks of ``model`` at ``names`` as they are now (a block may have been replaced,
    e.g. by a QuantLinear candidate when the block is itself a Linear)."""
    return [model.get_submodule(n) for n in names]


@dataclass(frozen=True)
class Link:
    """How block i+1's call is built: ``sources[k]`` gives leaf k of its flattened
    (args, kwargs): ("out", j) = block i's output tensor j, ("in", m) = leaf m of block i's
    call. ``spec`` is the call's tree structure."""

    sources: tuple[tuple[str, int], ...]
    spec: object

    def next_call(self, call, outs: list[torch.Tensor]):
        leaves, _ = tree_flatten(call)
        new = [outs[j] if kind == "out" else leaves[j] for kind, j in self.sources]
        return tree_unflatten(new, self.spec)


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - uncomparable objects are not the same
        return False


def _link(call, outs, next_call) -> Link | None:
    leaves, _ = tree_flatten(call)
    nxt, spec = tree_flatten(next_call)
    sources = []
    for k, leaf in enumerate(nxt):
        src = None
        if torch.is_tensor(leaf):  # a block's output first: under quantization it changes
            src = next((("out", j) for j, o in enumerate(outs) if _same(o, leaf)), None)
        if src is None and k < len(leaves) and _same(leaves[k], leaf):  # the same argument
            src = ("in", k)
        if src is None:
            src = next((("in", m) for m, v in enumerate(leaves) if _same(v, leaf)), None)
        if src is None:
            return None
        sources.append(src)
    return Link(tuple(sources), spec)


def block_links(model: nn.Module, blocks: list[nn.Module], sample, device) -> list[Link | None]:
    """links[i]: how blocks[i + 1]'s call follows from blocks[i]'s (None: it does not), found
    on one forward pass of ``model`` on ``sample`` (exact equality of every tensor)."""
    calls, outs = [None] * len(blocks), [None] * len(blocks)
    handles = []
    for b, blk in enumerate(blocks):
        handles.append(blk.register_forward_pre_hook(
            lambda m, a, kw, b=b: calls.__setitem__(b, to_cpu((a, kw))) if calls[b] is None
            else None, with_kwargs=True))
        handles.append(blk.register_forward_hook(
            lambda m, a, o, b=b: outs.__setitem__(b, [t.detach().cpu() for t in output_tensors(o)])
            if outs[b] is None else None))
    try:
        run_model(model, sample, device)
    finally:
        for h in handles:
            h.remove()
    return [_link(calls[b], outs[b], calls[b + 1]) if calls[b] is not None
            and calls[b + 1] is not None else None for b in range(len(blocks) - 1)]


class BlockStream:
    """The calls of one block for every calibration sample (on CPU), carried forward.

    ``names``: the blocks' qualified names in execution order (blocks.find_blocks).
    ``model``: the model the stream follows as it is at each :meth:`advance` (for a
    quantized stream: blocks up to the current one already quantized). ``calls`` holds block
    ``index``'s calls; :meth:`advance` moves to the next block, through its link if it has one
    (running the current block once per sample), else by replaying ``model``.
    """

    def __init__(self, model: nn.Module, names: list[str], links: list[Link | None],
                 data: CalibrationData, device, repeated: set[str] = frozenset(),
                 fp_view=contextlib.nullcontext):
        self.model, self.names, self.links, self.data = model, names, links, data
        self.device = device
        self.repeated = repeated  # blocks a forward calls more than once: all calls kept
        self.fp_view = fp_view  # context in which replays run (the FP stream's FP layers)
        self.index = 0
        self.replays = 0  # blocks reached by replaying the model (for tests and reports)
        self.calls = self._replay()

    def _replay(self):
        with self.fp_view():
            return block_inputs(self.model, self.model.get_submodule(self.names[self.index]),
                                self.data, self.device, self.names[self.index] in self.repeated)

    @property
    def blocks(self) -> list[nn.Module]:
        """The model's blocks as they are now (by name: a block may have been replaced)."""
        return current_blocks(self.model, self.names)

    def outputs(self) -> list[list[torch.Tensor]]:
        """The current block's outputs (CPU) for every sample, running it as it is now."""
        block = self.model.get_submodule(self.names[self.index])
        return [[t.cpu() for t in run_block(block, c, self.device)]
                for c in self.calls]

    def advance(self, outs: list[list[torch.Tensor]] | None = None) -> None:
        """Move to the next block. ``outs``: the current block's outputs if already computed
        with the block as it is now (saves running it again)."""
        link = self.links[self.index]
        if link is not None and outs is None:
            outs = self.outputs()
        self.index += 1
        if link is None:
            self.calls = self._replay()
            self.replays += 1
        else:
            self.calls = [link.next_call(c, o) for c, o in zip(self.calls, outs)]
