"""Quantized GEMM: y = dequant(xq) · dequant(wq)ᵀ + bias, computed as int dots per K-group.

Operands (K = reduction dim, G = group size):
- activations xq: 4 bits → uint8 [M, K/2] packed (low nibble = even column); 8 bits → int8 [M, K]
- xs: float32 [M, K/G], one scale per token per group
- weights wq: 4 bits → uint8 [N, K/2] packed the same way; 8 bits → int8 [N, K]
- ws: float16/bfloat16/float32 [N, K/G], one scale per output channel per group
- bias: optional [N], any float dtype
Result y: [M, N] in ``out_dtype`` (fp16/bf16/fp32).

The kernel unpacks nibbles to int8 in registers (Hopper/Ampere tensor cores have int8, not
int4, dots), accumulates each group's int8×int8 dot in int32 — exact — and rescales once per
group: ``acc += dot_g · xs[:, g] · ws[:, g]`` in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import (
    FLOAT_DTYPES,
    check_bits,
    check_dtype,
    check_float,
    check_group,
    check_same_device,
    interpreter_on,
    use_triton,
)
from .quantize import unpack_int4_ref


def _configs():
    if interpreter_on():  # the CPU interpreter: one small tile, nothing to tune
        return [triton.Config({"BM": 16, "BN": 32, "BK": 32, "GROUP_M": 4}, num_warps=4)]
    out = []
    for bm, bn, warps in ((128, 128, 8), (128, 256, 8), (64, 128, 4), (128, 64, 4), (64, 64, 4)):
        for bk in (32, 64, 128):
            for stages in (3, 4):
                out.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8},
                                         num_warps=warps, num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):
    group = kwargs.get("GROUP", named_args.get("GROUP"))
    kept = [c for c in configs if group % c.kwargs["BK"] == 0]
    return kept or configs[:1]


@triton.jit
def _load_codes(ptr, rows, stride, k0, BR: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr):
    """Load a [BR, BK] tile of int8 codes starting at column k0 (unpacking int4 nibbles)."""
    if BITS == 4:
        cols = k0 // 2 + tl.arange(0, BK // 2)
        raw = tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :]).to(tl.int32)
        lo = (raw << 28) >> 28  # arithmetic shifts sign-extend the nibble
        hi = (raw << 24) >> 28
        return tl.reshape(tl.join(lo, hi), (BR, BK)).to(tl.int8)
    else:
        cols = k0 + tl.arange(0, BK)
        return tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :])


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "GROUP", "A_BITS", "W_BITS"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _quant_matmul_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    A_BITS: tl.constexpr, W_BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order so that neighbouring programs share weight tiles in L2.
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rm_in = rm % M  # wrapped rows/cols load valid memory; the store is masked
    rn_in = rn % N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in range(0, K // GROUP):
        dot = tl.zeros((BM, BN), dtype=tl.int32)
        for kk in range(0, GROUP // BK):
            k0 = g * GROUP + kk * BK
            a = _load_codes(a_ptr, rm_in, stride_am, k0, BM, BK, A_BITS)
            b = _load_codes(b_ptr, rn_in, stride_bn, k0, BN, BK, W_BITS)
            dot = tl.dot(a, tl.trans(b), dot)
        xs = tl.load(as_ptr + rm_in.to(tl.int64) * stride_asm + g)
        ws = tl.load(bs_ptr + rn_in.to(tl.int64) * stride_bsn + g).to(tl.float32)
        acc += dot.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=mask)


def _codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4_ref(q) if bits == 4 else q


def quant_matmul_ref(xq, xs, wq, ws, bias, a_bits, w_bits, group_size, out_dtype):
    """Reference of :func:`quant_matmul` (and the CPU fallback): one float32 matmul of the
    dequantized operands, ``(codes_x · xs) @ (codes_w · ws)ᵀ + bias`` — the same sum as the
    kernel's per-group integer dots, up to float32 rounding."""
    a = _codes(xq, a_bits).float()
    b = _codes(wq, w_bits).float()
    m, k = a.shape
    a = (a.view(m, k // group_size, group_size) * xs.float().unsqueeze(-1)).view(m, k)
    b = (b.view(-1, k // group_size, group_size) * ws.float().unsqueeze(-1)).view(-1, k)
    y = a @ b.T
    if bias is not None:
        y += bias.float()[None, :]
    return y.to(out_dtype)


def quant_matmul(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None,
    a_bits: int,
    w_bits: int,
    group_size: int,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W{w_bits}A{a_bits} GEMM; see the module docstring for layouts. Returns y [M, N]."""
    check_bits("a_bits", a_bits)
    check_bits("w_bits", w_bits)
    check_dtype("xq", xq, torch.uint8 if a_bits == 4 else torch.int8)
    check_dtype("wq", wq, torch.uint8 if w_bits == 4 else torch.int8)
    if xq.dim() != 2 or wq.dim() != 2:
        raise ValueError(f"xq and wq must be 2-D, got {tuple(xq.shape)} and {tuple(wq.shape)}")
    m, n = xq.shape[0], wq.shape[0]
    k = xq.shape[1] * (2 if a_bits == 4 else 1)
    kw = wq.shape[1] * (2 if w_bits == 4 else 1)
    if kw != k:
        raise ValueError(f"activations have K={k} but weights have K={kw}")
    check_group(group_size, k)
    check_dtype("xs", xs, torch.float32)
    check_float("ws", ws)
    if tuple(xs.shape) != (m, k // group_size) or tuple(ws.shape) != (n, k // group_size):
        raise ValueError(
            f"scales must be xs [{m}, {k // group_size}] and ws [{n}, {k // group_size}], "
            f"got {tuple(xs.shape)} and {tuple(ws.shape)}")
    if bias is not None:
        check_float("bias", bias, ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have {n} elements, got {bias.shape[0]}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    check_same_device(xq=xq, xs=xs, wq=wq, ws=ws, bias=bias, out=out)
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != out_dtype
                            or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous {out_dtype} ({m}, {n}), "
                         f"got {out.dtype} {tuple(out.shape)}")
    if not use_triton(xq):
        y = quant_matmul_ref(xq, xs, wq, ws, bias, a_bits, w_bits, group_size, out_dtype)
        return out.copy_(y) if out is not None else y
    for name, t in (("xq", xq), ("xs", xs), ("wq", wq), ("ws", ws)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have contiguous columns (stride(-1) == 1)")
    c = out if out is not None else torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return c
    bias_arg = bias.contiguous() if bias is not None else c

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    _quant_matmul_kernel[grid](
        xq, xs, wq, ws, bias_arg, c,
        m, n, k, triton.next_power_of_2(m),
        xq.stride(0), xs.stride(0), wq.stride(0), ws.stride(0), c.stride(0),
        A_BITS=a_bits, W_BITS=w_bits, GROUP=group_size, HAS_BIAS=bias is not None,
    )
    return c
