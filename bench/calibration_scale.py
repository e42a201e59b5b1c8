"""Calibration at real size: time and peak memory of CLQ calibration on a PixArt-Σ-sized
transformer (hidden 1152, 16 heads × 72, 28 blocks, caption 4096; random weights) on CPU, and
how they grow with blocks, calibration samples and tokens.

    python bench/calibration_scale.py          # writes bench/results/calibration-scale.{md,json}
    python bench/calibration_scale.py --options   # the base size with each calibration option

Each configuration runs in its own process (peak RSS is per process). A calibration sample is
one transformer call at batch 2 (a CFG pair) with 8 caption tokens. CLQ runs with its default
settings except the CLPS grid, which is 2 × 2 here (time grows linearly with the grid size).
``--options`` runs the base configuration with plain CLQ and each option (GPTQ weights, the
low-rank branch at rank 32, SVDQuant at rank 32) in one run, so their costs compare as ratios;
its rows replace those of the same settings in the json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results")
BASE = dict(blocks=4, samples=2, tokens=64)
SWEEP = ([dict(BASE, blocks=b) for b in (2, 4, 8)] + [dict(BASE, samples=s) for s in (4, 8)]
         + [dict(BASE, tokens=t) for t in (256,)] + [dict(BASE, blocks=28)])
GRID = dict(w_clip_grid=(1.0, 0.9), a_clip_grid=(1.0, 0.9))
METHODS = {  # name → method config (the CLPS grid 2 × 2 wherever there is one)
    "CLQ": lambda clq: clq.CLQ(**GRID),
    "CLQ+GPTQ": lambda clq: clq.CLQ(gptq=True, **GRID),
    "CLQ+low rank 32": lambda clq: clq.CLQ(lowrank=32, **GRID),
    "SVDQuant 32": lambda clq: clq.SVDQuant(rank=32),
}
OPTIONS = [dict(BASE, method=m) for m in METHODS]


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_one(blocks: int, samples: int, tokens: int, threads: int, method: str = "CLQ",
            grid: int = 2) -> dict:
    import torch
    from diffusers import PixArtTransformer2DModel

    import clq_triton

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    side = int(round((tokens * 4) ** 0.5))  # patch 2: tokens = (side / 2)²
    model = PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
        num_layers=blocks, cross_attention_dim=1152, caption_channels=4096, sample_size=side,
        patch_size=2, norm_type="ada_norm_single", use_additional_conditions=False).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = [dict(hidden_states=torch.randn(2, 4, side, side, generator=gen),
                   encoder_hidden_states=torch.randn(2, 8, 4096, generator=gen),
                   timestep=torch.randint(0, 1000, (2,), generator=gen),
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None})
              for _ in range(samples)]
    data = clq_triton.CalibrationData.from_inputs(inputs)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    before = _rss_mib()
    t0 = time.perf_counter()
    with clq_triton.backend("torch"):
        m = METHODS[method](clq_triton)
        if grid == 1 and hasattr(m, "w_clip_grid"):  # --only-base: the test's quick run
            m = dataclasses.replace(m, w_clip_grid=(1.0,), a_clip_grid=(1.0,))
        report = clq_triton.patch(model, "w4a4", m, data, progress=False)
    seconds = time.perf_counter() - t0
    return dict(date=str(datetime.date.today()), method=method, blocks=blocks, samples=samples,
                tokens=tokens,
                layers=len(report.quantized), seconds=seconds, fp_weights_mib=weights_mib,
                rss_before_mib=before, peak_rss_mib=_rss_mib(), threads=threads)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help="internal: run one configuration given as JSON")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only-base", action="store_true",
                    help="one small configuration with a 1 × 1 clip grid (tests)")
    ap.add_argument("--options", action="store_true",
                    help="the base size with each calibration option (rows merge into the json)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "calibration-scale.md"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one), threads=args.threads)))
        return
    rows = []
    todo = SWEEP
    if args.options:
        todo = OPTIONS
    if args.only_base:
        todo = [dict(blocks=1, samples=1, tokens=16, method=m, grid=1)
                for m in (METHODS if args.options else ["CLQ"])]
    for cfg in todo:
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg),
                              "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['method']}: blocks {r['blocks']} samples {r['samples']} tokens {r['tokens']}: "
              f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"(FP weights {r['fp_weights_mib']:.0f} MiB)", flush=True)
    if args.options:
        rows = _merged(args.out, rows)
    write(args, rows)


def _key(r):
    return (r.get("method", "CLQ"), r["blocks"], r["samples"], r["tokens"])


def _merged(out, rows):
    """The json's rows with ``rows`` in place of those with the same settings."""
    path = os.path.splitext(out)[0] + ".json"
    stored = json.load(open(path)) if os.path.exists(path) else {"rows": []}
    old = [dict(r, date=r.get("date", stored.get("date"))) for r in stored["rows"]]
    new = {_key(r): r for r in rows}
    return [r for r in old if _key(r) not in new] + rows


def write(args, rows) -> None:
    import torch

    machine = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{args.threads} torch threads), torch {torch.__version__}, PyTorch reference "
               "kernels")
    lines = [
        "# CLQ calibration at PixArt-Σ size (hidden 1152, random weights)",
        "",
        f"Measured on {machine} by `python bench/calibration_scale.py` (the sweep) and "
        "`--options` (the base size with each option, one run), on the dates given. CLQ W4A4 "
        "(CBC, OBS, CLPS "
        "target block) with a 2 × 2 clip grid; a sample is one call at batch 2 with 8 caption "
        "tokens; each row is its own process. Peak RSS includes the FP model (fp32 weights) "
        "and the quantized layers being built.",
        "",
        "| date | method | blocks | samples | image tokens | layers | calibration s | "
        "s per block | FP weights MiB | peak RSS MiB | peak RSS − weights MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.get('date', '')} | {r.get('method', 'CLQ')} | {r['blocks']} | "
                     f"{r['samples']} | "
                     f"{r['tokens']} | {r['layers']} | "
                     f"{r['seconds']:.1f} | {r['seconds'] / r['blocks']:.2f} | "
                     f"{r['fp_weights_mib']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_mib'] - r['fp_weights_mib']:.0f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(dict(machine=machine, date=str(datetime.date.today()), rows=rows), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
