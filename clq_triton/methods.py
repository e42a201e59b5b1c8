"""Quantization methods as config objects: one small frozen dataclass per method, owning its
rotation choice, its channel transform and its parameter search.

    clq_triton.patch(model, "w4a4", CLQ(clps_target="output"), calibration=data)
    clq_triton.patch(model, "w4a4", QuaRot())

A method string ("clq", "smoothquant", "svdquant", "quarot", "rtn", "hadamard") stands for the
method's default config (:func:`method_config`). Configs serialize to a versioned dict
(:meth:`Method.to_dict` / :func:`method_from_dict`), stored in checkpoints.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch

from .config import QuantConfig, check_count
from .gptq import HessianFactor
from .kernels.hadamard import PERM_RUN
from .smoothing import abs_max, outlier_permutation, smoothquant_scale

METHOD_FORMAT = 1  # version of Method.to_dict()


def fit_hadamard_block(k: int, block: int | None) -> int | None:
    """The largest power of two <= ``block`` that divides K (None if below 16)."""
    if block is None:
        return None
    b = block
    while b >= 16 and k % b:
        b //= 2
    return b if b >= 16 else None


@dataclass(frozen=True)
class ChannelTransform:
    """A layer's input-channel transform x → ((x − shift) · diag(scale))[:, perm] before its
    rotation; None parts are identities. perm: int32 [K]; scale, shift: float32 [K].
    hessian: float64 [K, K], Σ x'ᵀx' of the calibration inputs in the layer's quantized basis
    (after the transform and the rotation), or its :class:`~clq_triton.gptq.HessianFactor`,
    for GPTQ weight rounding; None: round to nearest."""

    perm: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    hessian: torch.Tensor | HessianFactor | None = None


@dataclass(frozen=True)
class Method:
    """Base of the method configs. Data-free methods only choose each layer's rotation."""

    name: ClassVar[str] = ""
    calibrated: ClassVar[bool] = False  # needs calibration data (capture_calibration)

    def layer_config(self, config: QuantConfig, k: int) -> QuantConfig:
        """The QuantConfig of one layer of input size K: the one place that decides whether,
        and with which Hadamard block, a layer is rotated. Default: the config's block,
        shrunk to divide K."""
        return config.replace(hadamard_block=fit_hadamard_block(k, config.hadamard_block))

    @property
    def own_rank(self) -> int:
        """The low-rank branch's rank this method's own options ask for (CLQ(lowrank=r),
        SVDQuant(rank=r)); 0: none (QuantConfig.lowrank decides)."""
        return 0

    def with_rank(self, config: QuantConfig) -> QuantConfig:
        """``config`` with the one low-rank rule of every method: the branch's rank is
        QuantConfig.lowrank, or the method's own option where it sets one; the two set to
        different ranks is an error (ValueError). Each layer clamps it to min(N, K)."""
        own = self.own_rank
        if not own or own == config.lowrank:
            return config
        if config.lowrank:
            raise ValueError(f"{type(self).__name__} asks for a rank-{own} low-rank branch and "
                             f"QuantConfig(lowrank={config.lowrank}) for rank "
                             f"{config.lowrank}: set one of them")
        return config.replace(lowrank=own)

    def to_dict(self) -> dict:
        return {"method": self.name, "format": METHOD_FORMAT, **asdict(self)}

    def warn_ignored(self, config: QuantConfig) -> None:
        """Warn about settings of this method that ``config`` leaves without effect."""


@dataclass(frozen=True)
class RTN(Method):
    """Round-to-nearest, no rotation."""

    name: ClassVar[str] = "rtn"

    def layer_config(self, config, k):
        return config.replace(hadamard_block=None)


@dataclass(frozen=True)
class Hadamard(Method):
    """Round-to-nearest after the config's block Hadamard (the data-free default)."""

    name: ClassVar[str] = "hadamard"


@dataclass(frozen=True)
class Calibrated(Method):
    """Methods that fit each layer on calibration inputs, block by block.

    cbc: block i's inputs come from the model whose blocks 0..i-1 are already quantized
    (cross-block calibration); False: from the full-precision model.
    gptq: weights rounded by GPTQ (error feedback through the Hessian of the layer's
    calibration inputs in its quantized basis, :mod:`clq_triton.gptq`) instead of to nearest;
    same scales and storage, so the same speed."""

    calibrated: ClassVar[bool] = True
    cbc: bool = True
    gptq: bool = False

    @property
    def search(self) -> bool:
        """Whether clipping ratios are searched (CLPS)."""
        return False

    def channel_transform(self, x_lo: torch.Tensor, x_hi: torch.Tensor, x_mean: torch.Tensor,
                          linear: torch.nn.Linear, config: QuantConfig) -> ChannelTransform:
        """One layer's channel transform from the min / max / mean per input channel
        (float32 [K]) of its calibration inputs."""
        return ChannelTransform()


@dataclass(frozen=True)
class SmoothQuant(Calibrated):
    """Per-channel smoothing x·D, W·D⁻¹ with D = max|W_c|^(1-α) / max|X_c|^α; no rotation."""

    name: ClassVar[str] = "smoothquant"
    alpha: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")

    def layer_config(self, config, k):
        return config.replace(hadamard_block=None)

    def channel_transform(self, x_lo, x_hi, x_mean, linear, config):
        amax = abs_max(x_lo, x_hi)
        return ChannelTransform(scale=smoothquant_scale(amax, linear.weight, self.alpha))


@dataclass(frozen=True)
class SVDQuant(SmoothQuant):
    """SVDQuant (Li et al., 2025): SmoothQuant's smoothing, then the smoothed weight's best
    rank-``rank`` part kept in the model's dtype as a branch on the unquantized input, and only
    the residual quantized (QuantConfig.lowrank); no rotation. The branch costs r·(K + N)
    16-bit values and two thin matmuls per layer."""

    name: ClassVar[str] = "svdquant"
    rank: int = 32

    def __post_init__(self):
        super().__post_init__()
        check_count("rank", self.rank, 1)

    @property
    def own_rank(self):
        return self.rank


@dataclass(frozen=True)
class QuaRot(Calibrated):
    """The widest power-of-two Hadamard block that divides K, no permutation, no search.
    Data-free with round-to-nearest weights (the default); ``gptq=True`` rounds them with
    GPTQ as QuaRot's authors publish it, which needs calibration data."""

    name: ClassVar[str] = "quarot"

    @property
    def calibrated(self) -> bool:  # an instance property: the class alone does not know
        return self.gptq

    def layer_config(self, config, k):
        return config.replace(hadamard_block=fit_hadamard_block(k, 1 << (k.bit_length() - 1)))


CLPS_TARGETS = ("block", "depth", "output", "layer")


@dataclass(frozen=True)
class CLQ(Calibrated):
    """CLQ: CBC + OBS (outlier permutation + block Hadamard) + CLPS (clip search).

    obs: permute channels by outlier score and rotate; False = no smoothing, no
        permutation, no rotation.
    shift: OBS shift: subtract each channel's calibration mean before the rest (x − δ; the
        bias gains W·δ), so a per-channel offset that is the same in every token (the adaLN
        shift of real DiTs) costs no quantization range.
    smooth_alpha: OBS smoothing: before the permutation, scale channels by SmoothQuant's
        D = max|W_c|^(1-α) / max|X_c|^α (folded into the weights), so the outlier score and
        the rotation see the smoothed activations; None = no smoothing (permutation and
        Hadamard only). A per-channel rescaling of the FP model cannot defeat it. The
        defaults (shift, α = 0.3) were chosen on the outlier toy (bench/results/quality.md).
    clps: search (w_clip, a_clip) on the grid; False = clip ratios 1.0.
    w_clip_grid / a_clip_grid: the CLPS grid; every pair is tried.
    clps_target: where a candidate's error is measured vs the full-precision model: "block"
        (the block's output), "depth" (the output of the block, at most ``clps_depth``
        blocks later and no further than the blocks link, where the squared error the layer
        causes peaks), "output" (the
        transformer's output) or "layer" (the layer's own output, the local baseline).
    lowrank: rank of SVDQuant's full-precision low-rank branch on each layer, split off
        after the shift and smoothing; 0 = QuantConfig.lowrank's (:meth:`Method.with_rank`).
    perm_run: OBS deals channels over the Hadamard blocks in aligned runs of this many
        (smoothing.outlier_permutation): 1 (default) deals single channels, which the
        activation kernel gathers 2 bytes at a time; 8 keeps runs of 8 together, read 16
        bytes at a time, for 0.0–1.1 dB less PSNR on the outlier toy (docs/quality.md, row
        "CLQ, runs of 8").
    """

    name: ClassVar[str] = "clq"
    obs: bool = True
    clps: bool = True
    w_clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)
    a_clip_grid: tuple[float, ...] = (1.0, 0.9, 0.8)
    clps_target: str = "block"
    clps_depth: int = 3
    shift: bool = True
    smooth_alpha: float | None = 0.3
    lowrank: int = 0
    perm_run: int = 1

    def __post_init__(self):
        if self.clps_target not in CLPS_TARGETS:
            raise ValueError(f"clps_target must be one of {CLPS_TARGETS}, got {self.clps_target!r}")
        if not isinstance(self.clps_depth, int) or self.clps_depth < 0:
            raise ValueError(f"clps_depth must be an int >= 0, got {self.clps_depth!r}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"smooth_alpha must be in [0, 1] or None, got {self.smooth_alpha!r}")
        for v in (*self.w_clip_grid, *self.a_clip_grid):
            if not 0.0 < v <= 1.0:
                raise ValueError(f"clip ratios must be in (0, 1], got {v!r}")
        check_count("lowrank", self.lowrank, 0)
        if self.perm_run not in (1, PERM_RUN):
            raise ValueError(f"perm_run must be 1 or {PERM_RUN}, got {self.perm_run!r}")
        if not self.w_clip_grid or not self.a_clip_grid:
            raise ValueError("the CLPS grids must not be empty")
        object.__setattr__(self, "w_clip_grid", tuple(float(v) for v in self.w_clip_grid))
        object.__setattr__(self, "a_clip_grid", tuple(float(v) for v in self.a_clip_grid))

    @property
    def search(self) -> bool:
        return self.clps

    @property
    def own_rank(self):
        return self.lowrank

    def layer_config(self, config, k):
        if not self.obs:
            return config.replace(hadamard_block=None)
        return super().layer_config(config, k)

    def warn_ignored(self, config):
        if self.obs and config.hadamard_block is None:
            warnings.warn("CLQ with QuantConfig(hadamard_block=None): OBS's permutation and "
                          "rotation need a Hadamard block and are skipped; its shift and "
                          "smoothing are applied", stacklevel=3)

    def channel_transform(self, x_lo, x_hi, x_mean, linear, config):
        """OBS: shift, smoothing, then the outlier permutation (only with a rotation: it
        places channels in Hadamard blocks)."""
        if not self.obs:
            return ChannelTransform()
        shift = None
        if self.shift:
            shift = x_mean.to(torch.float32)
            amax = torch.maximum(x_hi - shift, shift - x_lo)
        else:
            amax = abs_max(x_lo, x_hi)
        scale = None
        if self.smooth_alpha is not None:
            scale = smoothquant_scale(amax, linear.weight, self.smooth_alpha)
            amax = amax * scale
        perm = (outlier_permutation(amax, config.hadamard_block, self.perm_run)
                if config.hadamard_block is not None else None)
        return ChannelTransform(perm, scale, shift)


METHODS = {cls.name: cls for cls in (CLQ, SmoothQuant, SVDQuant, QuaRot, RTN, Hadamard)}


def method_config(method: Method | str | None, calibrated: bool) -> Method:
    """A Method from a config, a name (its defaults) or None (CLQ with calibration data,
    else Hadamard)."""
    if method is None:
        return CLQ() if calibrated else Hadamard()
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method.lower() in METHODS:
        return METHODS[method.lower()]()
    raise ValueError(f"method must be a clq_triton method config or one of {tuple(METHODS)}, "
                     f"got {method!r}")


def method_from_dict(d: dict) -> Method:
    """Inverse of :meth:`Method.to_dict`; raises ValueError on an unknown method or version."""
    d = dict(d)
    name, version = d.pop("method", None), d.pop("format", None)
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}")
    if version != METHOD_FORMAT:
        raise ValueError(f"method config format {version!r}; this clq-triton reads "
                         f"{METHOD_FORMAT}")
    cls = METHODS[name]
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown fields for {cls.__name__}: {sorted(unknown)}")
    for f in ("w_clip_grid", "a_clip_grid"):
        if f in d:
            d[f] = tuple(d[f])
    return cls(**d)
