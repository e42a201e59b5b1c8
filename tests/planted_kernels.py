"""Kernels with planted faults that the compiler rejects or miscompiles relative to the
interpreter: the compile check must report them (tests/test_compile.py)."""

import triton
import triton.language as tl


@triton.jit
def int_dot(a_ptr, b_ptr, c_ptr, K: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """int8 · int8 into an int32 accumulator. Without ``out_dtype=tl.int32`` (OUT_DTYPE False)
    triton 3.6 refuses it: the fault that broke the first GPU run, which the interpreter of
    triton 3.9 accepts. With K < 32 the GPU compiler refuses any int8 dot, while the
    interpreter runs it."""
    r = tl.arange(0, 64)
    k = tl.arange(0, K)
    a = tl.load(a_ptr + r[:, None] * K + k[None, :])
    b = tl.load(b_ptr + r[:, None] * K + k[None, :])
    acc = tl.zeros((64, 64), dtype=tl.int32)
    if OUT_DTYPE:
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    else:
        acc = tl.dot(a, tl.trans(b), acc)
    tl.store(c_ptr + r[:, None] * 64 + r[None, :], acc)


@triton.jit
def finite_by_subtraction(x_ptr, c, out_ptr, SAFE: tl.constexpr):
    """1 where y = x·c is finite. ``y - y == 0`` (SAFE False) compiles to fma(x, c, −x·c),
    the product's rounding error: 0 (finite) in the interpreter, nonzero on the GPU for most
    c. ``|y| < inf`` (SAFE True) has no arithmetic to contract."""
    r = tl.arange(0, 128)
    y = tl.load(x_ptr + r) * c
    if SAFE:
        finite = tl.abs(y) < float("inf")
    else:
        finite = (y - y) == 0
    tl.store(out_ptr + r, finite.to(tl.int8))


@triton.jit
def row_softmax(x_ptr, out_ptr, N: tl.constexpr):
    """Softmax of a [64, N] tile: the whole tile stays live across the row max and sum, so
    with one warp N = 256 needs 512 values per thread and must spill; N = 16 fits."""
    r = tl.arange(0, 64)
    c = tl.arange(0, N)
    x = tl.load(x_ptr + r[:, None] * N + c[None, :])
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    tl.store(out_ptr + r[:, None] * N + c[None, :], e / tl.sum(e, axis=1)[:, None])
