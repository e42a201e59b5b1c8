"""Output error of CLQ with and without fused projections on the tiny FLUX of the tests
(random weights: 1 double + 2 single blocks, hidden 64), for the fusions the toy DiT of
bench/quality.py cannot show (its blocks have no FLUX single blocks).

    python bench/fusion_error.py     # writes bench/results/fusion-error.md

Per seed: a fresh model, 4 calibration and 4 evaluation inputs; W4A4 g64, CLQ defaults,
PyTorch reference kernels, one thread. Modes: unfused; "qkv" = diffusers' fusion only
(fuse_projections(shared_inputs=False)); "qkv+mlp" = also each single block's to_qkv and
proj_mlp as one layer. Error: ||y - y_fp|| / ||y_fp|| averaged over the evaluation inputs.
"""

from __future__ import annotations

import copy
import datetime
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

MODES = ("unfused", "qkv", "qkv+mlp")


def main(seeds: int = 5) -> str:
    import clq_triton
    from clq_triton.fuse import fuse_projections
    from diffusers_models import MODELS, output

    torch.set_num_threads(1)
    errs: dict[str, list[float]] = {m: [] for m in MODES}
    for seed in range(seeds):
        def inputs(base):
            return [MODELS["flux"](torch.Generator().manual_seed(base + 10 * seed + i))[1]
                    for i in range(4)]
        fp, _ = MODELS["flux"](torch.Generator().manual_seed(seed))
        fp.eval()
        data = clq_triton.CalibrationData.from_inputs(inputs(100))
        evals = inputs(1000)
        with torch.no_grad():
            ref = [output(fp, x) for x in evals]
        for mode in MODES:
            m = copy.deepcopy(fp)
            if mode != "unfused":
                fuse_projections(m, shared_inputs=mode == "qkv+mlp")
            with clq_triton.backend("torch"), torch.no_grad():
                clq_triton.patch(m, "w4a4", clq_triton.CLQ(), data, progress=False)
                errs[mode].append(statistics.mean(
                    float((output(m, x) - r).norm() / r.norm()) for x, r in zip(evals, ref)))
        print(seed, {k: round(v[-1], 4) for k, v in errs.items()}, flush=True)
    lines = [
        "# Output error with fused projections (tiny FLUX, random weights)",
        "",
        f"{datetime.date.today()}, CPU ({platform.machine()}), torch {torch.__version__}, "
        f"`python bench/fusion_error.py`: {seeds} seeds, W4A4 g64, CLQ defaults.",
        "",
        "| fusion | rel. output error, mean ± std over seeds | per seed |",
        "|---|---|---|",
    ]
    for mode, v in errs.items():
        lines.append(f"| {mode} | {statistics.mean(v):.4f} ± {statistics.stdev(v):.4f} | "
                     + ", ".join(f"{e:.4f}" for e in v) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = main()
    path = os.path.join(os.path.dirname(__file__), "results", "fusion-error.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
