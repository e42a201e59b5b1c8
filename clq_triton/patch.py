"""patch(): swap the eligible nn.Linear layers of a model for QuantLinear."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from .calibrate import CalibrationOptions, calibrate, set_submodule
from .capture import CalibrationData
from .config import QuantConfig
from .kernels.formats import check_k
from .quant_linear import QuantLinear

log = logging.getLogger("clq_triton")

# Linears that stay in full precision by default: adaLN modulation (norm*.linear) and
# embedders inside blocks. Layers outside the block lists (patch/time/caption embedders,
# final projection) are excluded by ``blocks_only``.
DEFAULT_EXCLUDE = (r"(^|\.)norm[^.]*\.", r"emb")


@dataclass
class PatchReport:
    """What patch() did: the layers it quantized and the ones it left, with the reason."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    fp_weight_bytes: int = 0  # bf16 bytes of the quantized layers' weights
    quant_weight_bytes: int = 0  # their packed codes + scales

    @property
    def weight_ratio(self) -> float:
        return self.quant_weight_bytes / self.fp_weight_bytes if self.fp_weight_bytes else 1.0

    def __str__(self) -> str:
        return (f"quantized {len(self.quantized)} Linear layers, skipped {len(self.skipped)}; "
                f"their weights: {self.fp_weight_bytes / 2**20:.2f} MiB bf16 → "
                f"{self.quant_weight_bytes / 2**20:.2f} MiB ({self.weight_ratio:.3f}×)")


def fit_hadamard_block(k: int, block: int | None) -> int | None:
    """The largest power of two <= ``block`` that divides K (None if below 16)."""
    if block is None:
        return None
    b = block
    while b >= 16 and k % b:
        b //= 2
    return b if b >= 16 else None


def _inside_block_list(name: str, model: nn.Module) -> bool:
    parts = name.split(".")
    mod = model
    for p in parts[:-1]:
        mod = getattr(mod, p)
        if isinstance(mod, nn.ModuleList):
            return True
    return False


def eligible_linears(
    model: nn.Module,
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    blocks_only: bool = True,
) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of the nn.Linear layers patch() would consider.

    A layer is eligible when it sits inside an nn.ModuleList (the transformer's block lists)
    unless ``blocks_only`` is False, matches one of the ``include`` regexes if given, and
    matches none of the ``exclude`` regexes (``re.search`` on the qualified name).
    """
    out = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        if blocks_only and not _inside_block_list(name, model):
            continue
        if include is not None and not any(re.search(p, name) for p in include):
            continue
        if any(re.search(p, name) for p in exclude):
            continue
        out.append((name, mod))
    return out


METHODS = ("clq", "smoothquant", "quarot", "rtn", "hadamard")
CALIBRATED = ("clq", "smoothquant")


def layer_config(method: str, config: QuantConfig, k: int, obs: bool = True) -> QuantConfig:
    """The config one layer of input size K gets under ``method`` (before calibration); the
    one place that decides whether, and with which block, a layer is rotated."""
    if method in ("rtn", "smoothquant") or (method == "clq" and not obs):
        return config.replace(hadamard_block=None)
    if method == "quarot":  # the widest power-of-two Hadamard that divides K
        return config.replace(hadamard_block=fit_hadamard_block(k, 1 << (k.bit_length() - 1)))
    return config.replace(hadamard_block=fit_hadamard_block(k, config.hadamard_block))


def patch(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    bits: str | None = None,
    method: str | None = None,
    calibration: CalibrationData | None = None,
    cbc: bool = True,
    obs: bool = True,
    clps: bool = True,
    options: CalibrationOptions | None = None,
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    blocks_only: bool = True,
    strict: bool = False,
    progress: bool = True,
) -> PatchReport:
    """Quantize ``model`` in place: every eligible nn.Linear becomes a QuantLinear.

    config: a QuantConfig; or ``bits="w4a4" | "w4a8" | "w8a8"`` for the defaults.
    method:
      "clq"         CBC + OBS (permutation + block Hadamard) + CLPS; needs ``calibration``
      "smoothquant" per-channel smoothing (``options.smooth_alpha``); needs ``calibration``
      "quarot"      widest power-of-two Hadamard dividing K, no permutation, no search
      "rtn"         round-to-nearest, no rotation
      "hadamard"    round-to-nearest after the config's block Hadamard (data-free default)
    Default: "clq" when ``calibration`` is given, else "hadamard".
    cbc / obs / clps: CLQ ablation switches (shorthand for the same fields of ``options``).
    calibration: from :func:`clq_triton.capture_calibration` or CalibrationData.from_inputs.
    Layers whose K is not a multiple of 64 and of the group size stay in full precision (log line),
    or raise ValueError when ``strict``. Returns a PatchReport.
    """
    if config is None:
        config = QuantConfig.from_bits(bits or "w4a4")
    elif bits is not None and bits.lower() != config.name:
        raise ValueError(f"bits={bits!r} contradicts config ({config.name})")
    method = method or ("clq" if calibration is not None else "hadamard")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in CALIBRATED and calibration is None:
        raise ValueError(f"method={method!r} needs calibration data "
                         "(clq_triton.capture_calibration(...))")
    options = (options or CalibrationOptions()).replace(cbc=cbc, obs=obs, clps=clps)
    report = PatchReport()
    todo = []
    for name, lin in eligible_linears(model, include, exclude, blocks_only):
        k = lin.in_features
        try:
            check_k(k, config.group_size)
        except ValueError as e:
            reason = str(e)
            if strict:
                raise ValueError(f"{name}: {reason}")
            log.info("clq_triton: keeping %s in full precision: %s", name, reason)
            report.skipped[name] = reason
            continue
        todo.append((name, lin, layer_config(method, config, k, options.obs)))
    if not todo:
        log.warning("patch(): no eligible nn.Linear found in %s", type(model).__name__)
    if method in CALIBRATED:
        quantized = calibrate(model, calibration, todo, method, options, progress)
    else:
        quantized = {}
        for name, lin, cfg in tqdm(todo, desc=f"quantize {config.name}", disable=not progress):
            quantized[name] = QuantLinear.from_linear(lin, cfg)
            set_submodule(model, name, quantized[name])
    for name, lin, _ in todo:
        report.quantized.append(name)
        report.fp_weight_bytes += lin.weight.numel() * 2
        report.quant_weight_bytes += quantized[name].weight_nbytes()
    log.info("clq_triton: %s (%s)", report, method)
    return report
