"""Finding a transformer's blocks in execution order, and replaying the model up to one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .capture import CalibrationData, to_cpu, to_device


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module, sample: tuple[tuple, dict], device,
                counts: dict[str, int] | None = None) -> list[tuple[str, nn.Module]]:
    """The children of every nn.ModuleList in ``model`` (e.g. ``transformer_blocks.3``,
    ``single_transformer_blocks.0``), in the order one forward pass first calls them.
    ``counts``: filled with name → how many times the forward pass called the block."""
    candidates = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            for i, child in enumerate(mod):
                full = f"{name}.{i}" if name else str(i)
                if not any(full.startswith(c + ".") for c in candidates):
                    candidates[full] = child
    if not candidates:
        raise ValueError(f"found no block list (nn.ModuleList) in {type(model).__name__}; "
                         "CBC needs the transformer's blocks")
    order: list[str] = []
    calls: dict[str, int] = {}

    def seen(name):
        if name not in calls:
            order.append(name)
        calls[name] = calls.get(name, 0) + 1

    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen(n))
               for n, m in candidates.items()]
    try:
        run_model(model, sample, device)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("the forward pass called none of the block lists' modules")
    if counts is not None:
        counts.update(calls)
    return [(n, candidates[n]) for n in order]


def run_model(model: nn.Module, sample: tuple[tuple, dict], device) -> Any:
    args, kwargs = to_device(sample, device)
    with torch.no_grad():
        return model(*args, **kwargs)


def run_block(block: nn.Module, call: tuple[tuple, dict], device) -> list[torch.Tensor]:
    """Replay one recorded block call; returns its output tensors."""
    args, kwargs = to_device(call, device)
    with torch.no_grad():
        return output_tensors(block(*args, **kwargs))


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Flatten a module output (tensor, tuple, dataclass-like with .sample) to its tensors."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in output_tensors(o)]
    if hasattr(out, "sample"):
        return [out.sample]
    return []


def block_inputs(model: nn.Module, block: nn.Module, data: CalibrationData, device,
                 all_calls: bool = False):
    """The (args, kwargs) with which ``block`` is called for each calibration sample (on CPU),
    from running ``model`` as it is now (the forward is cut short at the block).
    ``all_calls``: every call of a block that a forward calls more than once (the whole
    forward runs), in call order, sample after sample."""
    caught = []

    def hook(module, args, kwargs):
        caught.append(to_cpu((args, kwargs)))
        if not all_calls:
            raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for sample in data.samples:
            try:
                run_model(model, sample, device)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(caught) < len(data.samples) or (not all_calls and len(caught) != len(data.samples)):
        raise RuntimeError("the block was not called once per calibration sample")
    return caught
