"""Quantized GEMM: y = dequant(xq) · dequant(wq)ᵀ + bias with int8 tensor-core dots.

Operands (K = reduction dim; layouts and scale modes: :mod:`clq_triton.kernels.formats`):
- xq: activations, 4 bits → uint8 [M, K/2] (split-halves packing), 8 bits → int8 [M, K]
- xs: float32 [M, n_groups] (n_groups = K/G, or 1 per token when group_size is None)
- wq: weights [N, K/2] / [N, K], the same layouts
- ws: float32 [N], one scale per output channel
- wz: uint8 [N, K/G], the integer group scales of 4-bit two-level weights (4-bit weights with a
  group size only; None otherwise)
- bias: optional [N], any float dtype (the kernel reads it as float32)
Result y: [M, N] in ``out_dtype`` (fp16/bf16/fp32).

Kernel: a loaded K step of BK columns of 4-bit codes is unpacked into low and high halves
*times 16*: a packed byte ``h·16 + l`` gives ``l·16 = b << 4`` and ``h·16 = b & 0xF0`` as int8,
two bit operations per 32-bit word of 4 bytes (inline PTX; the interpreter runs the same with
int8 shifts), where sign-extending each nibble took ~6 byte-wise instructions per byte.
``dot(a_lo, b_lo) + dot(a_hi, b_hi)`` accumulates exactly in int32 (|product| ≤ 128·128, so
per channel K ≤ 131008), and the epilogue divides by 16 per 4-bit operand (a power of two:
the result is bit for bit the unscaled one's). Per channel, one int32 accumulator runs over
all of K and the float rescale ``xs·ws`` happens once in the epilogue. Per group (BK = G),
each K step's int32 sum is multiplied by the weights' integer group scale z (int32, per output
column) and scaled by the token's group scale into an fp32 accumulator; the weight's float
scale stays in the epilogue.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import tuning
from ._runtime import (
    FLOAT_DTYPES,
    aligned,
    check_float,
    check_out,
    check_same_device,
    check_tensor,
    define_op,
    device_guard,
    interpreter_on,
    use_triton,
)
from .formats import (
    BIT_PAIRS,
    GROUP_SIZES,
    check_bit_pair,
    check_k,
    code_dtype,
    logical_columns,
    n_groups,
    unpack_codes,
)
from .quantize import dequantize_ref, dequantize_weight_ref


@triton.jit
def _nibbles_x16(raw, ASM: tl.constexpr):
    """(16·low nibble, 16·high nibble) of int8 bytes, as int8. With ``ASM`` two 32-bit PTX
    operations per 4 bytes (``shl`` + ``and`` / ``and``); else int8 shifts (interpreter)."""
    if ASM:
        lo = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shl.b32 t, $1, 4; and.b32 $0, t, 0xF0F0F0F0; }", "=r,r", [raw],
            dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise("and.b32 $0, $1, 0xF0F0F0F0;", "=r,r", [raw],
                                       dtype=tl.int8, is_pure=True, pack=4)
    else:
        lo = raw << 4
        hi = (raw >> 4) << 4
    return lo, hi


@triton.jit
def _load_halves(ptr, rows, stride, k0, BK: tl.constexpr, BITS: tl.constexpr,
                 ASM: tl.constexpr):
    """int8 [R, BK/2] × 2: the low- and high-nibble columns of K step [k0, k0 + BK); 4-bit
    codes come times 16 (:func:`_nibbles_x16`)."""
    HALF: tl.constexpr = BK // 2
    j = tl.arange(0, HALF)
    base = ptr + rows[:, None].to(tl.int64) * stride
    if BITS == 4:
        raw = tl.load(base + (k0 // 2 + j)[None, :])  # int8 view of the packed bytes
        return _nibbles_x16(raw, ASM)
    else:
        lo = k0 + (j // 32) * 64 + (j % 32)
        return tl.load(base + lo[None, :]), tl.load(base + (lo + 32)[None, :])


# Specialization contract (what the compile tests compile): the launcher guarantees that the
# pointers and the ALIGNED integers are multiples of 16 (Triton's "divisibility" attribute, which
# lets loads vectorize); the NO_SPECIALIZE integers vary with the shape and are never
# specialized (neither on divisibility nor on the value 1).
ALIGNED = ("a_ptr", "as_ptr", "b_ptr", "bz_ptr", "bs_ptr", "bias_ptr", "c_ptr", "K",
           "stride_am", "stride_bn")
NO_SPECIALIZE = ("M", "N", "stride_asm", "stride_bzn", "stride_cm")


@triton.jit
def _int_dot(a, b, acc, W_LEFT: tl.constexpr):
    """acc + a·bᵀ (a: activation tile [BM, BK'], b: weight tile [BN, BK'], int8), or with
    ``W_LEFT`` acc + b·aᵀ, the transposed product (acc [BN, BM]): the weight is then the
    left operand, which Hopper's wgmma takes from registers, so an unpacked 4-bit weight tile
    need not go through shared memory."""
    # one return after a static if/else: triton also traces the statements after a static
    # branch that returns, which broke non-square tiles (BM != BN)
    if W_LEFT:
        out = tl.dot(b, tl.trans(a), acc, out_dtype=tl.int32)
    else:
        out = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    return out


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _quant_matmul_kernel(
    a_ptr, as_ptr, b_ptr, bz_ptr, bs_ptr, bias_ptr, c_ptr,
    M, N, K, stride_am, stride_asm, stride_bn, stride_bzn, stride_cm, has_bias,
    A_BITS: tl.constexpr, W_BITS: tl.constexpr, GROUP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    W_LEFT: tl.constexpr, UNPACK_ASM: tl.constexpr,
):
    # 4-bit codes are unpacked times 16 (_nibbles_x16): the epilogue divides it out
    X16: tl.constexpr = (16 if A_BITS == 4 else 1) * (16 if W_BITS == 4 else 1)
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
    # accumulators are [BM, BN], or [BN, BM] with W_LEFT (transposed back at the end)
    if GROUP == 0:
        if W_LEFT:
            acc_i = tl.zeros((BN, BM), dtype=tl.int32)
        else:
            acc_i = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):
            if A_BITS == 8 and W_BITS == 8:
                cols = k0 + tl.arange(0, BK)
                a = tl.load(a_ptr + rm_in[:, None].to(tl.int64) * stride_am + cols[None, :])
                b = tl.load(b_ptr + rn_in[:, None].to(tl.int64) * stride_bn + cols[None, :])
                acc_i = _int_dot(a, b, acc_i, W_LEFT)
            else:
                a_lo, a_hi = _load_halves(a_ptr, rm_in, stride_am, k0, BK, A_BITS, UNPACK_ASM)
                b_lo, b_hi = _load_halves(b_ptr, rn_in, stride_bn, k0, BK, W_BITS, UNPACK_ASM)
                acc_i = _int_dot(a_lo, b_lo, acc_i, W_LEFT)
                acc_i = _int_dot(a_hi, b_hi, acc_i, W_LEFT)
        if W_LEFT:
            acc_i = tl.trans(acc_i)
        xs = tl.load(as_ptr + rm_in.to(tl.int64) * stride_asm)
        acc = acc_i.to(tl.float32) * xs[:, None]
    else:
        if W_LEFT:
            acc = tl.zeros((BN, BM), dtype=tl.float32)
            zero = tl.zeros((BN, BM), dtype=tl.int32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            zero = tl.zeros((BM, BN), dtype=tl.int32)
        for k0 in range(0, K, BK):  # BK == GROUP: one group per step
            if A_BITS == 8 and W_BITS == 8:
                cols = k0 + tl.arange(0, BK)
                a = tl.load(a_ptr + rm_in[:, None].to(tl.int64) * stride_am + cols[None, :])
                b = tl.load(b_ptr + rn_in[:, None].to(tl.int64) * stride_bn + cols[None, :])
                d = _int_dot(a, b, zero, W_LEFT)
            else:
                a_lo, a_hi = _load_halves(a_ptr, rm_in, stride_am, k0, BK, A_BITS, UNPACK_ASM)
                b_lo, b_hi = _load_halves(b_ptr, rn_in, stride_bn, k0, BK, W_BITS, UNPACK_ASM)
                d = _int_dot(a_lo, b_lo, zero, W_LEFT)
                d = _int_dot(a_hi, b_hi, d, W_LEFT)
                if W_BITS == 4:  # two-level weights: the group's sum times z, exact in int32
                    z = tl.load(bz_ptr + rn_in.to(tl.int64) * stride_bzn + k0 // GROUP)
                    if W_LEFT:
                        d = d * z.to(tl.int32)[:, None]
                    else:
                        d = d * z.to(tl.int32)[None, :]
            xs = tl.load(as_ptr + rm_in.to(tl.int64) * stride_asm + k0 // GROUP)
            if W_LEFT:
                acc += d.to(tl.float32) * xs[None, :]
            else:
                acc += d.to(tl.float32) * xs[:, None]
        if W_LEFT:
            acc = tl.trans(acc)
    acc = acc * (tl.load(bs_ptr + rn_in) * (1.0 / X16))[None, :]  # 1/X16: a power of 2
    if has_bias:
        acc += tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :],
             acc.to(c_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------- launcher

_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def signature(a_bits: int, w_bits: int, out_dtype: torch.dtype) -> dict:
    """Triton signature of the pointer and scalar arguments (for compiling without a GPU):
    only the output pointer varies (the bias is always float32, the codes an int8 view)."""
    return {"a_ptr": "*i8", "as_ptr": "*fp32", "b_ptr": "*i8", "bz_ptr": "*u8",
            "bs_ptr": "*fp32", "bias_ptr": "*fp32",
            "c_ptr": f"*{_TL[out_dtype]}", "M": "i32", "N": "i32", "K": "i32",
            "stride_am": "i32", "stride_asm": "i32", "stride_bn": "i32", "stride_bzn": "i32",
            "stride_cm": "i32", "has_bias": "u1"}


@functools.lru_cache(maxsize=None)
def constexprs(a_bits: int, w_bits: int, group_size: int | None,
               cfg: tuning.GemmConfig, asm: bool = True) -> dict:
    """The kernel's compile-time arguments (cached, shared: copy to change). ``asm``: unpack
    nibbles with inline PTX (every compiled launch; the interpreter cannot run PTX)."""
    return dict(A_BITS=a_bits, W_BITS=w_bits, GROUP=group_size or 0,
                BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=cfg.GROUP_M, W_LEFT=cfg.W_LEFT,
                UNPACK_ASM=asm)


def kernel_specs(arch: int, configs=None):
    """Every (signature, constexprs, num_warps, num_stages) the launcher can produce on
    ``arch`` with its table configs (or with ``configs``, bf16 output only): for the compile
    tests. The bias is a runtime flag."""
    out = []
    dtypes = FLOAT_DTYPES if configs is None else (torch.bfloat16,)
    for w_bits, a_bits in BIT_PAIRS:
        for group in GROUP_SIZES:
            for base in configs or tuning.table_configs(arch):
                for k in (4096, 4096 + 64):  # K % 128 == 0 or not: BK 128 or 64 per channel
                    cfg = base.fitted(k, group, a_bits, w_bits, arch)
                    for out_dtype in dtypes:
                        out.append((signature(a_bits, w_bits, out_dtype),
                                    constexprs(a_bits, w_bits, group, cfg),
                                    cfg.num_warps, cfg.num_stages))
    return list({repr(o): o for o in out}.values())


def quant_matmul_ref(xq, xs, wq, ws, wz, bias, a_bits, w_bits, out_dtype):
    """Reference of :func:`quant_matmul` (and the CPU fallback): one float32 matmul of the
    dequantized operands — the same sum as the kernel's integer dots, up to fp32 rounding."""
    return dequantized_matmul(xq, xs, dequantize_weight_ref(unpack_codes(wq, w_bits), ws, wz),
                              bias, a_bits, out_dtype)


def dequantized_matmul(xq, xs, w, bias, a_bits, out_dtype):
    """:func:`quant_matmul_ref` with the weight already dequantized: ``w`` float32 [N, K]."""
    a = dequantize_ref(unpack_codes(xq, a_bits), xs)
    y = a @ w.T
    if bias is not None:
        y += bias.float()[None, :]
    return y.to(out_dtype)


def _config(xq, m, n, k, a_bits, w_bits, group_size, launch) -> tuning.GemmConfig:
    if interpreter_on() and not xq.is_cuda:
        return tuning.INTERPRETER_CONFIG.fitted(k, group_size, a_bits, w_bits)
    dev = xq.device
    arch = tuning.device_arch(dev)
    tuning.warn_if_unchecked(arch)
    if not tuning.autotune_enabled():
        return tuning.fitted_table_config(arch, m, k, group_size, a_bits, w_bits)
    key = tuning.autotune_key(arch, w_bits, a_bits, group_size, m, n, k)
    candidates = {c.fitted(k, group_size, a_bits, w_bits, arch)
                  for c in tuning.autotune_space(arch)}

    def bench(cfg):
        launch(cfg)  # compiles; raises if the config cannot run here
        # 20 ms per candidate gave picks up to 5× slower than the table when re-measured on an
        # H100 (bench/results/gpu-2026-11-27): measure longer, take the median
        return triton.testing.do_bench(lambda: launch(cfg), warmup=25, rep=100,
                                       return_mode="median")

    return tuning.tuned_config(tuning.cache_file(dev), key, sorted(candidates, key=str), bench)


def quant_matmul(
    xq: torch.Tensor,
    xs: torch.Tensor,
    wq: torch.Tensor,
    ws: torch.Tensor,
    wz: torch.Tensor | None,
    bias: torch.Tensor | None,
    a_bits: int,
    w_bits: int,
    group_size: int | None,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W{w_bits}A{a_bits} GEMM; see the module docstring for layouts. Returns y [M, N].

    Without ``out`` this calls the operator ``torch.ops.clq_triton.quant_matmul`` (its
    implementation directly in plain eager calls: ``_runtime.define_op``); ``out`` = a
    preallocated contiguous [M, N] tensor of ``out_dtype`` to write into (eager only)."""
    check_bit_pair(w_bits, a_bits)
    if xq.dim() != 2 or wq.dim() != 2:
        raise ValueError(f"xq and wq must be 2-D, got {tuple(xq.shape)} and {tuple(wq.shape)}")
    m, n = xq.shape[0], wq.shape[0]
    k = logical_columns(a_bits, xq.shape[1])
    if xq.dtype != code_dtype(a_bits):
        raise TypeError(f"xq must be {code_dtype(a_bits)} for {a_bits}-bit codes, got {xq.dtype}")
    if wq.dtype != code_dtype(w_bits):
        raise TypeError(f"wq must be {code_dtype(w_bits)} for {w_bits}-bit codes, got {wq.dtype}")
    if logical_columns(w_bits, wq.shape[1]) != k:
        raise ValueError(f"activations have K={k} but weights have "
                         f"K={logical_columns(w_bits, wq.shape[1])}")
    check_k(k, group_size)  # per channel at most formats.MAX_K_PER_CHANNEL: exact int32 sums
    check_tensor("xs", xs, (m, n_groups(group_size, k)), torch.float32)
    check_tensor("ws", ws, (n,), torch.float32)
    if w_bits == 4 and group_size is not None:
        if wz is None:
            raise ValueError("4-bit weights with a group size need wz (integer group scales)")
        check_tensor("wz", wz, (n, k // group_size), torch.uint8)
    elif wz is not None:
        raise ValueError("wz exists only for 4-bit weights with a group size")
    if bias is not None:
        check_float("bias", bias, ndim=1)
        if bias.shape[0] != n:
            raise ValueError(f"bias must have {n} elements, got {bias.shape[0]}")
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    check_same_device(xq=xq, xs=xs, wq=wq, ws=ws, wz=wz, bias=bias, out=out)
    if out is None:
        return quant_matmul_op(xq, xs, wq, ws, wz, bias, a_bits, w_bits, group_size, out_dtype)
    check_out("out", out, (m, n), out_dtype, xq.device)
    _compute(xq, xs, wq, ws, wz, bias, a_bits, w_bits, group_size, out)
    return out


def _quant_matmul_op(xq, xs, wq, ws, wz, bias, a_bits, w_bits, group_size, out_dtype):
    """The PyTorch operator ``torch.ops.clq_triton.quant_matmul`` (inputs validated by
    :func:`quant_matmul`): opaque to torch.compile, capturable in CUDA graphs."""
    c = torch.empty((xq.shape[0], wq.shape[0]), dtype=out_dtype, device=xq.device)
    _compute(xq, xs, wq, ws, wz, bias, a_bits, w_bits, group_size, c)
    return c


def _quant_matmul_fake(xq, xs, wq, ws, wz, bias, a_bits, w_bits, group_size, out_dtype):
    return xq.new_empty((xq.shape[0], wq.shape[0]), dtype=out_dtype)


# torch.ops.clq_triton.quant_matmul, or its implementation for plain eager calls
quant_matmul_op = define_op(
    "quant_matmul(Tensor xq, Tensor xs, Tensor wq, Tensor ws, Tensor? wz, Tensor? bias, "
    "int a_bits, int w_bits, int? group_size, ScalarType out_dtype) -> Tensor",
    _quant_matmul_op, _quant_matmul_fake)


def _compute(xq, xs, wq, ws, wz, bias, a_bits, w_bits, group_size, c) -> None:
    """c = the GEMM of validated operands: the kernel, or the reference where it does not run."""
    m, n = c.shape
    k = logical_columns(a_bits, xq.shape[1])
    if not use_triton(xq):
        c.copy_(quant_matmul_ref(xq, xs, wq, ws, wz, bias, a_bits, w_bits, c.dtype))
        return
    if m == 0 or n == 0:
        return
    # the specialization contract (ALIGNED): copies only for odd views, never for our buffers
    a8, b8 = aligned(xq, rows=True), aligned(wq, rows=True)
    a8 = a8 if a8.dtype == torch.int8 else a8.view(torch.int8)
    b8 = b8 if b8.dtype == torch.int8 else b8.view(torch.int8)
    xs, ws, wz = aligned(xs), aligned(ws), aligned(wz)
    if bias is not None:  # one pointer type: *fp32
        bias = aligned(bias if bias.dtype == torch.float32 else bias.float())
    # placeholders of the signature's pointer types (never read: flags / GROUP say so)
    args = (a8, xs, b8, wz if wz is not None else b8.view(torch.uint8), ws,
            bias if bias is not None else ws, c, m, n, k, a8.stride(0), xs.stride(0),
            b8.stride(0), wz.stride(0) if wz is not None else 0, c.stride(0), bias is not None)
    asm = not interpreter_on()

    def launch(cfg):
        grid = ((-(-m // cfg.BM)) * (-(-n // cfg.BN)),)  # not triton.cdiv: µs per call
        _quant_matmul_kernel[grid](*args, **_launch_kwargs(a_bits, w_bits, group_size, cfg, asm))

    with device_guard(xq):
        launch(_config(xq, m, n, k, a_bits, w_bits, group_size, launch))


@functools.lru_cache(maxsize=1024)
def _launch_kwargs(a_bits, w_bits, group_size, cfg, asm) -> dict:
    """The keyword arguments of a launch with ``cfg``: constexprs, warps, stages (cached)."""
    return dict(constexprs(a_bits, w_bits, group_size, cfg, asm), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)
