"""Launch configurations of the quantized GEMM: a shipped table used by default, and opt-in
autotuning whose results are cached per GPU.

Default: the first call of a new shape compiles exactly one kernel (no benchmarking).
The table is keyed by architecture and an M bucket. Its entries were chosen from the
hardware's tile limits and from one probe on an H200 (``bench/results``); they are not yet
tuned per shape on a GPU: run ``python bench/gpu_check.py --autotune`` on a GPU to measure
the table against the autotuned choice.

Opt-in: ``set_autotune(True)`` (or ``CLQ_AUTOTUNE=1`` in the environment at import) makes the
first call of each (GPU, bits, group, M bucket, N, K) benchmark ``autotune_space()`` and keep
the fastest, in memory and in a JSON file under ``~/.cache/clq_triton`` (or
``$CLQ_CACHE_DIR``), which later processes read instead of tuning again.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from ..jsonfile import merge_json

# Shared memory a block may use (the driver's limit, bytes) per compute capability: the CUDA
# programming guide's "maximum shared memory per thread block" (opt-in) of each.
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                103: 232448, 120: 101376, 121: 101376}
# What the compile tests cover: A100, L40/4090, H100/H200, B200, RTX 50-series.
ARCHS = (80, 89, 90, 100, 120)
# The oldest triton compile-checked for an arch, where newer than the oldest supported (3.6),
# and what the older ones do there (the compile check's finding): a B200 wants triton 3.9, and
# CI compiles sm_100 under the newest triton only.
CHECKED_FROM = {100: ((3, 9), "lowers its int8 dots to mma.sync, not tcgen05")}


def _triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2])


def checked_archs(version: tuple[int, int] | None = None) -> tuple[int, ...]:
    """The archs of :data:`ARCHS` compile-checked under triton ``version`` (major, minor;
    default: the installed one)."""
    version = version or _triton_version()
    return tuple(a for a in ARCHS if not unchecked_reason(a, version))


def unchecked_reason(arch: int, version: tuple[int, int]) -> str:
    """Why triton ``version`` is not compile-checked for a GPU of compute capability ``arch``
    (e.g. 103 for a B300: sm_100's family), or '' when it is."""
    family = arch // 10 * 10
    need, older = CHECKED_FROM.get(family, ((0, 0), ""))
    if version >= need:
        return ""
    return (f"clq-triton's kernels are compile-checked for sm_{family} under triton "
            f">= {need[0]}.{need[1]}, and this is triton {version[0]}.{version[1]} (which "
            f"{older}): upgrade triton for this GPU")


@functools.lru_cache(maxsize=None)
def warn_if_unchecked(arch: int) -> None:
    """Warn once per arch where the installed triton is not compile-checked for it."""
    reason = unchecked_reason(arch, _triton_version())
    if reason:
        warnings.warn(reason, stacklevel=2)


@dataclass(frozen=True)
class GemmConfig:
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8
    # the transposed product W·Xᵀ: a 4-bit weight unpacked in registers is wgmma's register
    # operand instead of a round trip through shared memory (docs/gpu.md); same results.
    # Autotune candidates on sm_90 only until a GPU has measured it
    W_LEFT: bool = False

    def smem_estimate(self, a_bits: int, w_bits: int) -> int:
        """Bytes of shared memory: the pipelined operand tiles plus, with a 4-bit side, the
        unpacked int8 tiles. Exact for W8A8, an over-estimate otherwise (measured by the
        compile tests)."""
        a = self.BK // 2 if a_bits == 4 else self.BK
        w = self.BK // 2 if w_bits == 4 else self.BK
        unpacked = (self.BM + self.BN) * self.BK if 4 in (a_bits, w_bits) else 0
        return self.num_stages * (self.BM * a + self.BN * w) + unpacked

    def fitted(self, k: int, group_size: int | None, a_bits: int = 4, w_bits: int = 4,
               arch: int | None = None) -> "GemmConfig":
        """The config for one call: BK equals the group (one rescale per K step) or, per
        channel, divides K; then, on ``arch``, per group with 4-bit weights on the Hopper
        family one warpgroup of 64 rows (4 warps) where the tile had 128 rows and 8 warps
        (the z column spilled; measured for W4A4 group 64 on an H200, applied to every 4-bit
        weight group tile), per group a narrower BN until the accumulators fit in registers,
        fewer stages (down to 2) and then a narrower BN until the shared-memory estimate
        fits.

        Per group the kernel holds two BM×BN accumulators (the group's int32 sum and the
        float32 total): more than 128 registers per thread of them made ptxas spill 500-2152 B
        per thread at 128×256 with 8 warps (sm_90, triton 3.6, ``compile_check
        --registers``); on an H100 BM 128 × BN 128 ran W4A4 group 128 1.15-1.28× faster than
        128×256 at M 4096 (bench/results/gpu-2026-11-27/)."""
        # W_LEFT needs a 4-bit weight (nothing to unpack otherwise: the plain product)
        base = replace(self, W_LEFT=self.W_LEFT and w_bits == 4)
        if group_size is not None:
            cfg = replace(base, BK=group_size)
            if (arch is not None and w_bits == 4 and table_family(arch) == 90
                    and cfg.BM == 128 and cfg.num_warps == 8):
                # 4-bit two-level weights: each K step's int32 sum is multiplied by the
                # weights' integer group scale z per output column (gemm._quant_matmul_kernel):
                # at 128×128 with 8 warps, sm_90/100 spilled 112-272 B per thread (ptxas,
                # triton 3.6 and 3.9); one warpgroup of 64 rows holds 192 registers, no spill,
                # 2 CTAs per SM, and issues 21 % fewer instructions per MAC (SASS, sm_90)
                cfg = replace(cfg, BM=64, num_warps=4)
            if arch is not None:
                while 2 * cfg.BM * cfg.BN > _accumulator_registers(arch) * 32 * cfg.num_warps \
                        and cfg.BN > 64:
                    cfg = replace(cfg, BN=cfg.BN // 2)
        else:
            bk = self.BK
            while k % bk:
                bk //= 2
            cfg = replace(base, BK=bk)
        if arch is None:
            return cfg
        limit = shared_limit(arch)
        while cfg.smem_estimate(a_bits, w_bits) > limit and cfg.num_stages > 2:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
        while cfg.smem_estimate(a_bits, w_bits) > limit and cfg.BN > 64:
            cfg = replace(cfg, BN=cfg.BN // 2)
        return cfg


def _accumulator_registers(arch: int) -> int:
    """Registers per thread the per-group mode may give its two accumulators: 128 in the
    Hopper family (sm_90's wgmma and sm_100's tcgen05 read their operands from shared
    memory); 64 where mma.sync takes them from registers too (sm_80/89 and sm_120, the RTX
    50-series, which has no wgmma; triton 3.6, sm_80/89: 128×128 with 8 warps spilled 96-184 B
    per thread at group 128, none at 128×64)."""
    return 128 if table_family(arch) == 90 else 64


# (largest M, config); the first row whose bound holds is used.
_TABLE = {
    90: ((64, GemmConfig(64, 128, 128, 4, 4)),
         (512, GemmConfig(128, 128, 128, 8, 3)),
         (None, GemmConfig(128, 256, 128, 8, 3))),
    89: ((64, GemmConfig(64, 128, 128, 4, 3)),
         (None, GemmConfig(128, 128, 64, 8, 3))),
    80: ((64, GemmConfig(64, 128, 128, 4, 3)),
         (None, GemmConfig(128, 128, 128, 8, 3))),
}
INTERPRETER_CONFIG = GemmConfig(16, 32, 64, 4, 1)


def table_family(arch: int) -> int:
    """The table row set for a compute capability (major·10 + minor): 90 for the data-center
    parts with Hopper-sized shared memory and asynchronous tensor-core MMAs (sm_90, sm_100,
    sm_103); 80 or 89 by shared memory for mma.sync parts — the RTX 50-series (sm_120/121)
    is one of those: no wgmma, 101376 B per block, like sm_89."""
    if arch < 80:
        raise RuntimeError(f"the Triton kernels need compute capability 8.0 or newer, got "
                           f"{arch // 10}.{arch % 10}; use clq_triton.set_backend('torch')")
    if 90 <= arch < 120:
        return 90
    return 80 if SHARED_LIMIT.get(arch, 0) >= 166912 else 89


def shared_limit(arch: int) -> int:
    """Bytes of shared memory a block may use on ``arch`` (its family's for an unlisted arch,
    the smallest known for archs newer than every listed one)."""
    if arch in SHARED_LIMIT:
        return SHARED_LIMIT[arch]
    if arch > max(SHARED_LIMIT):
        return min(SHARED_LIMIT.values())
    return SHARED_LIMIT[table_family(arch)]


def table_configs(arch: int) -> tuple[GemmConfig, ...]:
    return tuple(c for _, c in _TABLE[table_family(arch)])


@functools.lru_cache(maxsize=4096)
def fitted_table_config(arch: int, m: int, k: int, group_size: int | None, a_bits: int,
                        w_bits: int) -> GemmConfig:
    """``table_config(arch, m).fitted(...)``, cached per call shape (a launch's host cost)."""
    return table_config(arch, m).fitted(k, group_size, a_bits, w_bits, arch)


def table_config(arch: int, m: int) -> GemmConfig:
    for bound, cfg in _TABLE[table_family(arch)]:
        if bound is None or m <= bound:
            return cfg
    raise AssertionError("the table's last row has no bound")


def autotune_space(arch: int) -> tuple[GemmConfig, ...]:
    """Candidates of the opt-in autotuner: Hopper-sized tiles first, then smaller ones."""
    big = tuple(GemmConfig(bm, bn, bk, 8, st) for bm, bn in ((128, 128), (128, 256), (256, 128))
                for bk in (64, 128) for st in (3, 4))
    small = (GemmConfig(64, 128, 128, 4, 3), GemmConfig(64, 128, 128, 4, 4),
             GemmConfig(128, 64, 128, 4, 3), GemmConfig(64, 64, 128, 4, 4),
             GemmConfig(128, 128, 64, 4, 3))
    if table_family(arch) != 90:
        return small + big[:4]
    # the weight-left product (wgmma's register operand) at the table's large tiles
    left = (GemmConfig(128, 128, 128, 8, 3, W_LEFT=True),
            GemmConfig(128, 256, 128, 8, 3, W_LEFT=True))
    return big + small + left


# ------------------------------------------------------------------- opt-in autotuning

_autotune = os.environ.get("CLQ_AUTOTUNE", "0") not in ("", "0")
_tuned: dict[str, dict[str, GemmConfig]] = {}  # cache file → key → config
_tuned_lock = threading.Lock()


def set_autotune(on: bool) -> None:
    """Benchmark the candidates on the first call of each GPU/shape (off by default)."""
    global _autotune
    _autotune = bool(on)


def autotune_enabled() -> bool:
    return _autotune


@functools.lru_cache(maxsize=None)
def device_arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@functools.lru_cache(maxsize=None)
def cache_file(device: torch.device) -> str:
    """Where tuned configs of this GPU model and triton version are kept."""
    import triton

    name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    root = os.environ.get("CLQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "clq_triton")
    return os.path.join(root, f"gemm-{name}-triton{triton.__version__}.json")


def autotune_key(arch: int, w_bits: int, a_bits: int, group_size: int | None, m: int, n: int,
                 k: int) -> str:
    """The cache key of one GEMM: M is bucketed to a power of two (at most 16384)."""
    bucket = min(1 << max(m - 1, 0).bit_length(), 16384)
    return f"sm{arch}-w{w_bits}a{a_bits}-g{group_size or 0}-m{bucket}-n{n}-k{k}"


def tuned_configs(device: torch.device) -> dict[str, GemmConfig]:
    """The autotuned configs known for this GPU (key → config), from memory or its cache."""
    return dict(_tuned_for(cache_file(device)))


def _parse(path: str, data: dict) -> dict[str, GemmConfig]:
    try:
        return {k: GemmConfig(**v) for k, v in data.items()}
    except (AttributeError, TypeError) as e:
        raise RuntimeError(f"cannot read the tuned-config cache {path}: {e}; delete the file "
                           "to tune again") from e


def _tuned_for(path: str) -> dict[str, GemmConfig]:
    with _tuned_lock:
        if path not in _tuned:
            data = {}
            if os.path.exists(path):
                try:
                    with open(path) as f:
                        data = json.load(f)
                except (OSError, ValueError) as e:
                    raise RuntimeError(f"cannot read the tuned-config cache {path}: {e}; "
                                       "delete the file to tune again") from e
            _tuned[path] = _parse(path, data)
        return _tuned[path]


def _save(path: str, key: str, cfg: GemmConfig) -> None:
    """Add one entry to the cache file: merged under a lock with what other processes wrote
    (whose entries this process then knows too). A cache that cannot be written costs a
    warning, never the GEMM call."""
    try:
        merged = merge_json(path, lambda old: {**old, key: asdict(cfg)}, indent=1,
                            sort_keys=True)
    except (OSError, ValueError) as e:
        warnings.warn(f"clq_triton: could not save the tuned GEMM config to {path} ({e}); it "
                      "is kept for this process only (set CLQ_CACHE_DIR to a writable folder)",
                      stacklevel=4)
        return
    with _tuned_lock:
        _tuned[path].update(_parse(path, merged))


def tuned_config(path: str, key: str, candidates, bench) -> GemmConfig:
    """The config cached in ``path`` for ``key``, or the fastest candidate by
    ``bench(cfg) -> ms`` (candidates that fail to compile or launch are skipped). Safe to
    call from several threads and processes at once."""
    known = _tuned_for(path)
    if key in known:
        return known[key]
    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            ms = bench(cfg)
        except Exception:  # noqa: BLE001 - out of resources / compile error: not a candidate
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"no GEMM config could run for {key}")
    with _tuned_lock:
        known[key] = best
    _save(path, key, best)
    return best
