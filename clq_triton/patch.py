"""patch(): swap the eligible nn.Linear layers of a model for QuantLinear."""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field

from torch import nn
from tqdm.auto import tqdm

from .calibrate import calibrate
from .capture import CalibrationData
from .config import QuantConfig
from .fold import fold_permutations, unproven_mlps
from .fuse import FusionUndo, is_fused
from .fuse import fuse_projections as fuse_model_projections
from .kernels.formats import check_k
from .methods import Method, method_config
from .quant_linear import QuantLinear
from .swap import Originals

log = logging.getLogger("clq_triton")

# Linears that stay in full precision by default: adaLN modulation (norm*.linear) and
# embedders inside blocks. Layers outside the block lists (patch/time/caption embedders,
# final projection) are excluded by ``blocks_only``.
DEFAULT_EXCLUDE = (r"(^|\.)norm[^.]*\.", r"emb")


@dataclass
class PatchReport:
    """What patch() did: the method, the layers it quantized and the ones it left, with why."""

    method: Method | None = None
    config: QuantConfig | None = None
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name → reason
    fp_weight_bytes: int = 0  # bf16 bytes of the quantized layers' weights
    quant_weight_bytes: int = 0  # their packed codes + scales
    clps_depths: dict[str, int] = field(default_factory=dict)  # CLQ(clps_target="depth")
    fused: list[str] = field(default_factory=list)  # layers made by fuse_projections=True
    folded: list[str] = field(default_factory=list)  # input permutation moved (clq_triton.fold)
    unfolded: dict[str, str] = field(default_factory=dict)  # MLPs not known exact → why

    @property
    def weight_ratio(self) -> float:
        return self.quant_weight_bytes / self.fp_weight_bytes if self.fp_weight_bytes else 1.0

    def __str__(self) -> str:
        head = f"{self.method.name} {self.config.name}: " if self.method and self.config else ""
        return (f"{head}quantized {len(self.quantized)} Linear layers, skipped "
                f"{len(self.skipped)}; their weights: {self.fp_weight_bytes / 2**20:.2f} MiB "
                f"bf16 → {self.quant_weight_bytes / 2**20:.2f} MiB ({self.weight_ratio:.3f}×)")

    def summary(self) -> str:
        """str(self), then one line per skipped layer with the reason."""
        return "\n".join([str(self)] + [f"  kept in full precision: {n} ({why})"
                                         for n, why in self.skipped.items()]
                         + [f"  permutation not folded: {n} ({why})"
                            for n, why in self.unfolded.items()])


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


def patch(
    model: nn.Module,
    config: QuantConfig | str = "w4a4",
    method: Method | str | None = None,
    calibration: CalibrationData | None = None,
    *,
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    blocks_only: bool = True,
    strict: bool = False,
    progress: bool = True,
    fuse_projections: bool = False,
) -> PatchReport:
    """Quantize ``model`` in place: every eligible nn.Linear becomes a QuantLinear.

    config: a QuantConfig, or "w4a4" | "w4a8" | "w8a8" for its defaults. Its ``lowrank``
      gives every layer a low-rank branch, whatever the method; a method's own rank
      (``CLQ(lowrank=r)``, ``SVDQuant(rank=r)``) does too, and the two disagreeing is an
      error (:meth:`Method.with_rank`); clamped to min(N, K) per layer.
    method: a method config from :mod:`clq_triton.methods` — ``CLQ(...)``,
      ``SmoothQuant(alpha)``, ``QuaRot()``, ``RTN()``, ``Hadamard()`` — or its name for the
      defaults. Default: ``CLQ()`` when ``calibration`` is given, else ``Hadamard()``.
    calibration: from :func:`clq_triton.capture_calibration` or CalibrationData.from_inputs;
      needed by CLQ and SmoothQuant.
    include / exclude / blocks_only: which layers (see :func:`eligible_linears`).
    Layers whose K is not a multiple of 64 and of the group size stay in full precision,
    listed in ``PatchReport.skipped`` with a warning (``strict=True`` raises instead).
    fuse_projections: first fuse the projections that read one tensor (q/k/v, cross-attention
      k/v, context q/k/v; FLUX single blocks' q/k/v and MLP input) into one Linear each,
      with diffusers' own fusion where it has one (:func:`clq_triton.fuse.fuse_projections`,
      function-preserving), so each is one activation pass and one GEMM; listed in
      ``PatchReport.fused``. ``include`` / ``exclude`` then see the fused names
      (``to_qkv``, ``to_kv``, ``to_added_qkv``, ``to_added_kv``, ``to_qkv_mlp``).
      Calibration gives a fused layer one channel transform and one activation clip, and
      searches its weight clip per output segment (q, k, v). Attention modules whose processor computes q/k/v from the
      unfused layers (LTX-Video's) are left unfused. A model already fused by diffusers'
      ``fuse_qkv_projections()`` loses its unused unfused layers (only what runs is
      quantized, and its checkpoint loads). A failed patch() undoes the fusion too.

    The input permutation of each MLP's second layer (CLQ's OBS) is then moved into the first
    layer's output rows (:func:`clq_triton.fold.fold_permutations`, exact), so that its
    activation pass reads the input in order; listed in ``PatchReport.folded``. Only
    diffusers' own ``FeedForward`` with its own activations is folded; other MLPs of that
    shape keep the permutation, listed with the reason in ``PatchReport.unfolded``.

    All or nothing: if quantizing any layer fails, every layer replaced so far is put back,
    the fusion (if any) undone, and the error is raised. A model that already holds QuantLinears is refused (patching
    twice would mix two configs in one model): patch the full-precision model. Replaced
    Linears that lived on a GPU move to the CPU until patch() returns (then they are
    dropped), so the GPU holds the FP weights plus one quantized layer at most.
    """
    if isinstance(config, str):
        config = QuantConfig.from_bits(config)
    method = method_config(method, calibration is not None)
    if method.calibrated and calibration is None:
        raise ValueError(f"method {method.name!r} needs calibration data "
                         "(clq_triton.capture_calibration(...))")
    if not method.calibrated and calibration is not None:
        warnings.warn(f"method {method.name!r} is data-free: the calibration data passed is "
                      "not used (clq_triton.CLQ() and SmoothQuant() use it)", stacklevel=2)
    already = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if already:
        raise ValueError(
            f"the model already holds {len(already)} QuantLinear layer(s) (e.g. {already[0]}): "
            "it was patched before, and patching again would mix two configs in one model; "
            "patch the full-precision model, or load a saved one with "
            "clq_triton.load_quantized")
    layer_base = method.with_rank(config)  # the low-rank rule, checked before any work
    report = PatchReport(method=method, config=config)
    originals, undo = Originals(model), FusionUndo(model)
    try:
        if fuse_projections or is_fused(model):  # diffusers-fused: drop what is not used
            report.fused = fuse_model_projections(model, shared_inputs=fuse_projections)
            undo.offload()
        if fuse_projections and not report.fused:
            warnings.warn(f"fuse_projections=True: {type(model).__name__} has no attention "
                          "projections clq_triton can fuse; nothing was fused", stacklevel=2)
        todo = _layers_to_quantize(model, method, layer_base, report, include, exclude,
                                   blocks_only, strict)
        if method.calibrated:
            method.warn_ignored(config)
            quantized = calibrate(model, calibration, todo, method, progress,
                                  depths=report.clps_depths, originals=originals)
        else:
            quantized = {}
            for name, lin, cfg in tqdm(todo, desc=f"quantize {config.name}",
                                       disable=not progress):
                quantized[name] = QuantLinear.from_linear(lin, cfg)
                originals.install(name, lin, quantized[name])
        report.folded = fold_permutations(model)
        report.unfolded = unproven_mlps(model)
    except BaseException:
        originals.rollback()
        undo.restore()
        raise
    model._clq_patch = {"method": method.to_dict(), "config": config.to_dict()}  # for saving
    for name, lin, _ in todo:
        report.quantized.append(name)
        report.fp_weight_bytes += lin.weight.numel() * 2
        report.quant_weight_bytes += quantized[name].weight_nbytes()
    log.info("clq_triton: %s", report)
    return report


def _layers_to_quantize(model, method, config, report, include, exclude, blocks_only,
                        strict) -> list[tuple[str, nn.Linear, QuantConfig]]:
    """(name, Linear, its config) of the layers patch() quantizes; the others go to
    ``report.skipped`` (warned about), or raise with ``strict``."""
    todo = []
    for name, lin in eligible_linears(model, include, exclude, blocks_only):
        k = lin.in_features
        try:
            check_k(k, config.group_size)
        except ValueError as e:
            if strict:
                raise ValueError(f"{name}: {e}") from None
            report.skipped[name] = str(e)
            continue
        cfg = method.layer_config(config, k)
        todo.append((name, lin, cfg.replace(lowrank=min(cfg.lowrank, k, lin.out_features))))
    if report.skipped:
        shown = ", ".join(f"{n} ({why})" for n, why in list(report.skipped.items())[:5])
        more = len(report.skipped) - 5
        warnings.warn(f"clq_triton.patch kept {len(report.skipped)} Linear layer(s) in full "
                      f"precision: {shown}{f' and {more} more' if more > 0 else ''}; the list "
                      "is in PatchReport.skipped", stacklevel=3)
    if not todo and not report.skipped:
        hint = ("; pass blocks_only=False to quantize every nn.Linear of the model"
                if blocks_only and not _has_block_list(model) else "")
        warnings.warn(f"clq_triton.patch found no eligible nn.Linear in "
                      f"{type(model).__name__}: nothing was quantized{hint}", stacklevel=3)
    return todo


def _has_block_list(model: nn.Module) -> bool:
    return any(isinstance(m, nn.ModuleList) for m in model.modules())
