"""The kernels compile for real GPUs (sm_80, sm_89, sm_90) — checked on this CPU.

The Triton interpreter that runs the other kernel tests is not the compiler: on the first
GPU, code that passed every interpreter test did not compile and overflowed shared memory.
Here the real compiler builds every specialization the launchers can produce, and every
autotune candidate on sm_90, up to PTX (ptxas skipped), and each must fit the target's shared
memory and, for the GEMM, use int8 tensor-core instructions (see
clq_triton.kernels.compile_check). CI runs this file under the oldest and the newest
supported triton (pyproject.toml).
"""

import os

import numpy as np
import pytest
import torch
import triton

from clq_triton.kernels.compile_check import (
    GEMM_PER_GMMA_LIMIT,
    SPILL_LIMIT,
    Job,
    all_jobs,
    gemm_gated,
    run_jobs,
    self_cancelling_fmas,
    spill_checked,
)
from clq_triton.kernels.formats import BIT_PAIRS, GROUP_SIZES
from clq_triton.kernels.gemm import _quant_matmul_kernel, kernel_specs
from clq_triton.kernels.tuning import checked_archs

TRITON = tuple(int(p) for p in triton.__version__.split(".")[:2])


def test_every_kernel_specialization_compiles_and_fits():
    jobs = all_jobs()
    kinds = {(j.kernel, j.arch, j.what) for j in jobs}
    archs = checked_archs()  # every arch under the newest triton; sm_100 from triton 3.9 on
    assert {("gemm", a, "table") for a in archs} <= kinds
    assert {("rotate_quantize", a, "launcher") for a in archs} <= kinds
    assert {a for _, a, _ in kinds} == set(archs)
    assert ("gemm", 90, "autotune") in kinds
    results = run_jobs(jobs, processes=min(4, os.cpu_count() or 1),
                       registers=lambda j: spill_checked(j) or gemm_gated(j))
    problems = [f"{r.job.label()}: {r.problem()}" for r in results if r.problem()]
    # the activation kernel (bf16, sm_90) assembled by ptxas: a spill that the PTX cannot show
    # (triton 3.6 once spilled 37 KB per thread on wide tiles: a merge of two load paths)
    spills = [r for r in results if spill_checked(r.job)]
    assert {dict(r.job.constexprs)["T"] for r in spills} == {64, 128, 256}
    assert all(r.registers for r in spills)
    problems += [f"{r.job.label()}: ptxas spills {r.spill_bytes} B per thread > {SPILL_LIMIT}"
                 for r in spills if r.spill_bytes > SPILL_LIMIT]
    # the GEMM's speed gate: no spill, and a K loop that keeps pace with the tensor cores
    gated = [r for r in results if gemm_gated(r.job)]
    assert len(gated) >= 30 and all(r.per_gmma for r in gated)
    for r in gated:
        limit = GEMM_PER_GMMA_LIMIT[dict(r.job.constexprs)["GROUP"]]
        if r.spill_bytes or r.per_gmma > limit:
            problems.append(f"{r.job.label()}: {r.spill_bytes} B spilled, {r.per_gmma:.1f} "
                            f"instructions per GMMA (limit {limit})")
    shared = np.array([r.shared for r in results])
    print(f"triton {triton.__version__}: {len(results)} specializations, shared memory "
          f"{shared.min()}..{shared.max()} B, {sum(r.seconds for r in results):.0f} s compiling")
    assert not problems, f"{len(problems)} of {len(results)} failed:\n" + "\n".join(problems[:20])
    wgmma = [r for r in results if r.job.kernel == "gemm" and r.job.arch == 90]
    assert wgmma and all(r.int8_mma for r in wgmma)  # wgmma with s8 operands
    # the weight-left product takes the unpacked 4-bit weight from registers (wgmma's A
    # operand), the plain product reads both operands from shared memory
    left = [r for r in wgmma if dict(r.job.constexprs)["W_LEFT"]]
    assert left and all(r.wgmma_register_a for r in left)
    assert all(dict(r.job.constexprs)["W_BITS"] == 4 for r in left)
    assert not any(r.wgmma_register_a for r in wgmma if not dict(r.job.constexprs)["W_LEFT"]
                   and dict(r.job.constexprs)["A_BITS"] == 8)


def test_gemm_specs_cover_every_mode():
    specs = kernel_specs(90)
    seen = {(c["W_BITS"], c["A_BITS"], c["GROUP"] or None) for _, c, _, _ in specs}
    assert seen == {(w, a, g) for w, a in BIT_PAIRS for g in GROUP_SIZES}
    assert {sig["c_ptr"] for sig, _, _, _ in specs} == {"*fp16", "*bf16", "*fp32"}


def _planted_job(k, out_dtype, arch=90):
    return Job("planted_kernels:int_dot", arch,
               tuple(sorted({"a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": "*i32"}.items())),
               (("K", k), ("OUT_DTYPE", out_dtype)), 4, 1, "planted")


def test_check_reports_a_compile_error_the_interpreter_misses():
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs the planted kernel
        from planted_kernels import int_dot

        a = torch.randint(-8, 8, (64, 16), dtype=torch.int8)
        c = torch.empty(64, 64, dtype=torch.int32)
        int_dot[(1,)](a, a, c, K=16, OUT_DTYPE=True)
        assert torch.equal(c, a.int() @ a.int().T)
    (r,) = run_jobs([_planted_job(16, True)])
    assert not r.ok and "K >= 32" in r.problem()


@pytest.mark.skipif(TRITON >= (3, 9), reason="triton 3.9 accepts an int32 accumulator")
def test_check_reports_the_missing_out_dtype_of_the_first_gpu_run():
    ok, bad = run_jobs([_planted_job(64, True), _planted_job(64, False)])
    assert not ok.problem()
    assert not bad.ok and "compile error" in bad.problem()


def test_check_reports_shared_memory_overflow():
    sig = {k: v for k, v in kernel_specs(89)[0][0].items()}
    cons = dict(A_BITS=8, W_BITS=8, GROUP=0, BM=256, BN=256, BK=256, GROUP_M=8, W_LEFT=False,
                UNPACK_ASM=True)
    (r,) = run_jobs([Job("gemm", 89, tuple(sorted(sig.items())), tuple(sorted(cons.items())),
                         8, 4, "planted")])
    assert r.ok and r.shared > r.limit
    assert "shared memory" in r.problem() and "101376" in r.problem()


def test_gemm_kernel_is_the_one_checked():
    fn, _ = __import__("clq_triton.kernels.compile_check",
                       fromlist=["_kernel"])._kernel("gemm")
    assert fn is _quant_matmul_kernel


def _finite_job(safe):
    return Job("planted_kernels:finite_by_subtraction", 90,
               tuple(sorted({"x_ptr": "*fp32", "c": "fp32", "out_ptr": "*i8"}.items())),
               (("SAFE", safe),), 4, 1, "planted")


def test_check_reports_a_self_cancelling_fma():
    """The finiteness test that zeroed the codes of Hadamard blocks 32 and 128 on an H100: the
    interpreter says every value is finite; the compiled PTX computes the rounding error."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from planted_kernels import finite_by_subtraction

        x = torch.randn(128)
        out = torch.empty(128, dtype=torch.int8)
        finite_by_subtraction[(1,)](x, 0.1767767, out, SAFE=False)
        assert (out == 1).all()
    bad, ok = run_jobs([_finite_job(False), _finite_job(True)])
    assert bad.ok and bad.self_cancelling_fma > 0 and "self-cancelling" in bad.problem()
    assert not ok.problem()


def test_self_cancelling_fma_detector_on_ptx_text():
    ptx = """
    mul.f32 %r5, %r1, %r2;
    neg.f32 %r6, %r5;
    fma.rn.f32 %r7, %r2, %r1, %r6;
    mul.f32 %r8, %r1, %r3;
    neg.f32 %r9, %r8;
    fma.rn.f32 %r10, %r1, %r2, %r9;
    """
    assert self_cancelling_fmas(ptx) == 1


def _softmax_job(n):
    return Job("planted_kernels:row_softmax", 90,
               tuple(sorted({"x_ptr": "*fp32", "out_ptr": "*fp32"}.items())), (("N", n),), 1, 1,
               "planted")


def test_registers_report_spills_of_a_tile_too_big_for_one_warp():
    """--registers runs the ptxas that triton bundles: a [64, 256] fp32 tile held by one warp
    (512 values per thread) spills; [64, 16] does not; neither has tensor-core
    instructions."""
    small, big = run_jobs([_softmax_job(16), _softmax_job(256)], registers=True)
    assert small.ok and small.spill_bytes == 0 and 0 < small.registers <= 255
    assert big.ok and big.spill_bytes > 0 and big.registers <= 255
    assert small.mma == big.mma == 0


def test_rotation_of_float32_values_takes_two_tf32_dots_not_three():
    """CLQ's layers shift and scale channels before the rotation, so the dots see float32
    values: the kernel splits them into two tf32 parts ("tf32x2"), twice the tensor-core
    instructions of plain tf32 — triton's tf32x3 took three times, the third against the
    zero low part of the ±1 Hadamard tile."""
    import clq_triton.kernels.rotate_quantize as rq

    def job(prescaled, prec=None):
        c = dict(rq.plan(torch.bfloat16, 128, 64, prescaled)["constexprs"], BM=32)
        if prec:
            c["PREC"] = prec
        return Job("rotate_quantize", 90, tuple(sorted(rq.signature(torch.bfloat16).items())),
                   tuple(sorted(c.items())), 4, 1, "launcher")

    plain, split, x3 = run_jobs([job(False), job(True), job(True, "tf32x3")])
    assert dict(split.job.constexprs)["PREC"] == "tf32x2"
    assert plain.mma > 0 and split.mma == 2 * plain.mma and x3.mma == 3 * plain.mma


@pytest.mark.parametrize("prescaled", [False, True], ids=["plain", "shift+multiplier"])
def test_permutations_of_runs_of_8_are_read_16_bytes_at_a_time(prescaled):
    """The activation kernel, bf16, sm_90, with a permutation: the plain gather reads x 2
    bytes per load (ld.global.b16); told that the permutation moves aligned runs of 8
    (``perm_runs8``, as ``CLQ(perm_run=8)``'s do), it reads 16 (ld.global.v4) and no single
    16-bit value at all. The runs share their path with the layer without a permutation
    (``has_perm`` a runtime flag there, as the launcher passes it; fixed, the masked load of
    the permutation folds and its hints are lost). Flags fixed here hold one path per PTX;
    the launcher's own specialization, every flag a runtime value, holds both, and its only
    2-byte loads are the gather's."""
    import clq_triton.kernels.rotate_quantize as rq

    def job(**flags):
        c = dict(rq.plan(torch.bfloat16, 64, 64, prescaled)["constexprs"], **flags)
        return Job("rotate_quantize", 90, tuple(sorted(rq.signature(torch.bfloat16).items())),
                   tuple(sorted(c.items())), 4, 1, "launcher")

    fixed = dict(has_sh=prescaled, has_cs=prescaled)
    gather, runs, in_order, launched = run_jobs([
        job(has_perm=True, perm_runs8=False, **fixed), job(perm_runs8=True, **fixed),
        job(has_perm=False, perm_runs8=False, **fixed), job()])
    for r in (gather, runs, in_order, launched):
        assert r.ok, r.error
    assert gather.b16_loads > 0, gather.b16_loads
    assert runs.b16_loads == 0 and runs.v4_loads >= in_order.v4_loads > 0, \
        (runs.v4_loads, in_order.v4_loads)
    assert launched.b16_loads == gather.b16_loads and launched.v4_loads > 0
