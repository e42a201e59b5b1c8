"""Read compiled GPU code (SASS) without a GPU: the disassembler ships in the triton wheel.

Used by the compile checks (``compile_check --registers``, the suite's instruction bound on
the GEMM) and the performance model (``bench/perf/``). SASS counts are deterministic for a
triton version and target, so they can gate changes in CI; timings cannot.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.M)
_BRANCH = re.compile(r"\bBRA\b(?:\.\w+)*\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)")
_PRED = re.compile(r"^@!?U?P[T\d]+\s+")
# tensor-core instructions: wgmma (sm_90), mma.sync (sm_80/89/120), tcgen05 (sm_100)
_TENSOR = re.compile(r"^(?:[IHQ]GMMA|[IH]MMA|UTC\w*MMA)\b")


def tool(name: str) -> str:
    """Path of a CUDA binary tool bundled with the installed triton (cuobjdump, nvdisasm)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not bundled with triton {triton.__version__}")
    return path


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (``cuobjdump -sass``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        r = subprocess.run([tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"cuobjdump failed: {r.stderr.strip()[-300:]}")
    return r.stdout


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without its predicate) in program order."""
    return [(int(a, 16), _PRED.sub("", t)) for a, t in _INSTR.findall(sass)]


def opcode(text: str) -> str:
    return text.split()[0].split(".")[0]


@dataclass
class Loop:
    """A loop of the SASS: the instructions from a backward branch's target to the branch."""
    instructions: int = 0
    tensor: int = 0  # tensor-core instructions in it
    ops: Counter = field(default_factory=Counter)  # opcode → count


def tensor_loop(sass: str) -> Loop | None:
    """The innermost loop holding the most tensor-core instructions (a GEMM's K loop), found
    from the branches alone: no block indices to maintain when the kernel changes."""
    ins = instructions(sass)
    index = {a: i for i, (a, _) in enumerate(ins)}
    is_tensor = [bool(_TENSOR.match(t)) for _, t in ins]
    best = None
    for end, (addr, text) in enumerate(ins):
        m = _BRANCH.search(text)
        if not m or int(m.group(1), 16) >= addr or int(m.group(1), 16) not in index:
            continue
        start = index[int(m.group(1), 16)]
        n = sum(is_tensor[start:end + 1])
        if n and (best is None or n > best[2] or (n == best[2] and end - start < best[1] - best[0])):
            best = (start, end, n)
    if best is None:
        return None
    start, end, n = best
    body = [t for _, t in ins[start:end + 1]]
    return Loop(len(body), n, Counter(opcode(t) for t in body))


def instructions_per_gmma(loop: Loop, bm: int, bn: int, bk: int, num_warps: int) -> float:
    """Warp instructions of a GEMM's K loop per 64×128×32 int8 tensor-core instruction's worth
    of MACs per warpgroup (the unit of the performance notes; every warp of a warpgroup
    issues its wgmma): ~64 keeps an sm_90 SM's four schedulers as busy as its tensor cores
    (one instruction per clock each; 4096 int8 MACs per clock per SM)."""
    warpgroups = num_warps / 4
    return loop.instructions * warpgroups * (64 * 128 * 32) / (bm * bn * bk)
