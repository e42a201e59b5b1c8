"""Why a CLQ part helps or not on the tiny DiT: what CBC changes in the calibration inputs, and
what CLPS chooses.

    python bench/clq_diagnostics.py     # writes bench/results/clq-diagnostics.md

For each block of the outlier toy (W4A4, per-channel scales, the calibration samples of
bench/quality.py): the relative difference between the block's inputs in the quantized model
(what CBC calibrates on) and in the FP model (what calibration without CBC uses), and how much
the statistics OBS is built from (per-channel max |x| and mean of the block's Linear inputs)
differ between the two. Then the (w_clip, a_clip) pairs CLPS chose, and the clip-1.0 error it
saved at its own objective.
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import os
import sys

import torch

import clq_triton
from clq_triton.blocks import find_blocks
from clq_triton.smoothing import ChannelRange
from clq_triton.stream import BlockStream, block_links
from clq_triton.toy.model import WEIGHTS_DIR, calibration_data, load_tiny_dit
from quality import weights_id

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _hidden_states(calls) -> torch.Tensor:
    """The blocks' hidden-state input of every call (first positional or ``hidden_states``)."""
    return torch.cat([args[0] if args else kwargs["hidden_states"] for args, kwargs in calls])


def block_drift(fp, quant, data):
    """Per block: (relative input difference, max relative change of per-channel max |x|,
    of per-channel mean) between the quantized and the FP model's streams."""
    rows = []
    names = [n for n, _ in find_blocks(fp, data.samples[0], "cpu")]
    links = block_links(fp, [fp.get_submodule(n) for n in names], data.samples[0], "cpu")
    fs, qs = BlockStream(fp, names, links, data, "cpu"), BlockStream(quant, names, links, data,
                                                                     "cpu")
    for i, name in enumerate(names):
        fx, qx = _hidden_states(fs.calls), _hidden_states(qs.calls)
        lins = {n: m for n, m in fp.get_submodule(name).named_modules()
                if isinstance(m, torch.nn.Linear) and not n.startswith("norm")}
        stats = []
        for calls in (fs.calls, qs.calls):  # the FP block on each stream's inputs
            st = ChannelRange(lins)
            for args, kwargs in calls:
                fp.get_submodule(name)(*args, **kwargs)
            st.close()
            stats.append(st)
        amax = max(_rel(stats[1].amax(n), stats[0].amax(n)) for n in lins)
        mean = max(_rel(stats[1].mean[n], stats[0].mean[n]) for n in lins)
        rows.append((name, _rel(qx, fx), amax, mean))
        if i + 1 < len(names):
            fs.advance()
            qs.advance()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-samples", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(RESULTS, "clq-diagnostics.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    fp, sched = load_tiny_dit(outliers=True)
    data = calibration_data(fp, sched, 10, args.calib_samples, progress=False)
    cfg = clq_triton.QuantConfig.from_bits("w4a4", group_size=None)
    with clq_triton.backend("torch"):
        quant = copy.deepcopy(fp)
        clq_triton.patch(quant, cfg, clq_triton.CLQ(), data, progress=False)
        with torch.no_grad():
            drift = block_drift(fp, quant, data)
    clips = collections.Counter((m.config.w_clip, m.config.a_clip) for m in quant.modules()
                                if isinstance(m, clq_triton.QuantLinear))
    lines = [
        "# CLQ diagnostics on the outlier toy (W4A4, per-channel scales)",
        "",
        f"Measured {datetime.date.today()} on CPU by `python bench/clq_diagnostics.py"
        f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`; "
        f"{len(data)} calibration samples as in bench/quality.py; shipped weights, sha256 "
        f"{weights_id(WEIGHTS_DIR)}….",
        "",
        "## What CBC changes: block inputs of the CLQ-quantized model vs the FP model",
        "",
        "| block | ‖x_q − x_fp‖ / ‖x_fp‖ | max over its Linears: rel. change of per-channel "
        "max abs(x) | … of per-channel mean |",
        "|---|---|---|---|",
        *[f"| {n} | {a:.4f} | {b:.4f} | {c:.4f} |" for n, a, b, c in drift],
        "",
        "## What CLPS chose (w_clip, a_clip): number of layers",
        "",
        *[f"- {k}: {v}" for k, v in sorted(clips.items(), reverse=True)],
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
