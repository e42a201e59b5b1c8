"""Compile every kernel specialization for real GPU targets on a machine without a GPU.

The Triton interpreter is not the compiler: code that runs in the interpreter can fail to
compile (e.g. an int32 ``tl.dot`` accumulator without ``out_dtype=tl.int32`` under triton
3.6) or need more shared memory than the GPU has. This module runs the real compiler
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``) up to PTX, skipping
ptxas, and checks each result:
- it compiles;
- its shared memory fits the target's per-block limit (``tuning.SHARED_LIMIT``);
- for the quantized GEMM, the PTX uses int8 tensor-core instructions: ``wgmma`` with s8
  operands on sm_90, ``tcgen05.mma`` of kind i8 on sm_100 (``mma.sync`` under triton 3.6),
  ``mma`` with s8 operands on sm_80/sm_89/sm_120;
- no self-cancelling FMA in the PTX: ``fma(a, b, −(a·b))``, which is how the compiler
  contracts ``a·b − a·b``. It yields the product's rounding error instead of 0; the
  interpreter computes 0. (Found on an H100: a ``y − y == 0`` finiteness test flagged every
  group of some Hadamard blocks as non-finite.)

Used by ``tests/test_compile.py``; also a command:
``python -m clq_triton.kernels.compile_check [--arch 90] [--jobs 2]`` prints every result.
``--registers`` also assembles each PTX with the ptxas that triton bundles for the target and
reports its registers per thread, spill bytes and tensor-core (``mma``/``wgmma``) instruction
count: a spill or 255 registers caps how many warps an SM keeps in flight, which the
interpreter cannot show either (not part of the tests: ptxas takes a while per kernel).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

from . import sass

WGMMA_S8 = re.compile(r"wgmma\.mma_async[.\w]*\.s8\.s8")
TCGEN05_I8 = re.compile(r"tcgen05\.mma[.\w:]*\.kind::i8")
MMA_S8 = re.compile(r"mma\.sync\.aligned[.\w]*\.s8\.s8")
_MMA = re.compile(r"\b(?:wgmma\.mma_async|tcgen05\.mma|mma\.sync)\b")
# wgmma whose A operand is registers: "wgmma... {d...}, {a...}, desc_b, ..." (a descriptor
# "%rd" in place of the second brace when A is read from shared memory)
_WGMMA_REGISTER_A = re.compile(r"wgmma\.mma_async[^;{]*\{[^}]*\}\s*,\s*\{")
_PTX_TARGET = re.compile(r"^\s*\.target\s+(sm_\w+)", re.M)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# global loads of one 16-bit value (a gather of bf16/fp16), and of 16 bytes at once
_LD_B16 = re.compile(r"\bld\.global(?:\.\w+)*\.b16\b")
_LD_V4 = re.compile(r"\bld\.global(?:\.\w+)*\.v4\.")
_PTX_OP = re.compile(r"^\s*(mul|neg|fma)\.(?:rn\.)?f32\s+(%\w+),\s*([^;]+);", re.M)


def self_cancelling_fmas(ptx: str) -> int:
    """How many ``fma.rn.f32 d, a, b, c`` have c = −(a·b) from a ``mul.f32`` of the same
    operands: the contracted form of ``a·b − a·b``, nonzero where the source meant 0."""
    products, negated, found = {}, {}, 0
    for op, dst, args in _PTX_OP.findall(ptx):
        ops = [a.strip() for a in args.split(",")]
        if op == "mul":
            products[dst] = frozenset(ops)
        elif op == "neg":
            negated[dst] = ops[0]
        elif len(ops) == 3 and products.get(negated.get(ops[2])) == frozenset(ops[:2]):
            found += 1
    return found


@dataclass(frozen=True)
class Job:
    kernel: str  # "gemm" | "rotate_quantize" | "package.module:function" (any @triton.jit)
    arch: int
    signature: tuple  # sorted (name, type) pairs
    constexprs: tuple  # sorted (name, value) pairs
    num_warps: int
    num_stages: int
    what: str  # "table" | "autotune" | "launcher"

    def label(self) -> str:
        c = dict(self.constexprs)
        sig = dict(self.signature)
        dt = sig.get("x_ptr") or sig.get("c_ptr")
        return (f"{self.kernel} sm_{self.arch} {dt} " + " ".join(f"{k}={v}" for k, v in c.items())
                + f" warps={self.num_warps} stages={self.num_stages} ({self.what})")


@dataclass
class Result:
    job: Job
    ok: bool
    shared: int = 0
    limit: int = 0
    int8_mma: bool | None = None  # GEMM only
    self_cancelling_fma: int = 0
    error: str = ""
    seconds: float = 0.0
    registers: int | None = None  # with ptxas (--registers) only
    spill_bytes: int | None = None  # spill stores + loads
    mma: int | None = None  # tensor-core instructions in the PTX
    wgmma_register_a: int | None = None  # wgmma with its A operand in registers (GEMM)
    b16_loads: int = 0  # global loads of single 16-bit values (gathers of bf16 / fp16)
    v4_loads: int = 0  # global loads of 16 bytes
    # GEMM with ptxas: its K loop in the SASS (sass.tensor_loop), and its warp instructions
    # per 64×128×32 tensor-core instruction's worth of MACs (sass.instructions_per_gmma)
    loop_instructions: int | None = None
    loop_tensor: int | None = None
    per_gmma: float | None = None

    def problem(self) -> str:
        """'' when the job passed, else why it did not."""
        if not self.ok:
            return f"compile error: {self.error}"
        if self.shared > self.limit:
            return f"shared memory {self.shared} B > limit {self.limit} B"
        if self.int8_mma is False:
            return "no int8 tensor-core instruction in the PTX"
        if self.self_cancelling_fma:
            return (f"{self.self_cancelling_fma} self-cancelling FMA(s) in the PTX: "
                    "fma(a, b, -(a*b)), the contracted a*b - a*b, is not 0")
        return ""


def _no_cubin_hook(*args):
    """triton's add_stages_inspection_hook: replace the ptxas stage by a no-op."""
    if not args:
        return "clq-no-cubin", "clq-no-cubin"
    _backend, stages, *_ = args
    stages["cubin"] = lambda src, metadata: b""


KERNELS = {"gemm": "clq_triton.kernels.gemm:_quant_matmul_kernel",
           "rotate_quantize": "clq_triton.kernels.rotate_quantize:_rotate_quantize_kernel"}


def _kernel(name: str):
    """(the @triton.jit function, the names of the arguments it is specialized as aligned)."""
    import importlib

    module, _, fn = KERNELS.get(name, name).partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, fn), getattr(mod, "ALIGNED", ())


def int8_mma_pattern(arch: int) -> re.Pattern:
    """The int8 tensor-core instructions the GEMM may use on ``arch``: wgmma on sm_90;
    tcgen05.mma (kind::i8) on sm_100/103 under triton 3.9, which triton 3.6 lowers to
    mma.sync instead; mma.sync elsewhere (sm_80/89, sm_120)."""
    if arch == 90:
        return WGMMA_S8
    if 100 <= arch < 120:
        return re.compile(f"{TCGEN05_I8.pattern}|{MMA_S8.pattern}")
    return MMA_S8


def ptxas_report(ptx: str, arch: int) -> tuple[int, int, bytes]:
    """(registers per thread, spill bytes, cubin) from ``ptxas -v`` of the ptxas triton uses
    for ``arch`` (bundled with triton; no GPU needed)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        target = _PTX_TARGET.search(ptx)  # e.g. sm_90a, sm_100a: what triton compiled for
        gpu = target.group(1) if target else f"sm_{arch}"
        r = subprocess.run([get_ptxas(arch).path, f"--gpu-name={gpu}", "-v", src,
                            "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        cubin = b""
        if not r.returncode:
            with open(os.path.join(tmp, "k.cubin"), "rb") as f:
                cubin = f.read()
    out = r.stdout + r.stderr
    regs, spills = _PTXAS_REGS.search(out), _PTXAS_SPILLS.search(out)
    if r.returncode or not regs or not spills:
        raise RuntimeError(f"ptxas failed: {' '.join(out.split())[-300:]}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2)), cubin


def compile_job(job: Job, registers: bool = False) -> Result:
    """Compile one specialization (no GPU needed) and check it; ``registers``: also run
    ptxas (:func:`ptxas_report`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .tuning import shared_limit

    triton.knobs.runtime.add_stages_inspection_hook = _no_cubin_hook
    fn, aligned_args = _kernel(job.kernel)
    cons = dict(job.constexprs)
    sig = dict(job.signature)
    sig.update({k: "constexpr" for k in cons})
    # the divisibility the launcher guarantees, as the JIT would specialize it
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned_args}
    t0 = time.perf_counter()
    limit = shared_limit(job.arch)
    try:
        k = triton.compile(ASTSource(fn, sig, cons, attrs), target=GPUTarget("cuda", job.arch, 32),
                           options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    except Exception as e:  # noqa: BLE001 - every failure is a result to report
        msg = " ".join(str(e).split())[-600:]
        return Result(job, False, limit=limit, error=f"{type(e).__name__}: {msg}",
                      seconds=time.perf_counter() - t0)
    int8 = None
    if job.kernel == "gemm":
        int8 = bool(int8_mma_pattern(job.arch).search(k.asm["ptx"]))
    res = Result(job, True, shared=k.metadata.shared, limit=limit, int8_mma=int8,
                 self_cancelling_fma=self_cancelling_fmas(k.asm["ptx"]),
                 mma=len(_MMA.findall(k.asm["ptx"])),
                 wgmma_register_a=len(_WGMMA_REGISTER_A.findall(k.asm["ptx"]))
                 if job.kernel == "gemm" else None,
                 b16_loads=len(_LD_B16.findall(k.asm["ptx"])),
                 v4_loads=len(_LD_V4.findall(k.asm["ptx"])))
    if registers:
        try:
            res.registers, res.spill_bytes, cubin = ptxas_report(k.asm["ptx"], job.arch)
            if job.kernel == "gemm":
                loop = sass.tensor_loop(sass.disassemble(cubin))
                if loop is not None:
                    res.loop_instructions, res.loop_tensor = loop.instructions, loop.tensor
                    res.per_gmma = sass.instructions_per_gmma(
                        loop, cons["BM"], cons["BN"], cons["BK"], job.num_warps)
        except (RuntimeError, FileNotFoundError) as e:
            res.ok, res.error = False, str(e)
    res.seconds = time.perf_counter() - t0
    return res


# fp16 tensors (the GEMM's output, the rotate kernel's input) are compiled on this arch only;
# elsewhere bf16 stands for them: the same element size, so the same tiles, shared memory and
# registers (a third fewer compiles; CI runs every job under two triton versions)
FP16_ARCH = 90


def all_jobs(archs=None) -> list[Job]:
    """GEMM: every launcher specialization with the shipped table's configs on each arch, and
    every autotune candidate on sm_90 (bf16 out). Rotate+quantize: every launcher
    specialization on each arch. fp16 variants on sm_90 only (:data:`FP16_ARCH`). ``archs``
    by default: those checked under the installed triton (:func:`tuning.checked_archs`)."""
    from . import gemm, rotate_quantize, tuning

    archs = archs or tuning.checked_archs()
    jobs = []

    def add(kernel, arch, sig, cons, warps, stages, what):
        if arch != FP16_ARCH and "*fp16" in sig.values():
            return
        jobs.append(Job(kernel, arch, tuple(sorted(sig.items())), tuple(sorted(cons.items())),
                        warps, stages, what))

    for arch in archs:
        for sig, cons, warps, stages in gemm.kernel_specs(arch):
            add("gemm", arch, sig, cons, warps, stages, "table")
        for p in rotate_quantize.kernel_specs():
            c = p["constexprs"]
            add("rotate_quantize", arch, rotate_quantize.signature(p["dtype"]), c,
                p["num_warps"], 1, "launcher")
    if 90 in archs:
        table = set(tuning.table_configs(90))
        extra = [c for c in tuning.autotune_space(90) if c not in table]
        for sig, cons, warps, stages in gemm.kernel_specs(90, extra):
            add("gemm", 90, sig, cons, warps, stages, "autotune")
    return list(dict.fromkeys(jobs))  # distinct, in order


# Assembled with ptxas in the suite (``spill_checked``): the activation kernel with bf16
# input on sm_90, every tile. Under triton 3.6 two load paths merging before the rotation
# once made ptxas spill up to 37 KB per thread on the wide tiles (32 registers), invisible
# to the compile check without ptxas; each now stays within SPILL_LIMIT bytes per thread.
SPILL_LIMIT = 256


def spill_checked(job: Job) -> bool:
    """Whether the suite runs ptxas on ``job`` and bounds its spills (:data:`SPILL_LIMIT`)."""
    return (job.kernel == "rotate_quantize" and job.arch == 90
            and dict(job.signature).get("x_ptr") == "*bf16")


# The GEMM's speed gate (SASS counts are deterministic per triton version and target): the
# shipped table's sm_90 specializations (bf16 out) are assembled, must not spill, and their
# K loop may issue at most this many warp instructions per 64×128×32 tensor-core
# instruction's worth of MACs (sass.instructions_per_gmma), by group size (0: per channel).
# ~64 is what four schedulers issue while the tensor cores work; the 4-bit GEMM of 98f3547
# unpacked nibbles byte by byte: 149 per channel, 334 at group 64 (triton 3.9); e1eea9d's
# table tiles: at most 52.5 per channel (64×128×64, small M) and 158 at group 64 under 3.9,
# 53.5 and 171.5 under 3.6.
GEMM_PER_GMMA_LIMIT = {0: 60, 64: 190, 128: 110, 256: 70}


def gemm_gated(job: Job) -> bool:
    """Whether the suite bounds ``job``'s spills and instructions (:data:`GEMM_PER_GMMA_LIMIT`)."""
    return (job.kernel == "gemm" and job.arch == 90 and job.what == "table"
            and dict(job.signature).get("c_ptr") == "*bf16")


def run_jobs(jobs: list[Job], processes: int | None = None, progress=None,
             registers=False) -> list[Result]:
    """Compile ``jobs`` in fresh worker processes (each compile is single-threaded);
    ``registers``: run ptxas on every job (True) or on those a predicate picks (a function of
    the Job, e.g. :func:`spill_checked`).

    Workers are spawned with TRITON_INTERPRET=0, so this works from a process whose kernels
    run in the interpreter (the test suite): there ``@triton.jit`` functions cannot compile.
    """
    processes = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # copied into the workers when they spawn
    out = []
    try:
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
            ptxas = [registers(j) if callable(registers) else registers for j in jobs]
            for r in pool.map(compile_job, jobs, ptxas, chunksize=4):
                out.append(r)
                if progress:
                    progress(r)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append",
                    help="80, 89, 90, 100 or 120 (default: each checked under this triton)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel processes")
    ap.add_argument("--kernel", choices=("gemm", "rotate_quantize"))
    ap.add_argument("--registers", action="store_true",
                    help="also run ptxas: registers, spill bytes, tensor-core instructions")
    args = ap.parse_args(argv)
    jobs = [j for j in all_jobs(args.arch) if args.kernel in (None, j.kernel)]
    import triton

    print(f"triton {triton.__version__}: compiling {len(jobs)} specializations", flush=True)
    t0 = time.perf_counter()
    bad = 0

    def show(r):
        nonlocal bad
        p = r.problem()
        bad += bool(p)
        regs = (f" {r.registers:>3} regs {r.spill_bytes:>4} B spilled {r.mma:>4} mma"
                + (f" {r.per_gmma:6.1f} instr/GMMA" if r.per_gmma is not None else "")
                if r.registers is not None else "")
        print(f"{'FAIL' if p else 'ok  '} {r.shared:>7} B{regs} {r.seconds:5.1f}s "
              f"{r.job.label()}" + (f"\n     {p}" if p else ""), flush=True)

    results = run_jobs(jobs, args.jobs, show, args.registers)
    spilling = sum(1 for r in results if r.spill_bytes)
    print(f"{len(results) - bad} ok, {bad} failed"
          + (f", {spilling} spill registers" if args.registers else "")
          + f", {time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
