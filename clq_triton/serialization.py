"""save_quantized / load_quantized: a patched transformer in the diffusers model layout.

Directory layout (what ``ModelMixin.save_pretrained`` writes, plus a quantization entry):
  config.json                          the model's own config (``_class_name``, …) with
                                       ``"quantization_config": {"quant_method": "clq_triton",
                                       "format": 2, "method": {...}, "config": {...},
                                       "layers": {name: per-layer settings}}``
  diffusion_pytorch_model.safetensors  the whole state dict: QuantLinear buffers and the
                                       full-precision rest

``load_quantized(directory)`` rebuilds the model from ``_class_name`` (a diffusers class), so
``DiffusionPipeline.from_pretrained(base, transformer=load_quantized(directory))`` loads a
pipeline around it. Loading is atomic: the whole checkpoint is read and validated before a
passed-in model is touched; a bad file raises an error that names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields

import torch
from torch import nn

from .config import QuantConfig
from .fold import fold_permutations
from .fuse import FUSION_VERSION, fuse_projections, fusion_version
from .jsonfile import write_atomic
from .kernels.formats import FORMAT_VERSION
from .methods import method_from_dict
from .quant_linear import QuantLinear
from .swap import set_submodule

CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
QUANT_METHOD = "clq_triton"
_OLD_CONFIG = "clq_config.json"  # clq-triton 0.1 (format 1)


def save_quantized(model: nn.Module, directory: str) -> None:
    """Write a model patched by :func:`clq_triton.patch` to ``directory`` (created)."""
    from safetensors.torch import save_file

    from . import __version__

    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("the model holds no QuantLinear: run clq_triton.patch() first")
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if torch.is_tensor(v) and not k.endswith("._extra_state")}  # settings: config.json
    patched = getattr(model, "_clq_patch", {})
    quant = {"quant_method": QUANT_METHOD, "format": FORMAT_VERSION,
             "clq_triton_version": __version__, "method": patched.get("method"),
             "config": patched.get("config"), "torch_dtype": _model_dtype(model, layers),
             "layers": {n: _layer_spec(m) for n, m in layers.items()}}
    fused = fusion_version(model)
    if fused:  # load_quantized fuses the built model the same way
        quant["fused_projections"] = fused
    model_config = getattr(model, "config", None)
    config = dict(model_config) if model_config is not None else {}
    config["_class_name"] = type(model).__name__
    if model_config is not None:
        import diffusers

        config.setdefault("_diffusers_version", diffusers.__version__)
    config["quantization_config"] = quant
    write_atomic(os.path.join(directory, WEIGHTS), lambda p: save_file(state, p))
    write_atomic(os.path.join(directory, CONFIG),
                  lambda p: open(p, "w").write(json.dumps(config, indent=1, default=_jsonable)))


def load_quantized(directory: str, model: nn.Module | None = None,
                   device: torch.device | str | None = None) -> nn.Module:
    """The quantized model saved in ``directory``, ready for inference (eval mode).

    model: None (default) builds the model from its config.json (``_class_name`` must be a
      diffusers model class); or an instance of the same architecture (e.g. the FP
      transformer from ``from_pretrained``) to load into — it is left exactly as it was when
      anything in the checkpoint is wrong.
    device: where to put the loaded model (default: the passed model's device, or CPU).
    A checkpoint saved with fused projections (``patch(..., fuse_projections=True)``) first
    fuses the model's projections (function-preserving; done before validation, so a
    passed-in model is fused even when the checkpoint is then refused). MLP permutations a
    checkpoint holds unfolded (saved before clq-triton folded them) are folded on load
    (:func:`clq_triton.fold.fold_permutations`, exact).
    """
    config, quant = _read_config(directory)
    specs = quant["layers"]
    new_layers = {n: _layer_from_spec(n, spec) for n, spec in specs.items()}
    state = _read_weights(directory)
    if model is None:
        model = _build(config, os.path.join(directory, CONFIG))
        dtype = quant.get("torch_dtype")
        if dtype is not None:  # non-persistent buffers (position embeddings, rope tables)
            model.to(_dtype(dtype, os.path.join(directory, CONFIG)))  # as the saved model
    elif type(model).__name__ != config.get("_class_name"):
        raise ValueError(f"checkpoint {directory} is for {config.get('_class_name')}, "
                         f"got {type(model).__name__}")
    fused = quant.get("fused_projections", 0)  # saved fused: fuse the same way (True = 1)
    if fused not in range(FUSION_VERSION + 1):
        raise ValueError(f"{os.path.join(directory, CONFIG)}: fused_projections {fused!r}; "
                         f"this clq-triton knows fusion versions up to {FUSION_VERSION}")
    if fused:
        fuse_projections(model, shared_inputs=fused == FUSION_VERSION)
    # validate everything before the model is touched
    for name, spec in specs.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint layer {name!r} does not exist in the model") from None
        if isinstance(old, QuantLinear) and old.config != new_layers[name].config:
            raise ValueError(
                f"layer {name} is quantized as {_describe(old.config)} in the model but as "
                f"{_describe(new_layers[name].config)} in the checkpoint {directory}; load "
                "into the full-precision model instead")
        if not isinstance(old, (nn.Linear, QuantLinear)) or \
                (old.in_features, old.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"checkpoint layer {name!r} is a {spec['in_features']}→"
                             f"{spec['out_features']} Linear, the model has {old}")
    expected = _expected_state(model, new_layers)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {tuple(state[k].shape)} {state[k].dtype}, expected {shape} {dtype or ''}"
             for k, (shape, dtype) in expected.items() if k in state and (
                 tuple(state[k].shape) != shape or dtype not in (None, state[k].dtype))]
    if missing or unexpected or wrong:
        raise ValueError(f"{os.path.join(directory, WEIGHTS)} does not match the model: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"wrong shape or dtype {wrong[:5]}")
    for name, layer in new_layers.items():  # also checks each perm is a permutation
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        layer.load_state_dict({**own, "_extra_state": layer.get_extra_state()})
    # every check passed: now change the model
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    for name, layer in new_layers.items():
        set_submodule(model, name, layer)
    rest = {k: v for k, v in state.items() if not any(k.startswith(n + ".") for n in new_layers)}
    model.load_state_dict(rest, strict=False, assign=True)  # the checkpoint's dtypes
    model._clq_patch = {"method": quant.get("method"), "config": quant.get("config")}
    fold_permutations(model)  # checkpoints saved before patch folded them (exact)
    return model.to(device).eval()


# ----------------------------------------------------------------------------- helpers


def _model_dtype(model: nn.Module, layers: dict[str, QuantLinear]) -> str | None:
    """The dtype of most of the model's floating parameters outside its QuantLinears (the
    dtype it was cast to), as a name ("bfloat16"); None when it has none."""
    sizes: dict[torch.dtype, int] = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and not any(name.startswith(n + ".") for n in layers):
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return str(max(sizes, key=sizes.get)).removeprefix("torch.") if sizes else None


def _dtype(name: str, path: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{path}: torch_dtype {name!r} is not a floating dtype")
    return dtype


def _layer_spec(m: QuantLinear) -> dict:
    return {"config": m.config.to_dict(), "in_features": m.in_features,
            "out_features": m.out_features, "bias": m.bias is not None,
            "perm": m.perm is not None, "channel_scale": m.channel_scale is not None,
            "channel_shift": m.channel_shift is not None,
            **({"lowrank_dtype": str(m.lowrank_down.dtype).removeprefix("torch.")}
               if m.lowrank_down is not None else {})}


def _layer_from_spec(name: str, spec: dict) -> QuantLinear:
    try:
        return QuantLinear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                           config=QuantConfig(**spec["config"]), has_perm=spec["perm"],
                           has_channel_scale=spec["channel_scale"],
                           has_channel_shift=spec.get("channel_shift", False),
                           lowrank_dtype=_dtype(spec.get("lowrank_dtype", "float32"),
                                                f"layer {name!r}"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"config.json: layer {name!r} has bad settings {spec!r}: {e}") from e


def _describe(cfg: QuantConfig) -> str:
    return f"{cfg.name} group {cfg.group_size} block {cfg.hadamard_block}"


def _expected_state(model: nn.Module, new_layers: dict[str, QuantLinear]) -> dict:
    """name → (shape, dtype) of every tensor the loaded model's state dict will hold; dtype
    None for the full-precision rest, which takes the checkpoint's dtype."""
    out = {}
    for k, v in model.state_dict().items():
        if torch.is_tensor(v) and not any(k.startswith(n + ".") for n in new_layers):
            out[k] = (tuple(v.shape), None)
    for n, layer in new_layers.items():
        for k, v in layer.state_dict().items():
            if torch.is_tensor(v) and k != "_extra_state":
                out[f"{n}.{k}"] = (tuple(v.shape), v.dtype)
    return out


def _read_config(directory: str) -> tuple[dict, dict]:
    path = os.path.join(directory, CONFIG)
    if not os.path.exists(path) and os.path.exists(os.path.join(directory, _OLD_CONFIG)):
        raise ValueError(f"{os.path.join(directory, _OLD_CONFIG)}: a clq-triton 0.1 checkpoint "
                         f"(format 1: interleaved nibbles, per-group fp16 weight scales); this "
                         f"clq-triton reads format {FORMAT_VERSION} only: quantize the "
                         "full-precision model again")
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (not a clq-triton checkpoint "
                                "directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as JSON: {e}") from e
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path}: no clq_triton quantization_config (not a model saved by "
                         "clq_triton.save_quantized)")
    if quant.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: clq checkpoint format {quant.get('format')!r}, this "
                         f"clq-triton reads format {FORMAT_VERSION} only; quantize the "
                         "full-precision model again")
    if not isinstance(quant.get("layers"), dict) or not quant["layers"]:
        raise ValueError(f"{path}: quantization_config lists no layers")
    _check_known(quant, path)
    return config, quant


# the fields this clq-triton writes; any other comes from a newer version and is refused
_QUANT_FIELDS = {"quant_method", "format", "clq_triton_version", "method", "config",
                 "torch_dtype", "layers", "fused_projections"}
_LAYER_FIELDS = {"config", "in_features", "out_features", "bias", "perm", "channel_scale",
                 "channel_shift", "lowrank_dtype"}
_CONFIG_FIELDS = {f.name for f in fields(QuantConfig)}


def _check_known(quant: dict, path: str) -> None:
    """One rule for every part of ``quantization_config``: a field this clq-triton does not
    know (top level, method, config, a layer or its config) is refused, naming the version
    that wrote the checkpoint, rather than ignored."""
    from . import __version__

    def refuse(where: str, what) -> None:
        raise ValueError(
            f"{path}: {where} has {what} unknown to this clq-triton {__version__}; the "
            f"checkpoint was written by clq-triton {quant.get('clq_triton_version', '?')}, "
            "a newer version: update clq-triton to load it")

    def check(where: str, d, known) -> None:
        extra = sorted(set(d) - known) if isinstance(d, dict) else []
        if extra:
            refuse(where, f"fields {extra}")

    check("quantization_config", quant, _QUANT_FIELDS)
    if quant.get("method") is not None:
        try:
            method_from_dict(quant["method"])
        except (ValueError, TypeError) as e:
            refuse("the method", f"settings ({e})")
    check("config", quant.get("config"), _CONFIG_FIELDS)
    for name, spec in quant["layers"].items():
        check(f"layer {name!r}", spec, _LAYER_FIELDS)
        check(f"layer {name!r}'s config", spec.get("config") if isinstance(spec, dict) else
              None, _CONFIG_FIELDS)


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    """The whole state dict, read (and so checked) before anything is changed."""
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS)
    try:
        return load_file(path, device="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: cannot read it as safetensors (truncated or corrupt?): "
                         f"{e}") from e


def _build(config: dict, path: str) -> nn.Module:
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"{path}: _class_name {name!r} is not a diffusers model class; pass "
                         "the model to load into: load_quantized(directory, model)")
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    return cls.from_config(cfg)


def _jsonable(obj):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return str(obj)
