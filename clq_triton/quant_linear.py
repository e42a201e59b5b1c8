"""QuantLinear: a drop-in nn.Linear replacement holding quantized, rotated weights."""

from __future__ import annotations

import json

import torch
from torch import nn

from .capture import to_device
from .config import QuantConfig
from .gptq import HessianFactor, gptq_weight
from .kernels._runtime import check_float, use_triton
from .kernels.formats import (
    FORMAT_VERSION,
    check_k,
    code_dtype,
    int8_weight_codes,
    pack_codes,
    stored_columns,
    unpack_codes,
)
from .kernels.gemm import dequantized_matmul, quant_matmul_op
from .kernels.hadamard import check_block, check_perm, find_perm_runs, rotate_ref
from .kernels.quantize import dequantize_weight_ref, quantize_weight_ref
from .kernels.rotate_quantize import prepare as prepare_rotation
from .kernels.rotate_quantize import rotate_quantize_op
from .lowrank import lowrank_split

# Buffers that stay float32 through dtype casts of the module (QuantLinear._apply).
FLOAT32_BUFFERS = ("wscale", "channel_scale", "channel_shift", "bias", "weight_dequantized")


def _smoothed(linear: nn.Linear, channel_scale: torch.Tensor | None) -> torch.Tensor:
    """W·D⁻¹, float32 [N, K], on the weight's device (D = diag(channel_scale) or I)."""
    w = linear.weight.detach().float()
    return w if channel_scale is None else w / channel_scale.to(w.device, torch.float32)


def _quantize_rows(w_rot: torch.Tensor, hessian: torch.Tensor | HessianFactor | None,
                   config: QuantConfig):
    """(codes, scale, group_int) of the rotated weight [N, K] (kernels.quantize's format):
    rounded to nearest, or by GPTQ with ``hessian``; with ``config.w_clip_segments`` each
    segment of rows is quantized with its own clip (rows are quantized independently in both
    ways, so this is the concatenation of the segments quantized alone)."""
    segments = config.w_clip_segments or ((w_rot.shape[0], config.w_clip),)
    parts, start = [], 0
    for rows, clip in segments:
        w = w_rot[start:start + rows]
        start += rows
        parts.append(quantize_weight_ref(w, config.group_size, config.w_bits, clip)
                     if hessian is None else
                     gptq_weight(w, hessian, config.group_size, config.w_bits, clip))
    if len(parts) == 1:
        return parts[0]
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))


class QuantLinear(nn.Module):
    """y = Q((x − δ)·D·G) · Q(W·D⁻¹·G)ᵀ + (b + W·δ) with G = S·H (permutation then block
    Hadamard), D an optional positive per-channel diagonal (smoothing) and δ an optional
    per-channel shift (its product with the full-precision W is folded into the bias);
    D = I, S = I and δ = 0 when absent.

    Buffers (format version 2, see kernels.formats):
      qweight: 4 bits → uint8 [N, K/2] (split-halves packing); 8 bits → int8 [N, K]
      wscale:  float32 [N], per output channel
      wgroup:  uint8 [N, K/group_size], integer group scales of 4-bit weights with a group
               size (two-level code), else None
      perm:    int32 [K] channel permutation S, or None (one that moves aligned runs of 8
               channels, as CLQ(perm_run=8)'s do, lets the kernel read x 16 bytes per load)
      channel_scale: float32 [K] diagonal of D, or None
      channel_shift: float32 [K] δ, or None (subtracted in float32 inside the rotate kernel)
      bias:    float32 [N] (b + W·δ − δ·down·up), or None
      lowrank_down / lowrank_up: [K, r] / [r, N] in the model's dtype (cast with the
               module), the low-rank branch of ``config.lowrank`` = r > 0 (SVDQuant): y gains
               x·down·up, computed on the raw input x in x's dtype, and the quantized weight
               holds the residual (clq_triton.lowrank); None when r = 0
    The settings (bits, group size, Hadamard block, activation clip) travel in the state dict
    as extra state, so ``load_state_dict`` restores a layer exactly.

    Int8 operands (:meth:`use_int8_operands`, off by default and not saved): 4-bit weight
    codes unpacked once into a non-persistent buffer ``qweight_int8`` (int8 [N, K], code ·
    group integer; 1 byte per weight on top of the packed 0.5) and activations quantized to
    4-bit values stored as int8, so the GEMM runs the W8A8 kernel, whose tiles need no
    unpacking (no int4 tensor-core dot exists from Hopper on). Same result: the integer sums
    are exact either way.

    Dequantized weight cache (:meth:`cache_dequantized_weight`, off by default and not
    saved): for the PyTorch reference path (the ``"torch"`` backend, GPUs below sm_80, CPU),
    Ŵ in the rotated basis as a float32 [N, K] buffer (4 bytes per weight), built once instead
    of on every call; the same result bit for bit. The Triton path ignores it.

    forward: x [..., K] fp16/bf16/fp32 → y [..., N] in x's dtype. On CUDA (or with
    TRITON_INTERPRET=1) it runs the fused rotate+quantize kernel then the quantized GEMM; on
    CPU it runs their PyTorch references, which compute the same thing.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: QuantConfig = QuantConfig(),
        has_perm: bool = False,
        has_channel_scale: bool = False,
        has_channel_shift: bool = False,
        device=None,
        lowrank_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        check_k(in_features, config.group_size, "in_features")
        check_block(config.hadamard_block, in_features)
        rank = config.lowrank
        if rank > min(in_features, out_features):
            raise ValueError(f"lowrank {rank} exceeds min(in_features, out_features) = "
                             f"{min(in_features, out_features)}")
        config.check_rows(out_features)
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.register_buffer("qweight", torch.zeros(
            out_features, stored_columns(config.w_bits, in_features),
            dtype=code_dtype(config.w_bits), device=device))
        self.register_buffer("wscale", torch.zeros(out_features, device=device))
        two_level = config.w_bits == 4 and config.group_size is not None
        self.register_buffer("wgroup", torch.ones(
            out_features, in_features // config.group_size, dtype=torch.uint8, device=device)
            if two_level else None)
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device)
                             if has_perm else None)
        # kernels.hadamard.find_perm_runs of perm where from_linear or a load set it (never
        # per call; 8 lets the kernel read x in runs of 8 channels); 1, the plain gather, is
        # right for any perm
        self._perm_runs = 1
        self.register_buffer("channel_scale", torch.ones(in_features, device=device)
                             if has_channel_scale else None)
        self.register_buffer("channel_shift", torch.zeros(in_features, device=device)
                             if has_channel_shift else None)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("lowrank_down", torch.zeros(
            in_features, rank, dtype=lowrank_dtype, device=device) if rank else None)
        self.register_buffer("lowrank_up", torch.zeros(
            rank, out_features, dtype=lowrank_dtype, device=device) if rank else None)
        prepare_rotation(config.hadamard_block, self.qweight.device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: QuantConfig = QuantConfig(),
        perm: torch.Tensor | None = None,
        channel_scale: torch.Tensor | None = None,
        channel_shift: torch.Tensor | None = None,
        hessian: torch.Tensor | HessianFactor | None = None,
        split: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> "QuantLinear":
        """Quantize ``linear`` offline: W' = W·D⁻¹·S·H (float32 on the weight's device), then
        symmetric quantization with ``config.w_clip`` (kernels.quantize.quantize_weight_ref),
        or per output segment with ``config.w_clip_segments``.

        perm: int [K] permutation (see kernels.hadamard); channel_scale: positive float [K];
        channel_shift: finite float [K] (the layer then has a bias: b + W·δ, in float64);
        hessian: [K, K] Σ xᵀx of inputs in the rotated basis, or its gptq.HessianFactor (to
        quantize one layer many times): the codes are rounded by GPTQ (clq_triton.gptq) with
        the same scales, instead of to nearest.
        ``config.lowrank`` = r > 0: W·D⁻¹ is split into its rank-min(r, N, K) part, kept in the
        weight's dtype, and the residual that is quantized (clq_triton.lowrank).
        split: that split, from :meth:`lowrank_parts` with the same linear, rank and
        channel_scale, reused instead of recomputed (CLPS quantizes a layer with many clips)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        check_float("linear.weight", w, ndim=2)
        if not torch.isfinite(w).all():
            raise ValueError("linear.weight holds NaN or Inf; cannot quantize it")
        n, k = w.shape
        # calibration statistics live on the CPU: every part of the transform goes to the
        # weight's device here, the one place all of them meet the weight
        perm, channel_scale, channel_shift = to_device((perm, channel_scale, channel_shift),
                                                       w.device)
        check_perm(perm, k)
        if channel_scale is not None and (channel_scale.shape != (k,)
                                          or not bool((channel_scale > 0).all())):
            raise ValueError(f"channel_scale must be positive with shape ({k},)")
        if channel_shift is not None and (channel_shift.shape != (k,)
                                          or not bool(torch.isfinite(channel_shift).all())):
            raise ValueError(f"channel_shift must be finite with shape ({k},)")
        b = linear.bias
        config = config.replace(lowrank=min(config.lowrank, n, k))
        q = cls(k, n, bias=b is not None or channel_shift is not None, config=config,
                has_perm=perm is not None, has_channel_scale=channel_scale is not None,
                has_channel_shift=channel_shift is not None, device=w.device,
                lowrank_dtype=w.dtype)
        if channel_scale is not None:
            q.channel_scale.copy_(channel_scale)
        if config.lowrank:
            down, up, w = split if split is not None else \
                cls.lowrank_parts(linear, config.lowrank, channel_scale)
            r = config.lowrank
            if (down.shape, up.shape, w.shape) != ((k, r), (r, n), (n, k)):
                raise ValueError(f"split has shapes {tuple(down.shape)}, {tuple(up.shape)}, "
                                 f"{tuple(w.shape)}; expected ({k}, {r}), ({r}, {n}), ({n}, {k})")
            q.lowrank_down.copy_(down)
            q.lowrank_up.copy_(up)
        else:
            w = _smoothed(linear, channel_scale)
        codes, scale, group_int = _quantize_rows(rotate_ref(w, perm, config.hadamard_block),
                                                 hessian, config)
        q.qweight.copy_(pack_codes(codes, config.w_bits))
        q.wscale.copy_(scale)
        if group_int is not None:
            q.wgroup.copy_(group_int)
        if perm is not None:
            q.perm.copy_(perm.to(torch.int32))
            q._perm_runs = find_perm_runs(q.perm)
        if channel_shift is not None:
            shift = channel_shift.to(torch.float64)
            q.channel_shift.copy_(shift)
            folded = linear.weight.detach().double() @ shift
            if config.lowrank:  # the branch sees x, not x − δ
                folded -= (shift @ q.lowrank_down.double()) @ q.lowrank_up.double()
            q.bias.copy_(folded if b is None else b.detach().double() + folded)
        elif b is not None:
            q.bias.copy_(b.detach().float())
        return q

    @staticmethod
    def lowrank_parts(linear: nn.Linear, rank: int, channel_scale: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(down [K, r], up [r, N] in the weight's dtype, residual float32 [N, K]) of
        clq_triton.lowrank.lowrank_split for W·D⁻¹, r = min(rank, N, K), on the weight's
        device: what :meth:`from_linear` splits off, for its ``split`` argument."""
        w = linear.weight
        cs = None if channel_scale is None else channel_scale.to(w.device, torch.float32)
        return lowrank_split(_smoothed(linear, cs), min(rank, *w.shape), cs, w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float("x", x)
        if not x.dim() or x.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [..., "
                             f"in_features={self.in_features}]")
        if x.device != self._buffers["qweight"].device:
            raise ValueError(f"x is on {x.device} but the QuantLinear weights are on "
                             f"{self.qweight.device}; move one of them")
        cfg = self.config
        buf = self._buffers  # read directly: Module.__getattr__ costs µs per buffer per call
        flat = x.dim() == 2  # no reshapes then (µs each)
        x2 = x if flat else x.reshape(-1, self.in_features)
        w8 = buf.get("qweight_int8")
        int8 = w8 is not None
        # The operators directly (their implementations in plain eager calls): the buffers
        # were validated when built or loaded (perm read back once there), so the hot path
        # checks only x, above.
        xq, xs = rotate_quantize_op(x2, buf["perm"], buf["channel_shift"], buf["channel_scale"],
                                    cfg.hadamard_block, cfg.group_size, cfg.a_bits,
                                    float(cfg.a_clip), not int8, self._perm_runs)
        wd = buf.get("weight_dequantized")
        if wd is not None and not use_triton(xq):
            # int8 operands: the activation codes came unpacked (int8), whatever a_bits is
            y = dequantized_matmul(xq, xs, wd, buf["bias"], 8 if int8 else cfg.a_bits, x.dtype)
        elif int8:
            y = quant_matmul_op(xq, xs, w8, buf["wscale"], None, buf["bias"], 8, 8,
                                cfg.group_size, x.dtype)
        else:
            y = quant_matmul_op(xq, xs, buf["qweight"], buf["wscale"], buf["wgroup"], buf["bias"],
                                cfg.a_bits, cfg.w_bits, cfg.group_size, x.dtype)
        down = buf["lowrank_down"]
        if down is not None:
            y = torch.addmm(y, x2 @ down.to(x.dtype), buf["lowrank_up"].to(x.dtype))
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        """Module.to / .half() / .bfloat16() / .cuda() …: moves every buffer, but the float32
        ones (:data:`FLOAT32_BUFFERS`: scales, shift, bias) keep float32 — a dtype cast
        would lose their precision and make the checkpoint unreadable."""
        kept = {n: self._buffers[n] for n in FLOAT32_BUFFERS if self._buffers.get(n) is not None}
        for n in kept:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(kept)
            raise
        for n, t in kept.items():
            moved = fn(t)
            self._buffers[n] = moved if moved.dtype == torch.float32 else t.to(moved.device)
        prepare_rotation(self.config.hadamard_block, self.qweight.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Validates the incoming perm before any buffer is overwritten (forward trusts it),
        then loads; rebuilds an int8 weight copy from the loaded codes."""
        perm = state_dict.get(prefix + "perm")
        if torch.is_tensor(perm):
            check_perm(perm, self.in_features)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if torch.is_tensor(perm):  # the incoming values, checked above
            self._perm_runs = find_perm_runs(perm)
        if self.qweight_int8 is not None:
            self.use_int8_operands(True)
        if self._buffers.get("weight_dequantized") is not None:
            self.cache_dequantized_weight(True)

    def permute_outputs(self, rows: torch.Tensor) -> "QuantLinear":
        """Reorder the output features in place: the new y[..., j] is the old y[..., rows[j]]
        (every buffer indexed by output row follows). rows: int [N], a permutation. Refused
        with weight clips per output segment (``config.w_clip_segments``: ranges of rows)."""
        if self.config.w_clip_segments:
            raise ValueError("permute_outputs: this layer's weight clips are per output "
                             "segment (config.w_clip_segments); its rows cannot move")
        check_perm(rows, self.out_features)
        idx = rows.to(self.qweight.device, torch.long)
        for name in ("qweight", "wscale", "wgroup", "bias", "qweight_int8", "weight_dequantized"):
            if self._buffers.get(name) is not None:
                self._buffers[name] = self._buffers[name].index_select(0, idx)
        if self.lowrank_up is not None:
            self._buffers["lowrank_up"] = self.lowrank_up.index_select(1, idx)
        return self

    def take_permuted_input(self) -> torch.Tensor | None:
        """Drop the input permutation S in place and return it (None if the layer has none):
        the layer then expects its input already permuted, x[..., perm] (e.g. by its
        producer's :meth:`permute_outputs`), and computes what it computed before on x. The
        channel shift and multiplier and the low-rank branch's down, indexed by input
        channel, are reordered to match; the codes are in the rotated basis and stay."""
        perm = self._buffers["perm"]
        if perm is None:
            return None
        idx = perm.long()
        for name in ("channel_shift", "channel_scale"):
            if self._buffers[name] is not None:
                self._buffers[name] = self._buffers[name].index_select(0, idx)
        if self.lowrank_down is not None:
            self._buffers["lowrank_down"] = self.lowrank_down.index_select(0, idx)
        self._buffers["perm"] = None
        self._perm_runs = 1
        return perm

    def use_int8_operands(self, enabled: bool = True) -> "QuantLinear":
        """Run the GEMM on int8 operands (see the class docstring); ``False`` frees the int8
        weight copy. No effect on W8A8 layers, whose codes are int8 already."""
        cfg = self.config
        if enabled and 4 in (cfg.w_bits, cfg.a_bits):
            self._buffers["qweight_int8"] = int8_weight_codes(self.qweight, cfg.w_bits,
                                                              self.wgroup)
            self._non_persistent_buffers_set.add("qweight_int8")
        else:  # no buffer at all rather than a None one (accelerate's hooks move every one)
            self._buffers.pop("qweight_int8", None)
            self._non_persistent_buffers_set.discard("qweight_int8")
        return self

    def cache_dequantized_weight(self, enabled: bool = True) -> "QuantLinear":
        """Keep Ŵ (rotated basis, float32 [N, K]) for the PyTorch reference path (see the
        class docstring); ``False`` frees it. Built now, on the layer's device: never lazily
        inside a call (a CUDA-graph capture would own it)."""
        if enabled:
            self._buffers["weight_dequantized"] = self._rotated_weight()
            self._non_persistent_buffers_set.add("weight_dequantized")
        else:
            self._buffers.pop("weight_dequantized", None)
            self._non_persistent_buffers_set.discard("weight_dequantized")
        return self

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "qweight_int8":  # int8 operands off
                return None
            raise

    def _rotated_weight(self) -> torch.Tensor:
        """Ŵ in the rotated basis (the GEMM's), float32 [N, K]: codes · scales."""
        return dequantize_weight_ref(unpack_codes(self.qweight, self.config.w_bits),
                                     self.wscale, self.wgroup)

    def dequantized_weight(self) -> torch.Tensor:
        """Ŵ in the original basis, float32 [N, K]: Q(W·D⁻¹·G)·Gᵀ·D (+ (down·up)ᵀ with a
        low-rank branch)."""
        w = rotate_ref(self._rotated_weight(), self.perm, self.config.hadamard_block,
                       inverse=True)
        if self.channel_scale is not None:
            w = w * self.channel_scale
        if self.lowrank_down is not None:
            w = w + (self.lowrank_down.float() @ self.lowrank_up.float()).T
        return w

    def weight_nbytes(self) -> int:
        """Bytes of the quantized weight: packed codes, scales and the low-rank branch (bias
        excluded)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.qweight, self.wscale, self.wgroup, self.lowrank_down,
                             self.lowrank_up) if t is not None)

    def get_extra_state(self) -> torch.Tensor:
        """The layer's settings (format, config, shape) as JSON bytes in a uint8 CPU tensor: a
        tensor, so that every value of the state dict is one (accelerate's offload hooks,
        behind diffusers' ``enable_sequential_cpu_offload``, move every value)."""
        state = {"format": FORMAT_VERSION, "config": self.config.to_dict(),
                 "in_features": self.in_features, "out_features": self.out_features}
        return torch.tensor(list(json.dumps(state, sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor | dict) -> None:
        if torch.is_tensor(state):
            state = json.loads(bytes(state.cpu().tolist()).decode())
        version = state.get("format", 1)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"this QuantLinear state is weight format {version}; clq-triton "
                f"{_package_version()} reads format {FORMAT_VERSION} only (format 1 used "
                "interleaved nibbles and per-group fp16 weight scales): quantize the "
                "full-precision model again")
        cfg = QuantConfig(**state["config"])
        cfg.check_rows(self.out_features)
        if (state["in_features"], state["out_features"]) != (self.in_features, self.out_features) \
                or cfg.w_bits != self.config.w_bits or cfg.group_size != self.config.group_size \
                or cfg.lowrank != self.config.lowrank:
            raise ValueError(
                f"state is for a {state['in_features']}→{state['out_features']} "
                f"{cfg.name} g{cfg.group_size} rank {cfg.lowrank} layer, this layer is "
                f"{self.in_features}→{self.out_features} {self.config.name} "
                f"g{self.config.group_size} rank {self.config.lowrank}")
        self.config = cfg
        prepare_rotation(cfg.hadamard_block, self.qweight.device)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {c.name}, group_size={c.group_size}, "
                f"hadamard_block={c.hadamard_block}, perm={self.perm is not None}, "
                f"channel_scale={self.channel_scale is not None}, "
                f"channel_shift={self.channel_shift is not None}, lowrank={c.lowrank}")


def use_int8_operands(model: nn.Module, enabled: bool = True) -> int:
    """:meth:`QuantLinear.use_int8_operands` on every QuantLinear in ``model`` that has a
    4-bit side; returns how many. Call it after the model is on its device and after loading
    (the int8 copies are not saved)."""
    layers = [m.use_int8_operands(enabled) for m in model.modules()
              if isinstance(m, QuantLinear)]
    return sum(4 in (m.config.w_bits, m.config.a_bits) for m in layers)


def cache_dequantized_weights(model: nn.Module, enabled: bool = True) -> int:
    """:meth:`QuantLinear.cache_dequantized_weight` on every QuantLinear in ``model``; returns
    how many. For the PyTorch reference path only (4 bytes per weight); call it after the
    model is on its device."""
    return len([m.cache_dequantized_weight(enabled) for m in model.modules()
                if isinstance(m, QuantLinear)])


def _package_version() -> str:
    from . import __version__

    return __version__
