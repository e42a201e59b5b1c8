"""save_quantized / load_quantized: a patched model as safetensors + JSON.

Directory layout:
  model.safetensors   the whole state dict (QuantLinear buffers and the full-precision rest)
  clq_config.json     {"format": 2, "model_class": ..., "model_config": {...} or null,
                       "layers": {name: {"config": QuantConfig fields, "in_features",
                                         "out_features", "bias", "bias_dtype", "perm",
                                         "channel_scale"}}}
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .calibrate import set_submodule
from .config import QuantConfig
from .kernels.formats import FORMAT_VERSION
from .quant_linear import QuantLinear

FORMAT = FORMAT_VERSION  # the weight layout (kernels.formats) is what the version tracks
WEIGHTS = "model.safetensors"
CONFIG = "clq_config.json"


def save_quantized(model: nn.Module, directory: str) -> None:
    """Write a model patched by clq_triton.patch() to ``directory``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("the model holds no QuantLinear: run clq_triton.patch() first")
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if torch.is_tensor(v)}
    save_file(state, os.path.join(directory, WEIGHTS))
    model_config = getattr(model, "config", None)
    meta = {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "model_config": dict(model_config) if model_config is not None else None,
        "layers": {n: {"config": m.config.to_dict(), "in_features": m.in_features,
                       "out_features": m.out_features, "bias": m.bias is not None,
                       "bias_dtype": str(m.bias.dtype).removeprefix("torch.")
                       if m.bias is not None else None,
                       "perm": m.perm is not None, "channel_scale": m.channel_scale is not None}
                   for n, m in layers.items()},
    }
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(meta, f, indent=1, default=str)


def load_quantized(model_or_class, directory: str) -> nn.Module:
    """Restore a model saved by :func:`save_quantized` without recalibrating.

    model_or_class: an instance of the same architecture (e.g. the full-precision transformer
    from ``from_pretrained``; its weights are overwritten), or a diffusers model class, which is
    built from the saved config. Raises ValueError if the checkpoint does not fit the model.
    """
    with open(os.path.join(directory, CONFIG)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{os.path.join(directory, CONFIG)}: clq checkpoint format {meta.get('format')!r}, "
            f"this clq-triton reads format {FORMAT} only (format 1 used interleaved nibbles and "
            "per-group fp16 weight scales); quantize the full-precision model again")
    if isinstance(model_or_class, type):
        if meta["model_config"] is None or not hasattr(model_or_class, "from_config"):
            raise TypeError("pass a model instance: this checkpoint or class has no config")
        model = model_or_class.from_config(meta["model_config"])
    else:
        model = model_or_class
    if type(model).__name__ != meta["model_class"]:
        raise ValueError(f"checkpoint is for {meta['model_class']}, got {type(model).__name__}")
    device = next(model.parameters()).device
    for name, spec in meta["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint layer {name!r} does not exist in the model") from None
        if not isinstance(old, (nn.Linear, QuantLinear)) or \
                (old.in_features, old.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"checkpoint layer {name!r} is a {spec['in_features']}→"
                             f"{spec['out_features']} Linear, the model has {old}")
        bias_dtype = getattr(torch, spec["bias_dtype"]) if spec["bias"] else torch.float32
        new = QuantLinear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                          config=QuantConfig(**spec["config"]), has_perm=spec["perm"],
                          has_channel_scale=spec["channel_scale"], bias_dtype=bias_dtype,
                          device=device)
        set_submodule(model, name, new)
    state = load_file(os.path.join(directory, WEIGHTS), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model
