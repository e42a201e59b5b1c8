"""Host cost of one QuantLinear call without its kernels, on the CPU: the package's whole launch
path runs (checks, dispatch, plans, allocations, argument packing) with every Triton launch a
no-op (bench_utils.stubbed_kernels), so what is timed is the Python a GPU call runs on the
host, less Triton's own launcher. Prints µs per call (the lowest of several medians: the
machine's noise only adds) and, with ``--profile``, a cProfile top.

    PYTHONPATH=. python bench/host_cost.py                  # W4A4 per token, 16 tokens
    PYTHONPATH=. python bench/host_cost.py --group 64 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_utils import stubbed_kernels  # noqa: E402


def per_call_us(fn, calls: int, repeats: int) -> float:
    """The lowest of ``repeats`` medians of µs per call, each over ``calls`` calls."""
    medians = []
    for _ in range(repeats):
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times) * 1e6)
    return min(medians)


def main() -> None:
    import clq_triton
    from clq_triton.kernels import gemm, rotate_quantize

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--group", type=int, default=None, help="group size (default: per token)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="x [batch, tokens, K] (a DiT's)")
    ap.add_argument("--shape", default="1152x4608", help="in x out features")
    ap.add_argument("--int8", action="store_true", help="int8 operands")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print a cProfile top")
    args = ap.parse_args()
    torch.set_num_threads(1)
    k, n = (int(v) for v in args.shape.split("x"))
    cfg = clq_triton.QuantConfig.from_bits(args.bits, group_size=args.group)
    layer = clq_triton.QuantLinear.from_linear(nn.Linear(k, n), cfg).to(torch.bfloat16)
    if args.int8:
        layer.use_int8_operands()
    x = torch.randn(*(args.batch,) * bool(args.batch), args.tokens, k, dtype=torch.bfloat16)
    with torch.inference_mode(), stubbed_kernels():
        layer(x)
        per_call = sum(kern.launches for kern in (gemm._quant_matmul_kernel,
                                                  rotate_quantize._rotate_quantize_kernel))
        us = per_call_us(lambda: layer(x), args.calls, args.repeats)
        print(f"{args.bits} g{args.group or 0} {k}x{n} x{list(x.shape)}"
              f"{' int8' if args.int8 else ''}: {us:.1f} µs per call (CPU, no kernels), "
              f"{per_call} launches per call")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                layer(x)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
