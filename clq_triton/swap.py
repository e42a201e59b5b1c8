"""Swapping a model's layers: :func:`set_submodule`, and :class:`Originals`, the
full-precision Linears that patch() replaced, kept until it returns."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` with ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for an empty module)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


class Originals:
    """The full-precision layers replaced in ``model`` while it is patched: put back on
    failure (:meth:`rollback`, so a failed patch() leaves the model as it was) and lent back
    for replays of the full-precision model (:meth:`fp_view`).

    A replaced layer that lived on a GPU moves to the CPU (:meth:`install`), so patching a
    model on a GPU peaks at its FP weights plus one layer's, not FP plus quantized weights."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._layers: dict[str, tuple[nn.Module, torch.device]] = {}

    def __len__(self) -> int:
        return len(self._layers)

    def install(self, name: str, original: nn.Module, new: nn.Module) -> None:
        """Put ``new`` at ``name`` in place of ``original``, which is kept (on the CPU)."""
        if name not in self._layers:
            device = module_device(original)
            self._layers[name] = (original, device)
            original.to("cpu")
        set_submodule(self.model, name, new)

    def rollback(self) -> None:
        """Every replaced layer back where it was, on its device."""
        for name, (layer, device) in reversed(list(self._layers.items())):
            set_submodule(self.model, name, layer.to(device))
        self._layers.clear()

    @contextlib.contextmanager
    def fp_view(self):
        """The model with every replaced layer back in full precision for the block."""
        now = {name: self.model.get_submodule(name) for name in self._layers}
        for name, (layer, device) in self._layers.items():
            set_submodule(self.model, name, layer.to(device))
        try:
            yield self.model
        finally:
            for name, new in now.items():
                self._layers[name][0].to("cpu")
                set_submodule(self.model, name, new)
