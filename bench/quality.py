"""Quality table: quantization methods × bit widths on the shipped tiny DiT.

    python bench/quality.py                   # writes bench/results/quality.md

For every (bits, method) the transformer is quantized from the same FP model, calibrated on
the same captured samples, and sampled from the same noise as FP. Metrics:
- checker accuracy (clq_triton.toy.shapes): shape / colour / position / all three, GenEval-like
- PSNR of each image vs the FP image from the same noise (paired fidelity)
- FD: Fréchet distance of checker features vs held-out real images (FID-style; lower is better)
Runs on CPU (PyTorch reference kernels) or CUDA.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import sys
import time

import torch

import clq_triton
from clq_triton.images import psnr
from clq_triton.toy.model import WEIGHTS_DIR, calibration_data, load_tiny_dit, sample
from clq_triton.toy.shapes import N_CLASSES, accuracy, frechet_distance, image_features, real_features

VARIANTS = {  # name → method config (CLQ's CLPS grid is set from the command line)
    "RTN": clq_triton.RTN(),
    "SmoothQuant": clq_triton.SmoothQuant(),
    "QuaRot": clq_triton.QuaRot(),
    "CLQ": clq_triton.CLQ(),
    "CLQ w/o CBC": clq_triton.CLQ(cbc=False),
    "CLQ w/o OBS": clq_triton.CLQ(obs=False),
    "CLQ w/o CLPS": clq_triton.CLQ(clps=False),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=WEIGHTS_DIR)
    ap.add_argument("--bits", nargs="+", default=["w8a8", "w4a8", "w4a4"])
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--per-class", type=int, default=2, help="evaluation images per class")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--calib-samples", type=int, default=10, help="captured sampler steps")
    ap.add_argument("--w-clips", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.85, 0.8],
                    help="CLPS weight clip grid")
    ap.add_argument("--a-clips", type=float, nargs="+", default=[1.0, 0.9, 0.8],
                    help="CLPS activation clip grid")
    ap.add_argument("--groups", nargs="+", default=["64", "128", "none"],
                    help="scale modes: group sizes, 'none' = per token / per output channel")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "quality.md"))
    args = ap.parse_args()
    groups = [None if g.lower() == "none" else int(g) for g in args.groups]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    grid = dict(w_clip_grid=tuple(args.w_clips), a_clip_grid=tuple(args.a_clips))
    fp, sched = load_tiny_dit(args.weights)
    fp = fp.to(device)
    labels = torch.arange(N_CLASSES).repeat(args.per_class)
    real = real_features(40)
    data = calibration_data(fp, sched, args.steps, args.calib_samples, progress=False)

    def evaluate(model):
        t0 = time.time()
        imgs = sample(model, sched, labels, steps=args.steps, seed=0)
        return imgs, time.time() - t0

    fp_imgs, fp_time = evaluate(fp)
    rows = [("FP", "-", "-", accuracy(fp_imgs, labels), float("inf"),
             frechet_distance(image_features(fp_imgs), real), 0.0, fp_time)]
    print(f"FP: {rows[0][3]}")
    for bits in args.bits:
        for group in groups:
            config = clq_triton.QuantConfig.from_bits(bits, group_size=group)
            for name in args.methods:
                model = copy.deepcopy(fp)
                t0 = time.time()
                method = VARIANTS[name]
                if isinstance(method, clq_triton.CLQ):
                    method = dataclasses.replace(method, **grid)
                clq_triton.patch(model, config, method, data, progress=False)
                calib_time = time.time() - t0
                imgs, gen_time = evaluate(model)
                mode = f"g{group}" if group else "per-channel"
                row = (name, bits, mode, accuracy(imgs, labels), psnr(imgs, fp_imgs),
                       frechet_distance(image_features(imgs), real), calib_time, gen_time)
                rows.append(row)
                print(f"{bits} {mode} {name}: acc {row[3]['overall']:.3f} PSNR {row[4]:.2f} "
                      f"FD {row[5]:.4f} ({calib_time:.0f}s calib)", flush=True)
    write_table(args, rows, device, len(data))


def write_table(args, rows, device, n_calib):
    machine = (torch.cuda.get_device_name() if device == "cuda"
               else f"CPU ({platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} cores), PyTorch reference kernels")
    lines = [
        "# Quality of quantized tiny DiT (coloured shapes, 48 classes)",
        "",
        f"Measured {datetime.date.today()} on {machine} by "
        f"`{' '.join(['python bench/quality.py', *sys.argv[1:]])}`;",
        f"{N_CLASSES * args.per_class} images ({args.per_class} per class), DDIM {args.steps} "
        f"steps, guidance 2.0, same noise for every row; calibration: {n_calib} captured "
        "sampler steps of 12 other classes and other noise. Hadamard block 64; scale modes "
        "(kernels.formats): gN = activation scale per token per N channels and two-level "
        "4-bit weights, per-channel = one scale per token and per output channel; "
        f"CLPS grid w {args.w_clips} × a {args.a_clips}.",
        "",
        "| bits | scales | method | overall acc | shape | colour | position | PSNR vs FP (dB) |"
        " FD ↓ | calib s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, bits, mode, acc, p, fd, ct, _ in rows:
        ps = "∞" if p == float("inf") else f"{p:.2f}"
        lines.append(f"| {bits} | {mode} | {name} | {acc['overall']:.3f} | {acc['shape']:.3f} | "
                     f"{acc['colour']:.3f} | {acc['position']:.3f} | {ps} | {fd:.4f} | "
                     f"{ct:.0f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
