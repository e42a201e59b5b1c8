"""Benchmark settings and helpers: real DiT shapes on CUDA, tiny shapes on CPU (where the launchers run
their PyTorch references, so CPU timings only show that the suite runs).

Run: ``pytest bench --benchmark-only``. Each benchmark stores what it measured (shape,
backend, GB/s or TOPS) in ``extra_info``; ``--benchmark-json FILE`` keeps them.
"""

import time

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
BACKEND = "triton" if CUDA else "torch-reference"

# (tokens M, in K, out N): PixArt-Σ hidden 1152 / FFN 4608; FLUX hidden 3072 / FFN 12288.
# M = 4096 is the target row; 1024 shows a smaller batch.
GEMM_SHAPES = (
    [(m, k, n) for m in (4096, 1024)
     for k, n in ((1152, 4608), (4608, 1152), (3072, 12288), (12288, 3072))]
    if CUDA else [(64, 256, 256), (64, 256, 512)]
)
GROUPS = (None, 128, 64)  # scale modes: per channel, group 128, group 64


def shape_id(shape):
    return "M{}-K{}-N{}".format(*shape)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def run(benchmark, fn, rounds=None):
    """Benchmark ``fn`` (synchronised) and return the mean seconds per call."""
    def call():
        fn()
        sync()

    fn()  # compile / autotune outside the timing
    sync()
    start = time.perf_counter()
    if rounds:
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
    else:
        benchmark(call)
    if benchmark.stats is None:  # --benchmark-disable: one untimed-by-plugin call
        return time.perf_counter() - start
    return benchmark.stats.stats.mean
