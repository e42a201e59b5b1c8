"""Why CLPS raises PSNR but lowers checker accuracy: CLQ with and without CLPS (and with the
clip search on weights only / activations only), sampled from the same noise as FP, compared
by the checker's parts, per true shape, by agreement with FP's own checker decision, and by
the feature the shape check reads (the fill ratio of the bounding box).

    python bench/clps_accuracy.py --threads 2      # W4A4 per channel, outlier toy, 3 seeds

Writes bench/results/clps-accuracy.md and .json. CPU (PyTorch reference kernels) or CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import clq_triton  # noqa: E402
from clq_triton.images import psnr  # noqa: E402
from clq_triton.toy.model import GUIDANCE, WEIGHTS_DIR, calibration_data, load_tiny_dit, sample  # noqa: E402,E501
from clq_triton.toy.shapes import N_CLASSES, N_COLOURS, SHAPES, classify, image_features  # noqa: E402,E501
from quality import _ms  # noqa: E402

VARIANTS = {
    "CLQ": clq_triton.CLQ(),
    "CLQ w/o CLPS": clq_triton.CLQ(clps=False),
    "CLPS on weights only": clq_triton.CLQ(a_clip_grid=(1.0,)),
    "CLPS on activations only": clq_triton.CLQ(w_clip_grid=(1.0,)),
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def shape_of(labels: torch.Tensor) -> torch.Tensor:
    """Shape index of checker labels; -1 where the checker found no shape."""
    return torch.where(labels >= 0, labels // 4 // N_COLOURS, -1)


def compare(imgs, fp_imgs, labels) -> dict:
    """Checker parts, shape confusion, agreement with FP and fill-ratio drift of one seed."""
    got, fp_got = classify(imgs), classify(fp_imgs)
    want_shape, got_shape = shape_of(labels), shape_of(got)
    fill, fp_fill = image_features(imgs)[:, 5], image_features(fp_imgs)[:, 5]
    out = dict(acc=float((got == labels).float().mean()),
               shape_acc=float((got_shape == want_shape).float().mean()),
               psnr=None if imgs is fp_imgs else psnr(imgs, fp_imgs),
               agree_fp=float((got == fp_got).float().mean()),
               # images FP gets right that the quantized model gets wrong, and the reverse
               lost=float(((fp_got == labels) & (got != labels)).float().mean()),
               gained=float(((fp_got != labels) & (got == labels)).float().mean()))
    for s, name in enumerate(SHAPES):
        sel = want_shape == s
        out[f"{name}_acc"] = float((got_shape[sel] == s).float().mean())
        out[f"{name}_fill_drift"] = float((fill[sel] - fp_fill[sel]).mean())
        out[f"{name}_fill_absdev"] = float((fill[sel] - fp_fill[sel]).abs().mean())
        for t, other in enumerate((*SHAPES, "none")):
            if other != name:
                out[f"{name}_as_{other}"] = int((got_shape[sel] == (t if t < 3 else -1)).sum())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--group", default="none", help="group size or 'none' (per channel)")
    ap.add_argument("--outliers", type=int, default=1, help="1: the outlier toy, 0: the toy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--calib-samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(RESULTS, "clps-accuracy"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    group = None if args.group == "none" else int(args.group)
    fp, sched = load_tiny_dit(WEIGHTS_DIR, outliers=bool(args.outliers))
    data = calibration_data(fp, sched, args.steps, args.calib_samples, progress=False,
                            guidance=GUIDANCE)
    labels = torch.arange(N_CLASSES).repeat(args.per_class)
    fp_imgs = {s: sample(fp, sched, labels, steps=args.steps, guidance=GUIDANCE, seed=s)
               for s in args.seeds}
    fp_rows = [compare(fp_imgs[s], fp_imgs[s], labels) for s in args.seeds]
    results = {"FP": fp_rows}
    config = clq_triton.QuantConfig.from_bits(args.bits, group_size=group)
    for name, method in VARIANTS.items():
        model = copy.deepcopy(fp)
        t0 = time.time()
        clq_triton.patch(model, config, method, data, progress=False)
        results[name] = [compare(sample(model, sched, labels, steps=args.steps,
                                        guidance=GUIDANCE, seed=s), fp_imgs[s], labels)
                         for s in args.seeds]
        print(f"{name}: {time.time() - t0:.0f} s, acc "
              f"{statistics.fmean(r['acc'] for r in results[name]):.3f}", flush=True)
    write(args, results)


def _col(rows, key, digits=3):
    """mean ± std of one value over the seeds' rows (quality.py's format)."""
    return _ms([r[key] for r in rows], digits)


def write(args, results):
    with open(args.out + ".json", "w") as f:
        json.dump(dict(args=vars(args), results=results), f, indent=1)
    cols = ["acc", "shape_acc", "psnr", "agree_fp", "lost", "gained"]
    lines = ["# CLPS and checker accuracy", "",
             f"Made by `python bench/clps_accuracy.py {' '.join(sys.argv[1:])}`: {args.bits}, "
             f"scales {'per channel' if args.group == 'none' else 'g' + args.group}, "
             f"{'outlier ' if args.outliers else ''}toy, seeds {args.seeds}, "
             f"{N_CLASSES * args.per_class} images per seed; mean ± std over the seeds. "
             "`agree_fp`: the checker's label equals its label of the FP image from the same "
             "noise; `lost` / `gained`: images FP gets right and the model wrong / the reverse. "
             "Fill drift: mean (fill ratio − FP's fill ratio) of the same noise, per true shape "
             "(the checker calls a shape a square above 0.9, a circle above 0.64, else a "
             "triangle).", "",
             "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, rows in results.items():
        lines.append(f"| {name} | " + " | ".join(_col(rows, c, 2 if c == "psnr" else 3)
                                                 for c in cols) + " |")
    lines += ["", "Per true shape: accuracy, fill drift vs FP, mean |fill − FP fill|, and "
              "where the misses went (summed over seeds):", "",
              "| variant | shape | acc | fill drift | abs fill dev | misread as |",
              "|---" * 6 + "|"]
    for name, rows in results.items():
        for s in SHAPES:
            misses = ", ".join(f"{o} {sum(r[f'{s}_as_{o}'] for r in rows)}"
                               for o in (*SHAPES, "none") if o != s)
            lines.append(f"| {name} | {s} | {_col(rows, s + '_acc')} | "
                         f"{_col(rows, s + '_fill_drift')} | {_col(rows, s + '_fill_absdev')} | "
                         f"{misses} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md", flush=True)


if __name__ == "__main__":
    main()
