"""The quantized GEMM per launch config on one GPU: the shipped table's config beside a few
alternatives, against torch bf16 (cuBLAS), at PixArt-Σ and FLUX shapes (M = 4096).

    python bench/gemm_sweep.py --out bench/results/DIR      # CUDA; about a minute on an H100
    python bench/gemm_sweep.py --jobs 16 ...                 # compile in 16 processes first

Each row: mode (W4A4 / W4A8 / W8A8, per channel or group 64), shape, config, ms (median of
``triton.testing.do_bench_cudagraph``: replayed from a CUDA graph, so a kernel shorter than its
launcher's host time is still timed on the GPU — plain ``do_bench`` timed W8A8 at the host's
pace on 2026-12-04), × bf16's time (> 1 is faster), and whether the config is
the table's. The results choose the table (``clq_triton.kernels.tuning``): the table's rows
are what users get. Configs are compiled in parallel processes first (Triton's disk cache
keeps them), then timed one at a time. Writes ``gemm-sweep-<device>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from clq_triton.kernels import gemm, tuning  # noqa: E402
from clq_triton.kernels.formats import pack_codes  # noqa: E402
from clq_triton.kernels.quantize import quantize_ref, quantize_weight_ref  # noqa: E402

M = 4096
SHAPES = ((1152, 1152), (1152, 4608), (4608, 1152), (3072, 12288), (12288, 3072))  # (K, N)
MODES = ((4, 4, None), (4, 4, 64), (4, 8, None), (8, 8, None))  # (w_bits, a_bits, group)
C = tuning.GemmConfig
# alternatives to the table's config, by (group or not); fitted() per call like the table
ALTERNATIVES = {
    False: (C(128, 256, 128, 8, 3), C(128, 128, 128, 8, 3), C(128, 256, 64, 8, 4)),
    True: (C(64, 128, 64, 4, 3), C(64, 128, 64, 4, 4), C(128, 128, 64, 8, 3),
           C(128, 64, 64, 8, 3)),
}


def configs(k: int, group, a_bits: int, w_bits: int) -> list[tuple[tuning.GemmConfig, bool]]:
    """(config, is the table's) for one call; the table's first."""
    arch = tuning.device_arch(torch.device("cuda")) if torch.cuda.is_available() else 90
    table = tuning.fitted_table_config(arch, M, k, group, a_bits, w_bits)
    out = [(table, True)]
    for c in ALTERNATIVES[group is not None]:
        cfg = c.fitted(k, group, a_bits, w_bits)  # BK = the group, or dividing K
        if cfg not in [o for o, _ in out]:
            out.append((cfg, False))
    return out


def operands(k, n, a_bits, w_bits, group, dev):
    xc, xs = quantize_ref(torch.randn(M, k, device=dev), group, a_bits)
    wc, ws, wz = quantize_weight_ref(torch.randn(n, k, device=dev), group, w_bits)
    bias = torch.randn(n, device=dev)
    return pack_codes(xc, a_bits), xs, pack_codes(wc, w_bits), ws, wz, bias


def run(xq, xs, wq, ws, wz, bias, a_bits, w_bits, group, cfg):
    """One GEMM with ``cfg`` forced (the launcher's own path otherwise)."""
    saved = gemm._config
    gemm._config = lambda *a, **k: cfg
    try:
        return gemm.quant_matmul(xq, xs, wq, ws, wz, bias, a_bits, w_bits, group)
    finally:
        gemm._config = saved


def _compile_one(args):
    """In a worker process: compile (launch once) every config of one (mode, shape)."""
    k, n, a_bits, w_bits, group = args
    ops = operands(k, n, a_bits, w_bits, group, "cuda")
    for cfg, _ in configs(k, group, a_bits, w_bits):
        try:
            run(*ops, a_bits, w_bits, group, cfg)
        except Exception:  # noqa: BLE001 - the timing pass reports it
            pass
    torch.cuda.synchronize()
    return args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--jobs", type=int, default=8, help="compile processes (0: none)")
    args = ap.parse_args(argv)
    from triton.testing import do_bench_cudagraph

    from gpu_check import env_info

    cases = [(k, n, a, w, g) for k, n in SHAPES for w, a, g in MODES]
    if args.jobs:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for c in pool.map(_compile_one, cases):
                print("compiled", c, flush=True)
    rows, bf16 = [], {}
    for k, n, a_bits, w_bits, group in cases:
        if (k, n) not in bf16:
            x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            bf16[k, n] = do_bench_cudagraph(lambda: x @ w.T, rep=50, return_mode="median")
        ops = operands(k, n, a_bits, w_bits, group, "cuda")
        ref = gemm.quant_matmul_ref(*ops, a_bits, w_bits, torch.float32)
        mode = f"w{w_bits}a{a_bits}-" + (f"g{group}" if group else "pc")
        for cfg, is_table in configs(k, group, a_bits, w_bits):
            row = dict(mode=mode, K=k, N=n, config=repr(cfg), table=is_table,
                       bf16_ms=round(bf16[k, n], 5))
            try:
                y = run(*ops, a_bits, w_bits, group, cfg)
                row["max_rel_err"] = float(((y.float() - ref).abs().max()
                                            / ref.abs().max()).item())
                ms = do_bench_cudagraph(lambda: run(*ops, a_bits, w_bits, group, cfg), rep=50,
                                        return_mode="median")
                row.update(ms=round(ms, 5), x_bf16=round(bf16[k, n] / ms, 3))
            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                row["error"] = repr(e)[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = env_info("cuda")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gemm-sweep-{info['device'].replace(' ', '-')}-{info['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(env=info, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# GEMM configs: {info['device']}, {info['date']}\n\n"
                + " | ".join(f"{k}: {v}" for k, v in info.items()) + "\n\n"
                "M = 4096; × bf16 = torch bf16 time / this time (> 1: faster); * = the table's\n\n"
                "| mode | K | N | config | ms | × bf16 | max rel err |\n|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['mode']} | {r['K']} | {r['N']} | {'*' if r['table'] else ''}"
                    f"{r['config'].replace('GemmConfig', '')} | {r.get('ms', r.get('error'))} | "
                    f"{r.get('x_bf16', '')} | {r.get('max_rel_err', '')} |\n")
    print("wrote", stem + ".md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
