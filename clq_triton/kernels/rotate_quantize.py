"""Fused online activation path: gather by permutation → (channel shift, channel multiplier)
→ block Hadamard → quantize → pack, in one pass over x (kernel ``_rotate_quantize_kernel``).

Layouts and scale modes: :mod:`clq_triton.kernels.formats`. Reference:
:func:`~clq_triton.kernels.hadamard.rotate_ref`, then
:func:`~clq_triton.kernels.quantize.quantize_ref`.

The kernel works on tiles of T = max(Hadamard block, 64) columns. It loads a tile as two
halves, x_lo = the columns that land in low nibbles (64p + j, j < 32) and x_hi = the
high-nibble columns (+32), so the packed bytes come out without any shuffle. Splitting the
columns by bit 5 splits the block-diagonal Sylvester Hadamard H too:
- blocks ≤ 32 never straddle the halves: y_lo = x_lo·H', y_hi = x_hi·H' (H' = the same blocks
  over T/2 columns);
- blocks ≥ 64 do, as one butterfly: with P = x_lo·H'' and Q = x_hi·H'' (H'' = blocks of half
  the size), y_lo = P + Q and y_hi = P − Q.
H' / H'' is a ±1 float32 tile held once per device in global memory (``_hadamard_tile``, made
ahead of the first call by :func:`prepare`, e.g. when a QuantLinear is built), loaded once
per program and applied with tensor-core dots: tf32 for plain fp16/bf16 inputs (their values
are exact in tf32, the ±1 entries too, accumulation is fp32). fp32 inputs and inputs shifted or
scaled per channel first are not exact in tf32 (plain tf32 cost 5e-4 relative error on an
H100); they are split into a tf32 part and the exact remainder, two tf32 dots (``_dot_pm1``:
tf32x3's result without its third dot, which is 0 against ±1 entries). Programs
are persistent over row blocks. Groups that fit in a tile are quantized from registers;
larger scale spans (a group of 256 with a smaller tile, or the whole row with
``group_size=None``) take two passes over the span's tiles, reading x twice: the span's max
first, then the codes. Where one program per (row block, span) would leave SMs idle (per-token
scales on a few thousand tokens), the two passes are two launches over (row block, tile)
instead, with the tiles' maxima in a float32 [M, K / T] buffer between them
(``_split_spans``).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._runtime import (
    aligned,
    check_float,
    check_out,
    check_same_device,
    define_op,
    device_guard,
    interpreter_on,
    use_triton,
)
from .formats import (
    check_bits,
    check_k,
    code_dtype,
    n_groups,
    pack_codes,
    qmax_for,
    storage_bits,
    stored_columns,
)
from .hadamard import (
    MAX_KERNEL_BLOCK,
    PERM_RUN,
    apply_outer_hadamard,
    check_block,
    check_perm,
    find_perm_runs,
    hadamard_matrix,
    outer_factor,
    rotate_unchecked,
)
from .quantize import quantize_ref, scale_multiplier


@triton.jit
def _tf32_split(x):
    """(hi, lo) with hi = x rounded to tf32 (10 mantissa bits, to nearest, ties away from 0)
    and lo = x − hi, exact in float32, |lo| ≤ 2⁻¹¹·|x|."""
    bits = x.to(tl.int32, bitcast=True)
    hi = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _dot_pm1(x, h, PREC: tl.constexpr):
    """x·h, float32 [BM, HALF], for a ±1 tile h. PREC "tf32": x is exact in tf32 (fp16/bf16
    values), one dot. "tf32x2": x = hi + lo (``_tf32_split``), lo·h + hi·h: the tf32x3
    products minus x·(h − tf32(h)) = 0, error ≤ 2⁻²¹·|x| per term from lo's tf32 rounding.
    Any other value is passed to ``tl.dot`` as its input_precision (the probe's "tf32x3",
    "ieee")."""
    if PREC == "tf32x2":
        hi, lo = _tf32_split(x)
        return tl.dot(hi, h, tl.dot(lo, h, input_precision="tf32"), input_precision="tf32")
    else:
        return tl.dot(x, h, input_precision=PREC)


@triton.jit
def _load_rotated(base, src_lo, src_hi, row_ok, sh_ptr, cs_ptr, h, h_norm, has_sh, has_cs,
                  butterfly, ROT: tl.constexpr, PREC: tl.constexpr):
    """The halves of a tile read from source columns src_lo / src_hi of the rows at ``base``,
    float32: ((x − shift)·scale), then the rotation."""
    x_lo = tl.load(base + src_lo[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    x_hi = tl.load(base + src_hi[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    if has_sh:
        x_lo = x_lo - tl.load(sh_ptr + src_lo)[None, :]
        x_hi = x_hi - tl.load(sh_ptr + src_hi)[None, :]
    if has_cs:
        x_lo = x_lo * tl.load(cs_ptr + src_lo)[None, :]
        x_hi = x_hi * tl.load(cs_ptr + src_hi)[None, :]
    if ROT:
        p = _dot_pm1(x_lo, h, PREC)
        q = _dot_pm1(x_hi, h, PREC)
        x_lo = tl.where(butterfly, p + q, p) * h_norm
        x_hi = tl.where(butterfly, p - q, q) * h_norm
    return x_lo, x_hi


@triton.jit
def _rotated_halves(x_ptr, perm_ptr, sh_ptr, cs_ptr, h, rows, row_ok, stride_xm, k0, h_norm,
                    has_perm, perm_runs8, has_sh, has_cs, butterfly, HALF: tl.constexpr,
                    ROT: tl.constexpr, PREC: tl.constexpr):
    """(y_lo, y_hi) float32 [BM, HALF]: the rotated low- and high-nibble columns of a tile,
    ((x − shift)·scale)·S·H with the shift and scale indexed by the source column. ROT 0: no
    rotation; 1: both halves times the ±1 tile h, then, for blocks ≥ 64 (``butterfly``, a
    runtime flag: blocks 16, 32 and 64 share a specialization), their sum and difference."""
    j = tl.arange(0, HALF)
    lo_cols = k0 + (j // 32) * 64 + (j % 32)
    base = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    # two load paths, each reading x itself: through one index merged from all three
    # layouts, every load was a 2-byte gather (sm_90 PTX: ld.global.b16); with a third path
    # for the identity, each specialization took about 1.5x as long to compile (sm_80, 116
    # specializations: 226 -> 145 s of compiling on a CPU, 2026-12-03). Each path rotates its
    # own loads: where the paths met before the shift and the dots, triton 3.6 gave the wide
    # tiles code that its ptxas could not allocate (T = 256, float32 dots: 32 registers and
    # 37 KB spilled per thread, sm_90; checked in tests/test_compile.py)
    if has_perm and not perm_runs8:  # any permutation: a gather of single values
        src_lo = tl.load(perm_ptr + lo_cols)
        src_hi = tl.load(perm_ptr + lo_cols + 32)
        y_lo, y_hi = _load_rotated(base, src_lo, src_hi, row_ok, sh_ptr, cs_ptr, h, h_norm,
                                   has_sh, has_cs, butterfly, ROT, PREC)
    else:
        # aligned runs of 8 channels: a permutation of runs (smoothing.outlier_permutation,
        # said so by perm_runs8) or none (the tile's own columns, runs of 32). Said so (on
        # the loaded values: a hint on the select is lost where the select folds), triton
        # reads each run 16 bytes at a time (ld.global.v4 for bf16)
        runs_lo = tl.load(perm_ptr + lo_cols, mask=has_perm, other=0)
        runs_hi = tl.load(perm_ptr + lo_cols + 32, mask=has_perm, other=0)
        runs_lo = tl.max_contiguous(tl.multiple_of(runs_lo, 8), 8)
        runs_hi = tl.max_contiguous(tl.multiple_of(runs_hi, 8), 8)
        src_lo = tl.where(has_perm, runs_lo, lo_cols)
        src_hi = tl.where(has_perm, runs_hi, lo_cols + 32)
        y_lo, y_hi = _load_rotated(base, src_lo, src_hi, row_ok, sh_ptr, cs_ptr, h, h_norm,
                                   has_sh, has_cs, butterfly, ROT, PREC)
    return y_lo, y_hi


@triton.jit
def _codes(y, inv, bad, qmax):
    """Round half away from zero, clamp to ±qmax; 0 where ``bad``. int32."""
    mag = tl.minimum(tl.floor(tl.abs(y) * inv + 0.5), qmax)
    c = tl.where(y < 0, -mag, mag)
    return tl.where(bad, 0.0, c).to(tl.int32)


@triton.jit
def _store_codes(q_ptr, rows, row_ok, stride_qm, k0, c_lo, c_hi, packed, HALF: tl.constexpr):
    """``packed`` (4-bit codes): byte k0/2 + j = c_lo | c_hi << 4. Else one int8 code per
    column, at the natural columns: its two's-complement byte (q is a uint8 view)."""
    j = tl.arange(0, HALF)
    base = q_ptr + rows[:, None].to(tl.int64) * stride_qm
    if packed:
        byte = ((c_lo & 15) | ((c_hi & 15) << 4)).to(tl.uint8)
        tl.store(base + (k0 // 2 + j)[None, :], byte, mask=row_ok[:, None])
    else:
        lo_cols = k0 + (j // 32) * 64 + (j % 32)
        tl.store(base + lo_cols[None, :], (c_lo & 255).to(tl.uint8), mask=row_ok[:, None])
        tl.store(base + (lo_cols + 32)[None, :], (c_hi & 255).to(tl.uint8),
                 mask=row_ok[:, None])


@triton.jit
def _max_finite(y_lo, y_hi, AXIS: tl.constexpr):
    """(max |y| over finite values, count of non-finite values) along AXIS of both halves.

    Finite means |y| < inf (false for NaN and ±Inf). Not ``y - y == 0``: with y = d·c the
    compiler contracts that to fma(d, c, −d·c), the product's rounding error, which is nonzero
    for most c (it flagged every group of blocks 32 and 128 as non-finite on an H100)."""
    f_lo = tl.abs(y_lo) < float("inf")
    f_hi = tl.abs(y_hi) < float("inf")
    amax = tl.maximum(tl.max(tl.where(f_lo, tl.abs(y_lo), 0.0), axis=AXIS),
                      tl.max(tl.where(f_hi, tl.abs(y_hi), 0.0), axis=AXIS))
    nbad = (tl.sum(tl.where(f_lo, 0, 1), axis=AXIS) + tl.sum(tl.where(f_hi, 0, 1), axis=AXIS))
    return amax, nbad


@triton.jit
def _scale_and_inverse(amax, nbad, scale_mult):
    """(scale with NaN where the group held NaN/Inf, 1/scale or 0, bad mask)."""
    bad = nbad > 0
    scale = amax * scale_mult
    inv = tl.where(scale > 0, 1.0 / tl.where(scale > 0, scale, 1.0), 0.0)
    return tl.where(bad, float("nan"), scale), inv, bad


# Specialization contract (see gemm.py): pointers and ALIGNED integers are multiples of 16.
ALIGNED = ("x_ptr", "perm_ptr", "sh_ptr", "cs_ptr", "h_ptr", "q_ptr", "s_ptr", "p_ptr", "span",
           "stride_xm", "stride_qm")
NO_SPECIALIZE = ("M", "stride_sm", "stride_pm", "n_row_blocks")


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _rotate_quantize_kernel(
    x_ptr, perm_ptr, sh_ptr, cs_ptr, h_ptr, q_ptr, s_ptr, p_ptr,
    M, span, stride_xm, stride_qm, stride_sm, stride_pm, scale_mult, h_norm, qmax, n_row_blocks,
    has_perm, perm_runs8, has_sh, has_cs, packed, butterfly,
    BM: tl.constexpr, T: tl.constexpr, ROT: tl.constexpr, PREC: tl.constexpr,
    TILE_GROUP: tl.constexpr, PHASE: tl.constexpr,
):
    # Program (i, j) handles row blocks i, i + P, i + 2P, … (P programs along axis 0) and
    # column range j.
    # PHASE 0, TILE_GROUP > 0: the T-column tile j, holding T / TILE_GROUP groups.
    # PHASE 0, TILE_GROUP == 0: scale span j of ``span`` columns (a group larger than T, or the
    #   whole row per token), in two loops over its tiles: the span's max first, then its codes.
    # The same spans as two launches over (row block, tile j), for more programs than spans:
    # PHASE 1 writes tile j's max |y| per row into p (float32 [M, K / T]; −1 where the tile
    # holds NaN/Inf); PHASE 2 reduces the maxima of tile j's span, writes the span's scale
    # (from the span's first tile) and tile j's codes.
    # packed: how codes are stored (4-bit codes two per byte, else one int8 each, through a
    # uint8 view); qmax: their range (7 for 4-bit codes, also when stored as int8 for int8
    # tensor-core operands; 127 for 8-bit codes). Both runtime values: every code format
    # shares one specialization (fewer JIT and compile-check compiles).
    HALF: tl.constexpr = T // 2
    hj = tl.arange(0, HALF)
    if ROT:
        h = tl.load(h_ptr + hj[:, None] * HALF + hj[None, :])
    else:
        h = 0.0
    col = tl.program_id(1)
    for mb in range(tl.program_id(0), n_row_blocks, tl.num_programs(0)):
        rows = mb * BM + tl.arange(0, BM)
        row_ok = rows < M
        if PHASE == 1:
            y_lo, y_hi = _rotated_halves(x_ptr, perm_ptr, sh_ptr, cs_ptr, h, rows, row_ok,
                                         stride_xm, col * T, h_norm, has_perm, perm_runs8, has_sh,
                                         has_cs, butterfly, HALF, ROT, PREC)
            t_max, t_bad = _max_finite(y_lo, y_hi, 1)
            tl.store(p_ptr + rows.to(tl.int64) * stride_pm + col,
                     tl.where(t_bad > 0, -1.0, t_max), mask=row_ok)
        elif PHASE == 2:
            tiles = span // T
            first = (col // tiles) * tiles
            amax = tl.zeros((BM,), dtype=tl.float32)
            low = tl.zeros((BM,), dtype=tl.float32)
            for c0 in range(first, first + tiles, 32):
                cj = c0 + tl.arange(0, 32)
                pt = tl.load(p_ptr + rows[:, None].to(tl.int64) * stride_pm + cj[None, :],
                             mask=row_ok[:, None] & (cj < first + tiles)[None, :], other=0.0)
                amax = tl.maximum(amax, tl.max(pt, axis=1))
                low = tl.minimum(low, tl.min(pt, axis=1))
            scale, inv, bad = _scale_and_inverse(amax, tl.where(low < 0, 1, 0), scale_mult)
            if col == first:
                tl.store(s_ptr + rows.to(tl.int64) * stride_sm + col // tiles, scale,
                         mask=row_ok)
            y_lo, y_hi = _rotated_halves(x_ptr, perm_ptr, sh_ptr, cs_ptr, h, rows, row_ok,
                                         stride_xm, col * T, h_norm, has_perm, perm_runs8, has_sh,
                                         has_cs, butterfly, HALF, ROT, PREC)
            _store_codes(q_ptr, rows, row_ok, stride_qm, col * T,
                         _codes(y_lo, inv[:, None], bad[:, None], qmax),
                         _codes(y_hi, inv[:, None], bad[:, None], qmax), packed, HALF)
        elif TILE_GROUP == 0:
            amax = tl.zeros((BM,), dtype=tl.float32)
            nbad = tl.zeros((BM,), dtype=tl.int32)
            for k0 in range(col * span, col * span + span, T):
                y_lo, y_hi = _rotated_halves(x_ptr, perm_ptr, sh_ptr, cs_ptr, h, rows, row_ok,
                                             stride_xm, k0, h_norm, has_perm, perm_runs8, has_sh,
                                             has_cs, butterfly, HALF, ROT, PREC)
                t_max, t_bad = _max_finite(y_lo, y_hi, 1)
                amax = tl.maximum(amax, t_max)
                nbad += t_bad
            scale, inv, bad = _scale_and_inverse(amax, nbad, scale_mult)
            tl.store(s_ptr + rows.to(tl.int64) * stride_sm + col, scale, mask=row_ok)
            for k0 in range(col * span, col * span + span, T):
                y_lo, y_hi = _rotated_halves(x_ptr, perm_ptr, sh_ptr, cs_ptr, h, rows, row_ok,
                                             stride_xm, k0, h_norm, has_perm, perm_runs8, has_sh,
                                             has_cs, butterfly, HALF, ROT, PREC)
                _store_codes(q_ptr, rows, row_ok, stride_qm, k0,
                             _codes(y_lo, inv[:, None], bad[:, None], qmax),
                             _codes(y_hi, inv[:, None], bad[:, None], qmax), packed, HALF)
        else:
            NG: tl.constexpr = T // TILE_GROUP
            GH: tl.constexpr = TILE_GROUP // 2
            k0 = col * T
            y_lo, y_hi = _rotated_halves(x_ptr, perm_ptr, sh_ptr, cs_ptr, h, rows, row_ok,
                                         stride_xm, k0, h_norm, has_perm, perm_runs8, has_sh,
                                         has_cs, butterfly, HALF, ROT, PREC)
            g_lo = tl.reshape(y_lo, (BM, NG, GH))
            g_hi = tl.reshape(y_hi, (BM, NG, GH))
            amax, nbad = _max_finite(g_lo, g_hi, 2)
            scale, inv, bad = _scale_and_inverse(amax, nbad, scale_mult)
            sg = col * NG + tl.arange(0, NG)
            tl.store(s_ptr + rows[:, None].to(tl.int64) * stride_sm + sg[None, :], scale,
                     mask=row_ok[:, None])
            c_lo = _codes(g_lo, inv[:, :, None], bad[:, :, None], qmax)
            c_hi = _codes(g_hi, inv[:, :, None], bad[:, :, None], qmax)
            _store_codes(q_ptr, rows, row_ok, stride_qm, k0, tl.reshape(c_lo, (BM, HALF)),
                         tl.reshape(c_hi, (BM, HALF)), packed, HALF)


# ------------------------------------------------------------------------------- launcher

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def plan(dtype: torch.dtype, block: int | None, group_size: int | None,
         prescaled: bool = False, phase: int = 0) -> dict:
    """The kernel's compile-time arguments and launch settings for one call (:func:`_plan`;
    cached: one dict per setting, shared by every call — copy it to change it). The code
    format (bits, packing) is a runtime argument: one plan for all."""
    return _plan(dtype, block, group_size, prescaled, phase, interpreter_on())


@functools.lru_cache(maxsize=None)
def _plan(dtype, block, group_size, prescaled, phase, interpreter) -> dict:
    """The kernel's compile-time arguments and launch settings for one call; ``prescaled``:
    a channel shift or multiplier is applied before the rotation; ``phase``: 0 = one launch,
    1 / 2 = the two launches of split scale spans (``TILE_GROUP == 0`` only).

    Blocks above ``MAX_KERNEL_BLOCK`` (256) are split: the launcher applies the permutation, the
    channel shift and multiplier and the outer Hadamard factor in PyTorch (float32), the kernel
    the inner one. The compile tests enumerate the same function (:func:`kernel_specs`)."""
    if block is not None and block > MAX_KERNEL_BLOCK:
        dtype = torch.float32
        block = MAX_KERNEL_BLOCK
        prescaled = False  # done by the launcher
    hb = block or 0
    t = max(hb, 64)  # the rotation's tile: as small as the block allows (fewer dot flops)
    rot = int(hb > 0)
    # without a rotation there is no dot: one PREC (one specialization) for every input
    exact_tf32 = rot == 0 or (dtype != torch.float32 and not prescaled)
    tile_group = group_size if group_size is not None and group_size <= t else 0
    if phase and tile_group:
        raise ValueError("phases 1 and 2 are for scale spans wider than the tile")
    bm = 16 if interpreter else {64: 64, 128: 32, 256: 16}[t]
    # 8 warps where float32 values take two dots per half on wide tiles: at T = 256, ptxas
    # (triton 3.6, sm_80/89/90) spilled 164-260 B per thread with 4 warps, 24-40 with 8; the
    # per-token path at T = 128 spilled 16 B on sm_80 with 4, none with 8, and with tf32x3
    # ran 1.0-1.6x faster (BM 64-16) with 8 warps on an H100 (bench/results/gpu-2026-11-27/).
    warps = 8 if not exact_tf32 and (t == 256 or (t == 128 and tile_group == 0)) else 4
    return {
        "constexprs": dict(BM=bm, T=t, ROT=rot, PREC="tf32" if exact_tf32 else "tf32x2",
                           TILE_GROUP=tile_group, PHASE=phase),
        "num_warps": warps, "dtype": dtype, "block": hb,
        # blocks >= 64 straddle the tile's halves: a butterfly over a tile of half-size blocks
        "butterfly": hb >= 64, "h_block": hb // 2 if hb >= 64 else hb,
    }


def kernel_specs():
    """Every distinct (dtype, compile-time arguments, num_warps) the launcher can produce on a
    GPU — the GPU's plans even where the interpreter is on (as in the test suite, whose
    interpreter tiles are smaller): for the compile tests. The permutation, the channel shift
    and the channel multiplier are runtime flags."""
    seen = {}
    for dtype in KERNEL_DTYPES:
        for block in (None, 16, 32, 64, 128, 256, 512):
            for group in (None, 64, 128, 256):
                for prescaled, phase in itertools.product((False, True), (0, 1, 2)):
                    try:
                        p = _plan(dtype, block, group, prescaled, phase, False)
                    except ValueError:
                        continue
                    seen.setdefault((p["dtype"], tuple(sorted(p["constexprs"].items())),
                                     p["num_warps"]), p)
    return list(seen.values())


def signature(dtype: torch.dtype) -> dict:
    """Triton signature of the pointer and scalar arguments (for compiling without a GPU);
    codes of every format are written through a uint8 pointer."""
    x = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    return {"x_ptr": x, "perm_ptr": "*i32", "sh_ptr": "*fp32", "cs_ptr": "*fp32", "h_ptr": "*fp32",
            "q_ptr": "*u8", "s_ptr": "*fp32", "p_ptr": "*fp32",
            "M": "i32", "span": "i32", "stride_xm": "i32", "stride_qm": "i32",
            "stride_sm": "i32", "stride_pm": "i32", "scale_mult": "fp32", "h_norm": "fp32",
            "qmax": "fp32", "n_row_blocks": "i32", "has_perm": "u1", "perm_runs8": "u1",
            "has_sh": "u1", "has_cs": "u1", "packed": "u1", "butterfly": "u1"}


@functools.lru_cache(maxsize=None)
def _hadamard_tile(half: int, h_block: int, device: torch.device) -> torch.Tensor:
    """±1 float32 [half, half]: block-diagonal Sylvester Hadamard with blocks of h_block."""
    h = hadamard_matrix(h_block, torch.float32)
    return torch.block_diag(*([h] * (half // h_block))).to(device).contiguous()


def prepare(block: int | None, device: torch.device) -> None:
    """Build now the ±1 tile the kernel loads for Hadamard ``block`` on ``device`` (kept, one
    per device and tile). The launcher would build it on its first call; under CUDA-graph
    capture (``torch.compile(mode="reduce-overhead")``, ``torch.cuda.graph``) that first
    call allocates from the graph's pool and copies from pageable host memory, which breaks
    the capture. QuantLinear calls this when it is built, moved or loaded."""
    device = torch.device(device)
    if block is None or device.type == "meta":
        return
    if block > MAX_KERNEL_BLOCK:  # and the outer factor the launcher applies
        outer_factor(block // MAX_KERNEL_BLOCK, device)
    p = plan(torch.float32, block, None)  # T and the tile depend on the block only
    c = p["constexprs"]
    if c["ROT"]:
        _hadamard_tile(c["T"] // 2, p["h_block"], device)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs_per_column(device: torch.device) -> int:
    """Persistent programs along the rows: a few waves of the GPU (2 in the interpreter, so
    that the tests run the row loop)."""
    return 4 * _sm_count(device) if device.type == "cuda" else 2


def _split_spans(programs: int, device: torch.device) -> bool:
    """Whether scale spans wider than the tile (per-token scales, groups of 256 on small
    tiles) take the two-launch path (tile maxima, then codes; ``programs`` per tile instead of
    per span): when one program per (row block, span) would leave SMs idle. On an H100 the
    one-launch per-token path ran 64 programs for 4096 tokens and was latency-bound
    (bench/results/gpu-2026-11-27/). In the interpreter: below 2 programs, so that the tests
    run both paths."""
    return programs < (_sm_count(device) if device.type == "cuda" else 2)


class _LaunchPlan(NamedTuple):
    """Everything a launch needs that does not depend on M (:func:`_launch_plan`)."""
    bm: int  # rows per row block
    span: int  # columns per scale (K per token)
    n_tiles: int  # K / T
    n_spans: int  # K / span
    wide_spans: bool  # spans wider than the tile: one launch per span or two per tile
    one: tuple  # the keyword arguments (constexprs, num_warps) of each launch: one launch
    split: tuple  # ... and the two launches of split spans (empty where tiles hold groups)
    h: torch.Tensor | None  # the ±1 tile, None without a rotation
    scalars: tuple  # scale_mult, h_norm, qmax
    flags: tuple  # has_perm, perm_runs8, has_sh, has_cs, packed, butterfly


@functools.lru_cache(maxsize=4096)
def _launch_plan(planner, interpreter, dtype, device, k, block, group, bits, clip, packed, runs8,
                 has_perm, has_sh, has_cs) -> _LaunchPlan:
    """The launch settings of one layer's calls, built on its first call and kept (tens of µs
    of Python per call otherwise): ``planner`` (the module's :func:`plan`) for each launch,
    the ±1 tile (built ahead by :func:`prepare`), the scalar arguments. ``planner`` and
    ``interpreter`` are in the key so that an override of :func:`plan` (bench/rotate_probe.py,
    which clears this cache when it changes its settings) or of the interpreter flag (the
    benchmarks' stubs) never meets a plan made without it."""
    del interpreter  # plan() reads it
    prescaled = has_sh or has_cs
    p = planner(dtype, block, group, prescaled)
    c = p["constexprs"]
    span = k if group is None else group
    wide = not c["TILE_GROUP"]

    def kwargs(phase):
        q = planner(dtype, block, group, prescaled, phase) if phase else p
        return dict(q["constexprs"], num_warps=p["num_warps"])

    return _LaunchPlan(
        bm=c["BM"], span=span, n_tiles=k // c["T"], n_spans=k // span,
        wide_spans=wide, one=(kwargs(0),), split=(kwargs(1), kwargs(2)) if wide else (),
        h=_hadamard_tile(c["T"] // 2, p["h_block"], device) if c["ROT"] else None,
        scalars=(scale_multiplier(bits, clip), 1.0 / math.sqrt(p["block"]) if p["block"]
                 else 1.0, float(qmax_for(bits))),
        flags=(has_perm, runs8, has_sh, has_cs, storage_bits(bits, packed) == 4,
               p["butterfly"]))


def _launch(x2, perm, block, group, bits, clip, q, s, channel_shift, channel_scale, packed,
            perm_runs):
    if block is not None and block > MAX_KERNEL_BLOCK:
        x2 = _shift_and_scale(x2, channel_shift, channel_scale)
        if perm is not None:
            x2 = x2[:, perm.long()]
        x2 = apply_outer_hadamard(x2, block, MAX_KERNEL_BLOCK)
        perm = channel_shift = channel_scale = None
    m, k = x2.shape
    device = x2.device
    lp = _launch_plan(plan, interpreter_on(), x2.dtype, device, k, block, group, bits, clip,
                      packed, perm_runs == PERM_RUN, perm is not None,
                      channel_shift is not None, channel_scale is not None)
    n_row_blocks = -(-m // lp.bm)  # not triton.cdiv: a jit-level call, µs per launch
    launches, n_cols, partial = lp.one, lp.n_tiles, s
    if lp.wide_spans:
        if _split_spans(n_row_blocks * lp.n_spans, device):
            launches = lp.split
            partial = torch.empty((m, lp.n_tiles), dtype=torch.float32, device=device)
        else:
            n_cols = lp.n_spans
    grid = (min(n_row_blocks, max(1, _programs_per_column(device) // n_cols)), n_cols)
    # placeholders of the signature's pointer types (never read: flags / ROT / PHASE say so)
    args = (x2, perm if perm is not None else s.view(torch.int32),
            channel_shift if channel_shift is not None else s,
            channel_scale if channel_scale is not None else s,
            lp.h if lp.h is not None else s, q if q.dtype == torch.uint8 else q.view(torch.uint8),
            s, partial, m, lp.span, x2.stride(0), q.stride(0), s.stride(0), partial.stride(0),
            *lp.scalars, n_row_blocks, *lp.flags)
    for kwargs in launches:
        _rotate_quantize_kernel[grid](*args, **kwargs)


def _check_channel_vector(name: str, v: torch.Tensor | None, k: int) -> None:
    if v is None:
        return
    if v.dtype != torch.float32 or tuple(v.shape) != (k,):
        raise ValueError(f"{name} must be float32 ({k},), got {v.dtype} {tuple(v.shape)}")
    if not v.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _shift_and_scale(x, channel_shift, channel_scale):
    """(x − shift)·scale in float32 (x itself when both are None)."""
    if channel_shift is not None:
        x = x.float() - channel_shift
    if channel_scale is not None:
        x = x.float() * channel_scale
    return x


def _compute(x, perm, channel_shift, channel_scale, block, group_size, bits, clip, q, s,
             packed, perm_runs=1) -> None:
    """Write the codes and scales of x into q and s (validated inputs): the kernel, or the
    PyTorch reference where the kernel does not run (see kernels._runtime)."""
    if not use_triton(x):
        xs = _shift_and_scale(x, channel_shift, channel_scale)
        codes, scales = quantize_ref(rotate_unchecked(xs, perm, block), group_size, bits, clip)
        q.copy_(pack_codes(codes, storage_bits(bits, packed)))
        s.copy_(scales)
    elif x.shape[0]:
        # the specialization contract (ALIGNED): copies only for odd views
        with device_guard(x):
            _launch(aligned(x, rows=True),
                    aligned(perm.to(torch.int32)) if perm is not None else None, block,
                    group_size, bits, clip, q, s, aligned(channel_shift),
                    aligned(channel_scale), packed, perm_runs)


def _output_shapes(x, group_size, bits, packed):
    """(codes shape, codes dtype, scales shape)."""
    m, k = x.shape
    sb = storage_bits(bits, packed)
    return (m, stored_columns(sb, k)), code_dtype(sb), (m, n_groups(group_size, k))


def _rotate_quantize_op(x, perm, channel_shift, channel_scale, block, group_size, bits, clip,
                       packed=True, perm_runs=1):
    """The PyTorch operator ``torch.ops.clq_triton.rotate_quantize`` (inputs validated by
    :func:`rotate_quantize`): opaque to torch.compile, capturable in CUDA graphs."""
    q_shape, q_dtype, s_shape = _output_shapes(x, group_size, bits, packed)
    q = torch.empty(q_shape, dtype=q_dtype, device=x.device)
    s = torch.empty(s_shape, dtype=torch.float32, device=x.device)
    _compute(x, perm, channel_shift, channel_scale, block, group_size, bits, clip, q, s, packed,
             perm_runs)
    return q, s


def _rotate_quantize_fake(x, perm, channel_shift, channel_scale, block, group_size, bits, clip,
                          packed=True, perm_runs=1):
    q_shape, q_dtype, s_shape = _output_shapes(x, group_size, bits, packed)
    return (x.new_empty(q_shape, dtype=q_dtype),
            x.new_empty(s_shape, dtype=torch.float32))


# torch.ops.clq_triton.rotate_quantize, or its implementation for plain eager calls
rotate_quantize_op = define_op(
    "rotate_quantize(Tensor x, Tensor? perm, Tensor? channel_shift, Tensor? channel_scale, "
    "int? block, int? group_size, int bits, float clip, bool packed=True, "
    "int perm_runs=1) -> (Tensor, Tensor)", _rotate_quantize_op, _rotate_quantize_fake)


def rotate_quantize(
    x: torch.Tensor,
    perm: torch.Tensor | None,
    block: int | None,
    group_size: int | None,
    bits: int,
    clip: float = 1.0,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    channel_scale: torch.Tensor | None = None,
    check_perm_values: bool = True,
    channel_shift: torch.Tensor | None = None,
    packed: bool = True,
    perm_runs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the rotated activations (x − δ)·D·S·H per token (per group, or per row when
    ``group_size`` is None).

    x: [M, K] fp16/bf16/fp32 (any strides); K a multiple of 64.
    perm: int32 [K] (S, a gather; see kernels.hadamard) or None. block: Hadamard block or None.
    channel_scale: float32 [K], the diagonal D (SmoothQuant-style multiplier), or None.
    channel_shift: float32 [K], δ subtracted per channel before D (in float32), or None.
    Returns (q, scales):
      q: 4 bits → uint8 [M, K/2], split-halves packing (kernels.formats); 8 bits, or 4 bits
         with ``packed=False`` (codes in [-7, 7], int8 tensor-core operands) → int8 [M, K];
      scales: float32 [M, K/group_size] or [M, 1]; NaN for groups holding NaN/Inf.
    Without ``out`` this calls the operator ``torch.ops.clq_triton.rotate_quantize`` (its
    implementation directly in plain eager calls: ``_runtime.define_op``);
    ``out`` = preallocated (q, scales) to write into (eager only). ``check_perm_values=False``
    skips the check that ``perm`` is a permutation (it reads perm back: a device sync); only
    for a perm validated before, as QuantLinear does. ``perm_runs``: 8 when ``perm`` moves
    aligned runs of 8 channels (:func:`kernels.hadamard.find_perm_runs`; the kernel then reads x 16
    bytes per load instead of 2), else 1; None = found from perm's values (or 1 without
    ``check_perm_values``). A given 8 is checked against the values with them.
    """
    check_float("x", x, ndim=2)
    check_bits("bits", bits)
    if not isinstance(packed, bool):
        raise TypeError(f"packed must be a bool, got {type(packed).__name__}")
    k = x.shape[1]
    check_k(k, group_size)
    check_block(block, k)
    check_perm(perm, k, values=check_perm_values)
    if perm_runs is None:
        perm_runs = find_perm_runs(perm) if check_perm_values else 1
    elif perm_runs not in (1, PERM_RUN) or (perm_runs == PERM_RUN and perm is None):
        raise ValueError(f"perm_runs must be 1, or {PERM_RUN} with a perm; got {perm_runs!r}")
    elif perm_runs == PERM_RUN and check_perm_values and find_perm_runs(perm) != PERM_RUN:
        raise ValueError(f"perm_runs={PERM_RUN} but perm does not move aligned runs of "
                         f"{PERM_RUN} channels")
    _check_channel_vector("channel_scale", channel_scale, k)
    _check_channel_vector("channel_shift", channel_shift, k)
    check_same_device(x=x, perm=perm, channel_shift=channel_shift, channel_scale=channel_scale)
    scale_multiplier(bits, clip)  # validates clip
    if out is None:
        return rotate_quantize_op(x, perm, channel_shift, channel_scale, block, group_size, bits,
                                  float(clip), packed, perm_runs)
    q, s = out
    q_shape, q_dtype, s_shape = _output_shapes(x, group_size, bits, packed)
    check_out("out[0]", q, q_shape, q_dtype, x.device)
    check_out("out[1]", s, s_shape, torch.float32, x.device)
    _compute(x, perm, channel_shift, channel_scale, block, group_size, bits, clip, q, s, packed,
             perm_runs)
    return q, s
