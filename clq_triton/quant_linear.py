"""QuantLinear: a drop-in nn.Linear replacement holding quantized, rotated weights."""

from __future__ import annotations

import torch
from torch import nn

from .config import QuantConfig
from .kernels._runtime import check_float
from .kernels.gemm import quant_matmul
from .kernels.hadamard import check_block, check_perm, rotate_ref
from .kernels.quantize import dequantize_ref, pack_int4_ref, quantize_ref, unpack_int4_ref
from .kernels.rotate_quantize import rotate_quantize

WEIGHT_SCALE_DTYPE = torch.float16


class QuantLinear(nn.Module):
    """y = Q(x·D·G) · Q(W·D⁻¹·G)ᵀ + b with G = S·H (permutation then block Hadamard) and D an
    optional positive per-channel diagonal (SmoothQuant); D = I and S = I when absent.

    Buffers:
      qweight: 4 bits → uint8 [N, K/2] packed (low nibble = even column); 8 bits → int8 [N, K]
      wscale:  float16 [N, K/group_size], per output channel per group
      perm:    int32 [K] channel permutation S, or None
      channel_scale: float32 [K] diagonal of D, or None
      bias:    [N] in the source layer's dtype, or None
    The settings (bits, group size, Hadamard block, activation clip) travel in the state dict
    as extra state, so ``load_state_dict`` restores a layer exactly.

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
        bias_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        if in_features % config.group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of "
                             f"group_size={config.group_size}")
        check_block(config.hadamard_block, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        packed_k = in_features // 2 if config.w_bits == 4 else in_features
        qdtype = torch.uint8 if config.w_bits == 4 else torch.int8
        self.register_buffer("qweight", torch.zeros(out_features, packed_k, dtype=qdtype,
                                                    device=device))
        self.register_buffer("wscale", torch.zeros(out_features, in_features // config.group_size,
                                                   dtype=WEIGHT_SCALE_DTYPE, device=device))
        self.register_buffer("perm", torch.arange(in_features, dtype=torch.int32, device=device)
                             if has_perm else None)
        self.register_buffer("channel_scale", torch.ones(in_features, device=device)
                             if has_channel_scale else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device)
                             if bias else None)
        self.register_load_state_dict_post_hook(_check_loaded_perm)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: QuantConfig = QuantConfig(),
        perm: torch.Tensor | None = None,
        channel_scale: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """Quantize ``linear`` offline: W' = W·D⁻¹·S·H (float32 on the weight's device), then
        per-channel per-group symmetric quantization with ``config.w_clip``.

        perm: int [K] permutation (see kernels.hadamard); channel_scale: positive float [K]."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        check_float("linear.weight", w, ndim=2)
        if not torch.isfinite(w).all():
            raise ValueError("linear.weight holds NaN or Inf; cannot quantize it")
        n, k = w.shape
        check_perm(perm, k)
        if channel_scale is not None and (channel_scale.shape != (k,)
                                          or not bool((channel_scale > 0).all())):
            raise ValueError(f"channel_scale must be positive with shape ({k},)")
        b = linear.bias
        q = cls(k, n, bias=b is not None, config=config, has_perm=perm is not None,
                has_channel_scale=channel_scale is not None,
                bias_dtype=b.dtype if b is not None else torch.float32, device=w.device)
        w = w.float()
        if channel_scale is not None:
            cs = channel_scale.to(w.device, torch.float32)
            q.channel_scale.copy_(cs)
            w = w / cs
        w_rot = rotate_ref(w, perm, config.hadamard_block)
        codes, scales = quantize_ref(w_rot, config.group_size, config.w_bits, config.w_clip,
                                     scale_dtype=WEIGHT_SCALE_DTYPE)
        q.qweight.copy_(pack_int4_ref(codes) if config.w_bits == 4 else codes)
        q.wscale.copy_(scales)
        if perm is not None:
            q.perm.copy_(perm.to(torch.int32))
        if b is not None:
            q.bias.copy_(b.detach())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float("x", x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features in its last dim, "
                             f"expected in_features={self.in_features}")
        if x.device != self.qweight.device:
            raise ValueError(f"x is on {x.device} but the QuantLinear weights are on "
                             f"{self.qweight.device}; move one of them")
        cfg = self.config
        x2 = x.reshape(-1, self.in_features)
        xq, xs = rotate_quantize(x2, self.perm, cfg.hadamard_block, cfg.group_size, cfg.a_bits,
                                 cfg.a_clip, channel_scale=self.channel_scale,
                                 check_perm_values=False)  # checked in from_linear / on load
        y = quant_matmul(xq, xs, self.qweight, self.wscale, self.bias, cfg.a_bits, cfg.w_bits,
                         cfg.group_size, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """Ŵ in the original basis, float32 [N, K]: Q(W·D⁻¹·G)·Gᵀ·D."""
        codes = unpack_int4_ref(self.qweight) if self.config.w_bits == 4 else self.qweight
        w_rot = dequantize_ref(codes, self.wscale, self.config.group_size)
        w = rotate_ref(w_rot, self.perm, self.config.hadamard_block, inverse=True)
        return w * self.channel_scale if self.channel_scale is not None else w

    def weight_nbytes(self) -> int:
        """Bytes of the quantized weight: packed codes plus scales (bias excluded)."""
        return self.qweight.numel() * self.qweight.element_size() + \
            self.wscale.numel() * self.wscale.element_size()

    def get_extra_state(self) -> dict:
        return {"config": self.config.to_dict(), "in_features": self.in_features,
                "out_features": self.out_features}

    def set_extra_state(self, state: dict) -> None:
        cfg = QuantConfig(**state["config"])
        if (state["in_features"], state["out_features"]) != (self.in_features, self.out_features) \
                or cfg.w_bits != self.config.w_bits or cfg.group_size != self.config.group_size:
            raise ValueError(
                f"state is for a {state['in_features']}→{state['out_features']} "
                f"{cfg.name} g{cfg.group_size} layer, this layer is {self.in_features}→"
                f"{self.out_features} {self.config.name} g{self.config.group_size}")
        self.config = cfg

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {c.name}, group_size={c.group_size}, "
                f"hadamard_block={c.hadamard_block}, perm={self.perm is not None}, "
                f"channel_scale={self.channel_scale is not None}")


def _check_loaded_perm(module: QuantLinear, incompatible_keys) -> None:
    """After load_state_dict: the loaded perm must be a permutation (forward trusts it)."""
    check_perm(module.perm, module.in_features)
