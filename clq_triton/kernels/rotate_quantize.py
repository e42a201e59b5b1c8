"""Fused online activation path: gather by permutation → block Hadamard → per-group
quantize → INT4/INT8 pack, in one pass over x (kernel ``_rotate_quantize_kernel``).

The same kernel with ``BITS=0`` writes the rotated values in x's dtype (``rotate``).
References: :func:`clq_triton.kernels.hadamard.rotate_ref` and
:mod:`clq_triton.kernels.quantize`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._runtime import check_bits, check_float, check_group, check_same_device, use_triton
from .hadamard import MAX_KERNEL_BLOCK, apply_outer_hadamard, check_block, check_perm, rotate_ref
from .quantize import pack_int4_ref, qmax_for, quantize_ref, scale_multiplier


@triton.jit
def _rotate_quantize_kernel(
    x_ptr, perm_ptr, cs_ptr, q_ptr, s_ptr,
    M, stride_xm, stride_qm, stride_sm,
    scale_mult, h_norm,
    BM: tl.constexpr, TILE: tl.constexpr, HB: tl.constexpr, LOG2_HB: tl.constexpr,
    GROUP: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_CS: tl.constexpr,
):
    # One program: BM rows × TILE columns (TILE = max(HB, GROUP), a multiple of both).
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * TILE + tl.arange(0, TILE)
    row_ok = rm < M
    if HAS_PERM:
        src = tl.load(perm_ptr + rk)
    else:
        src = rk
    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + src[None, :],
                mask=row_ok[:, None], other=0.0)
    if HAS_CS:  # per-channel multiplier (SmoothQuant); x·D stays float32
        x = x.to(tl.float32) * tl.load(cs_ptr + src)[None, :]
    if HB > 0:
        # Block-diagonal Sylvester Hadamard, unnormalized (±1 is exact in every dtype):
        # H[i, j] = (-1)^popcount(i & j) inside a block, 0 across blocks.
        i = tl.arange(0, TILE)
        both = i[:, None] & i[None, :]
        parity = tl.zeros((TILE, TILE), dtype=tl.int32)
        for b in tl.static_range(LOG2_HB):
            parity = parity ^ ((both >> b) & 1)
        same_block = (i[:, None] // HB) == (i[None, :] // HB)
        h = tl.where(same_block, 1 - 2 * parity, 0).to(tl.float32)
        # fp16 and bf16 values are exact in tf32 (10-bit mantissa), so tf32 tensor-core
        # products are exact for them; fp32 input needs the full-precision dot.
        if x.dtype == tl.float32:
            xr = tl.dot(x, h, input_precision="ieee")
        else:
            xr = tl.dot(x.to(tl.float32), h, input_precision="tf32")
        xr = xr * h_norm
    else:
        xr = x.to(tl.float32)

    if BITS == 0:
        cols = pid_k * TILE + tl.arange(0, TILE)
        tl.store(q_ptr + rm[:, None].to(tl.int64) * stride_qm + cols[None, :],
                 xr.to(q_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        NG: tl.constexpr = TILE // GROUP
        g = tl.reshape(xr, (BM, NG, GROUP))
        finite = (g - g) == 0  # false for NaN and ±Inf
        bad = tl.max(tl.where(finite, 0, 1), axis=2) > 0
        amax = tl.max(tl.where(finite, tl.abs(g), 0.0), axis=2)
        scale = amax * scale_mult
        inv = tl.where(scale > 0, 1.0 / tl.where(scale > 0, scale, 1.0), 0.0)
        mag = tl.minimum(tl.floor(tl.abs(g) * inv[:, :, None] + 0.5), QMAX)
        codes = tl.where(g < 0, -mag, mag)
        codes = tl.where(bad[:, :, None], 0.0, codes)
        codes = tl.reshape(codes, (BM, TILE)).to(tl.int32)
        scale = tl.where(bad, float("nan"), scale)
        sg = pid_k * NG + tl.arange(0, NG)
        tl.store(s_ptr + rm[:, None].to(tl.int64) * stride_sm + sg[None, :], scale,
                 mask=row_ok[:, None])
        if BITS == 4:
            lo, hi = tl.split(tl.reshape(codes, (BM, TILE // 2, 2)))
            packed = ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)
            pc = pid_k * (TILE // 2) + tl.arange(0, TILE // 2)
            tl.store(q_ptr + rm[:, None].to(tl.int64) * stride_qm + pc[None, :], packed,
                     mask=row_ok[:, None])
        else:
            cols = pid_k * TILE + tl.arange(0, TILE)
            tl.store(q_ptr + rm[:, None].to(tl.int64) * stride_qm + cols[None, :],
                     codes.to(tl.int8), mask=row_ok[:, None])


def _check_out(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be {dtype} {tuple(shape)} on {device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _launch(x2, perm, block, group, bits, clip, q, s, channel_scale=None):
    """Run the kernel on x2 [M, K] (rows may be strided, columns contiguous)."""
    m, k = x2.shape
    if block is not None and block > MAX_KERNEL_BLOCK:
        x2 = _scale_channels(x2, channel_scale)
        channel_scale = None
        if perm is not None:
            x2 = x2[:, perm.long()]
            perm = None
        x2 = apply_outer_hadamard(x2, block)
        block = MAX_KERNEL_BLOCK
    hb = block or 0
    tile = max(hb, group if bits else 16)
    if k % tile:  # only reachable in float mode without rotation
        raise ValueError(f"K={k} must be a multiple of 16 for the Triton rotate kernel")
    bm = max(16, min(64, 8192 // tile))
    perm_arg = perm.to(torch.int32) if perm is not None else x2
    grid = (triton.cdiv(m, bm), k // tile)
    cs_arg = channel_scale if channel_scale is not None else x2
    _rotate_quantize_kernel[grid](
        x2, perm_arg, cs_arg, q, s if s is not None else q,
        m, x2.stride(0), q.stride(0), s.stride(0) if s is not None else 0,
        scale_multiplier(bits, clip) if bits else 1.0,
        1.0 / math.sqrt(hb) if hb else 1.0,
        BM=bm, TILE=tile, HB=hb, LOG2_HB=int(math.log2(hb)) if hb else 0,
        GROUP=group if bits else tile, BITS=bits, QMAX=qmax_for(bits) if bits else 0,
        HAS_PERM=perm is not None, HAS_CS=channel_scale is not None,
    )


def _scale_channels(x: torch.Tensor, channel_scale: torch.Tensor | None) -> torch.Tensor:
    """x·diag(channel_scale) in float32 (x unchanged when channel_scale is None)."""
    if channel_scale is None:
        return x
    return x.float() * channel_scale


def _check_channel_scale(channel_scale: torch.Tensor | None, k: int) -> None:
    if channel_scale is None:
        return
    if channel_scale.dtype != torch.float32 or tuple(channel_scale.shape) != (k,):
        raise ValueError(f"channel_scale must be float32 ({k},), got {channel_scale.dtype} "
                         f"{tuple(channel_scale.shape)}")


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rotate(
    x: torch.Tensor,
    perm: torch.Tensor | None = None,
    block: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x·S·H along the last dim. x: [..., K] fp16/bf16/fp32; returns x's shape and dtype."""
    check_float("x", x)
    k = x.shape[-1]
    check_block(block, k)
    check_perm(perm, k)
    check_same_device(x=x, perm=perm, out=out)
    if out is not None:
        _check_out("out", out, x.shape, x.dtype, x.device)
    if not use_triton(x):
        y = rotate_ref(x, perm, block).to(x.dtype)
        return out.copy_(y) if out is not None else y
    x2 = _as_rows(x)
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _launch(x2, perm, block, 16, 0, 1.0, y.view(-1, k), None)
    return y


def rotate_quantize(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    block: int | None,
    group_size: int,
    bits: int,
    clip: float = 1.0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    channel_scale: torch.Tensor | None = None,
    check_perm_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the rotated activations x·D·S·H per token per group.

    D = diag(channel_scale) (float32 [K], optional) is the SmoothQuant-style per-channel
    multiplier; x·D is kept in float32 (full-precision Hadamard dot); S·H as in ``rotate``.

    x: [M, K] fp16/bf16/fp32 (columns contiguous; rows may be strided).
    Returns (q, scales):
      q: 4 bits → uint8 [M, K // 2], packed (low nibble = even column);
         8 bits → int8 [M, K];
      scales: float32 [M, K // group_size] (NaN for groups holding NaN/Inf).
    ``out`` optionally gives preallocated (q, scales) to write into.
    ``check_perm_values=False`` skips reading ``perm`` back to check it is a permutation (a
    device sync); only for a perm validated before, as QuantLinear does.
    """
    check_float("x", x, ndim=2)
    check_bits("bits", bits)
    m, k = x.shape
    check_group(group_size, k)
    check_block(block, k)
    check_perm(perm, k, values=check_perm_values)
    _check_channel_scale(channel_scale, k)
    check_same_device(x=x, perm=perm, channel_scale=channel_scale)
    q_shape = (m, k // 2) if bits == 4 else (m, k)
    q_dtype = torch.uint8 if bits == 4 else torch.int8
    if out is None:
        q = torch.empty(q_shape, dtype=q_dtype, device=x.device)
        s = torch.empty((m, k // group_size), dtype=torch.float32, device=x.device)
    else:
        q, s = out
        _check_out("out[0]", q, q_shape, q_dtype, x.device)
        _check_out("out[1]", s, (m, k // group_size), torch.float32, x.device)
    if not use_triton(x):
        xr = rotate_ref(_scale_channels(x, channel_scale), perm, block)
        codes, scales = quantize_ref(xr, group_size, bits, clip)
        q.copy_(pack_int4_ref(codes) if bits == 4 else codes)
        s.copy_(scales)
        return q, s
    if m:
        _launch(_as_rows(x), perm, block, group_size, bits, clip, q, s, channel_scale)
    return q, s
