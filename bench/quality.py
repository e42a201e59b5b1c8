"""Quality table: quantization methods × bit widths × scale modes on the tiny DiT, with and
without real-DiT-like activation outliers (clq_triton.toy.outliers), over several seeds.

    python bench/quality.py                 # full settings; writes bench/results/quality.{md,json}
    python bench/quality.py --bits w4a4 --groups none   # a part (rows merge into the json)

For every (model, bits, scale mode, method) the transformer is quantized from the same FP
model and calibrated once on the same captured sampler steps (12 classes, noise seed 1); it is
then sampled from the same noise as FP for each evaluation seed (4 images per class). Metrics,
mean ± std over the seeds:
- checker accuracy (clq_triton.toy.shapes): all three attributes right, and shape alone
- PSNR of each image vs the FP image from the same noise (paired fidelity)
- FD: Fréchet distance of checker features vs held-out real images (FID-style; lower is better)
Finished rows are stored in the json as they finish; a rerun skips them (``--fresh`` redoes
everything). Runs with the same settings may write one json at once (e.g. one per scale mode,
``--threads 1`` each, on two cores). W8A8 runs in one scale mode only (``--w8a8-groups``).
CPU (PyTorch reference kernels) or CUDA.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch

import clq_triton
from clq_triton.images import psnr
from clq_triton.jsonfile import dump_json, locked
from clq_triton.toy.model import GUIDANCE, WEIGHTS_DIR, calibration_data, load_tiny_dit, sample
from clq_triton.toy.shapes import (N_CLASSES, accuracy, frechet_distance, image_features,
                                   real_features)

VARIANTS = {  # name → method config; "CLQ" is the package's default CLQ()
    "RTN": clq_triton.RTN(),
    "Hadamard": clq_triton.Hadamard(),
    "QuaRot": clq_triton.QuaRot(),
    "SmoothQuant": clq_triton.SmoothQuant(),
    "CLQ": clq_triton.CLQ(),
    "CLQ w/o CBC": clq_triton.CLQ(cbc=False),
    "CLQ w/o OBS": clq_triton.CLQ(obs=False),
    "CLQ w/o CLPS": clq_triton.CLQ(clps=False),
    "CLQ w/o shift+smoothing": clq_triton.CLQ(shift=False, smooth_alpha=None),
    "CLQ, CLPS at depth": clq_triton.CLQ(clps_target="depth"),
    "CLQ+GPTQ": clq_triton.CLQ(gptq=True),
    "SmoothQuant+GPTQ": clq_triton.SmoothQuant(gptq=True),
    # the low-rank branch at rank 4 on the toy's width 128 (MLP 512) is the share of SVDQuant's
    # default rank 32 at PixArt-Σ's width 1152 (about 3 %; its bytes +25 % of a 4-bit weight)
    "QuaRot+GPTQ": clq_triton.QuaRot(gptq=True),
    "SVDQuant": clq_triton.SVDQuant(rank=4),
    "CLQ+low rank": clq_triton.CLQ(lowrank=4),
    "CLQ+GPTQ+low rank": clq_triton.CLQ(gptq=True, lowrank=4),
    "CLQ, fused q/k/v": clq_triton.CLQ(),
    # OBS dealing aligned runs of 8 channels: 16-byte loads in the activation kernel
    "CLQ, runs of 8": clq_triton.CLQ(perm_run=8),
}
FUSED = {"CLQ, fused q/k/v"}  # patched with fuse_projections=True (one layer for q/k/v)
BASELINES = ("RTN", "Hadamard", "QuaRot", "SmoothQuant", "QuaRot+GPTQ", "SmoothQuant+GPTQ",
             "SVDQuant")
# CLQ's options (not ablations): the candidates for its best W4A4 variant
CLQ_OPTIONS = ("CLQ", "CLQ+GPTQ", "CLQ+low rank", "CLQ+GPTQ+low rank")
PARTS = {"CBC": "CLQ w/o CBC", "OBS": "CLQ w/o OBS", "CLPS": "CLQ w/o CLPS"}
SHORT = {"CLQ w/o CBC": "w/o CBC", "CLQ w/o OBS": "w/o OBS", "CLQ w/o CLPS": "w/o CLPS",
         "CLQ w/o shift+smoothing": "w/o shift+sm.", "CLQ, CLPS at depth": "CLPS at depth",
         "CLQ, runs of 8": "runs of 8"}
MODELS = {"toy+outliers": True, "toy": False}  # name → load_tiny_dit(outliers=...)
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _mode(group):
    return f"g{group}" if group else "per-channel"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=WEIGHTS_DIR)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bits", nargs="+", default=["w4a4", "w4a8"])
    ap.add_argument("--groups", nargs="+", default=["none", "128", "64"],
                    help="scale modes: group sizes, 'none' = per token / per output channel")
    ap.add_argument("--w8a8-groups", nargs="*", default=["64"],
                    help="scale modes W8A8 also runs in (none: skip W8A8)")
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--per-class", type=int, default=4, help="evaluation images per class")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="evaluation noise seeds")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=GUIDANCE,
                    help="classifier-free guidance scale")
    ap.add_argument("--calib-samples", type=int, default=10, help="captured sampler steps")
    ap.add_argument("--w-clips", type=float, nargs="+", default=None,
                    help="CLPS weight clip grid of the CLQ rows (default: CLQ's)")
    ap.add_argument("--a-clips", type=float, nargs="+", default=None,
                    help="CLPS activation clip grid of the CLQ rows (default: CLQ's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=os.path.join(RESULTS, "quality.json"))
    ap.add_argument("--out", default=os.path.join(RESULTS, "quality.md"))
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in the json")
    ap.add_argument("--summary", action="store_true",
                    help="rewrite the table (--out) from the json, print its summary, exit")
    args = ap.parse_args()
    if args.summary:
        with open(args.json) as f:
            store = json.load(f)
        write_table(args, store)
        print("\n".join(summary_tables(store["rows"])))
        print("\nREADME table:\n\n" + "\n".join(readme_table(store["rows"])))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    groups = [None if g.lower() == "none" else int(g) for g in args.groups]
    w8_groups = [None if g.lower() == "none" else int(g) for g in args.w8a8_groups]
    jobs = [(b, g) for b in args.bits for g in groups]
    jobs += [("w8a8", g) for g in w8_groups if ("w8a8", g) not in jobs]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = dict(per_class=args.per_class, seeds=args.seeds, steps=args.steps,
                    guidance=args.guidance, calib_samples=args.calib_samples,
                    weights=weights_id(args.weights))
    store = {"rows": {}} if args.fresh or not os.path.exists(args.json) else \
        json.load(open(args.json))
    other = {json.dumps(r.get("settings"), sort_keys=True) for r in store["rows"].values()
             if r.get("settings") != settings}
    if other:
        sys.exit(f"{args.json} holds rows made with other settings or weights ({', '.join(other)}"
                 f"; now {settings}): pass --fresh to replace them, or --json/--out elsewhere")
    store["machine"] = machine(device)
    labels = torch.arange(N_CLASSES).repeat(args.per_class)
    real = real_features(40)
    variants = dict(VARIANTS)
    for name, m in variants.items():
        if isinstance(m, clq_triton.CLQ) and (args.w_clips or args.a_clips):
            variants[name] = dataclasses.replace(
                m, w_clip_grid=tuple(args.w_clips or m.w_clip_grid),
                a_clip_grid=tuple(args.a_clips or m.a_clip_grid))

    made = {}  # rows this run made: merged into the json, which other runs may also write
    # under torchrun / accelerate launch the rows are dealt over the processes (by their place
    # in the whole grid, so the split does not depend on which rows are done); the FP rows,
    # which every row compares with, are made by each process
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    index = -1
    for model_name in args.models:
        fp, sched = load_tiny_dit(args.weights, outliers=MODELS[model_name])
        fp = fp.to(device)
        data = calibration_data(fp, sched, args.steps, args.calib_samples, progress=False,
                                guidance=args.guidance)
        fp_imgs = {}
        for seed in args.seeds:
            fp_imgs[seed] = sample(fp, sched, labels, steps=args.steps, guidance=args.guidance,
                                   seed=seed)
        key = f"{model_name}|FP"
        store["rows"][key] = made[key] = dict(model=model_name, bits="-", mode="-", method="FP",
                                  calib_s=0.0, settings=settings,
                                  seeds=[metrics(fp_imgs[s], None, labels, real)
                                         for s in args.seeds])
        for bits, group in jobs:
            config = clq_triton.QuantConfig.from_bits(bits, group_size=group)
            for name in args.methods:
                index += 1
                if index % world != rank:  # another process's row (torchrun / accelerate)
                    continue
                key = f"{model_name}|{bits}|{_mode(group)}|{name}"
                old = store["rows"].get(key)
                if old and old.get("settings") == settings and \
                        _same_method(old.get("method_config"), variants[name]):
                    continue
                model = copy.deepcopy(fp)
                t0 = time.time()
                clq_triton.patch(model, config, variants[name],
                                 data if variants[name].calibrated else None, progress=False,
                                 fuse_projections=name in FUSED)
                calib = time.time() - t0
                per_seed = [metrics(sample(model, sched, labels, steps=args.steps,
                                           guidance=args.guidance, seed=s),
                                    fp_imgs[s], labels, real) for s in args.seeds]
                row = dict(model=model_name, bits=bits, mode=_mode(group), method=name,
                           method_config=_jsonable(variants[name].to_dict()), calib_s=calib,
                           settings=settings, seeds=per_seed, command=_command())
                store["rows"][key] = made[key] = row
                s = summary(row)
                print(f"{key}: acc {s['acc']} PSNR {s['psnr']} FD {s['fd']} "
                      f"({calib:.0f}s calib)", flush=True)
                save(args, store, made)
    save(args, store, made)


def _same_method(saved: dict | None, method) -> bool:
    """Whether a row's saved method config is ``method`` (fields added since with their
    defaults, e.g. ``gptq=False``, count as equal)."""
    try:
        return saved is not None and clq_triton.methods.method_from_dict(saved) == method
    except ValueError:
        return False


def weights_id(directory: str) -> str:
    """First 12 hex digits of the sha256 of the model's safetensors file: rows made from other
    weights are not reused."""
    with open(os.path.join(directory, "diffusion_pytorch_model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def _command() -> str:
    return "python bench/quality.py " + shlex.join(sys.argv[1:])


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


def metrics(imgs, fp_imgs, labels, real) -> dict:
    acc = accuracy(imgs, labels)
    return dict(acc=acc["overall"], shape=acc["shape"], colour=acc["colour"],
                position=acc["position"],
                psnr=None if fp_imgs is None else psnr(imgs, fp_imgs),
                fd=frechet_distance(image_features(imgs), real))


def _ms(values, digits):
    values = [v for v in values if v is not None]
    if not values:
        return "∞"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary(row) -> dict:
    s = row["seeds"]
    return {k: _ms([x[k] for x in s], d) for k, d in
            (("acc", 3), ("shape", 3), ("psnr", 2), ("fd", 3))}


def _group_key(group):
    """Sort key of a (model, bits, mode) group: model order of MODELS, bits, then per
    channel, g256, g128, g64."""
    model, bits, mode = group
    models = list(MODELS)
    return (models.index(model) if model in models else 99, bits, mode != "per-channel",
            -int(mode[1:]) if mode[1:].isdigit() else 0)


def _by_group(rows: dict) -> dict:
    """(model, bits, scale mode) → method → row, the FP rows left out."""
    means: dict = {}
    for r in rows.values():
        if r["method"] != "FP":
            means.setdefault((r["model"], r["bits"], r["mode"]), {})[r["method"]] = r
    return means


def stat(r, k) -> tuple[float, float]:
    """Mean and std over a row's seeds of metric ``k``."""
    v = [x[k] for x in r["seeds"]]
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def summary_tables(rows: dict) -> list[str]:
    """Markdown: PSNR and accuracy per (model, bits, scale mode) × method (means over the
    seeds, the best baseline-or-CLQ value in bold), then CLQ's margins: over the best baseline
    and over CLQ without each part, as differences of the means with the larger seed-std of
    the two in brackets."""
    means = _by_group(rows)
    groups = sorted(means, key=_group_key)
    methods = [m for m in VARIANTS if any(m in means[g] for g in groups)]

    out = []
    for k, title, digits in (("psnr", "PSNR vs FP (dB)", 2), ("acc", "accuracy (all 3)", 3)):
        out += [f"{title}, mean over the seeds; bold: the best of the baselines and CLQ", "",
                "| model | bits | scales | " + " | ".join(SHORT.get(m, m) for m in methods)
                + " |", "|---" * (3 + len(methods)) + "|"]
        for g in groups:
            got = {m: stat(r, k)[0] for m, r in means[g].items()}
            head = [m for m in (*BASELINES, "CLQ") if m in got]
            best = max(got[m] for m in head) if head else None
            cells = ["" if m not in got else
                     (f"**{got[m]:.{digits}f}**" if m in head and got[m] == best
                      else f"{got[m]:.{digits}f}") for m in methods]
            out.append(f"| {' | '.join(g)} | " + " | ".join(cells) + " |")
        out.append("")

    def margin(a, b):
        d = []
        for k, digits in (("psnr", 2), ("acc", 3)):
            (ma, sa), (mb, sb) = stat(a, k), stat(b, k)
            d.append(f"{ma - mb:+.{digits}f} ({max(sa, sb):.{digits}f})")
        return " / ".join(d)

    out += ["CLQ's margins, PSNR dB / accuracy: CLQ minus the best baseline (by PSNR) and "
            "minus CLQ without each part; in brackets the larger seed-std of the two", "",
            "| model | bits | scales | best baseline | vs it | " + " | ".join(PARTS) + " |",
            "|---" * (5 + len(PARTS)) + "|"]
    for g in groups:
        rs = means[g]
        if "CLQ" not in rs:
            continue
        base = [m for m in BASELINES if m in rs]
        top = max(base, key=lambda m: stat(rs[m], "psnr")[0]) if base else None
        cells = [top or "", margin(rs["CLQ"], rs[top]) if top else ""]
        cells += [margin(rs["CLQ"], rs[v]) if v in rs else "" for v in PARTS.values()]
        out.append(f"| {' | '.join(g)} | " + " | ".join(cells) + " |")

    out += ["", "W4A4 against W4A8: the best CLQ option at W4A4 (by PSNR) minus CLQ at W4A8 in "
            "the same scale mode, PSNR dB / accuracy; in brackets the larger seed-std", "",
            "| model | scales | best at w4a4 | its PSNR / acc | CLQ w4a8 | gap |",
            "|---|---|---|---|---|---|"]
    for model, bits, mode in groups:
        w8 = means.get((model, "w4a8", mode), {}).get("CLQ")
        got = {m: r for m, r in means[(model, bits, mode)].items() if m in CLQ_OPTIONS}
        if bits != "w4a4" or w8 is None or not got:
            continue
        top = max(got, key=lambda m: stat(got[m], "psnr")[0])
        r = got[top]
        out.append(f"| {model} | {mode} | {top} | {stat(r, 'psnr')[0]:.2f} / "
                   f"{stat(r, 'acc')[0]:.3f} | {stat(w8, 'psnr')[0]:.2f} / "
                   f"{stat(w8, 'acc')[0]:.3f} | {margin(r, w8)} |")
    return out


def readme_table(rows: dict) -> list[str]:
    """Markdown for the README: per (model, bits, scale mode), CLQ, the best baseline and the
    best CLQ option (by mean PSNR; CLQ itself counts), each as mean PSNR / accuracy; the best
    CLQ option in bold where it leads every baseline."""
    means = _by_group(rows)

    def mean(r, k):
        return stat(r, k)[0]

    def cell(r):
        return f"{mean(r, 'psnr'):.2f} dB / {mean(r, 'acc'):.3f}"

    out = ["| model | bits | scales | CLQ | best baseline | its PSNR / accuracy | "
           "best CLQ option | its PSNR / accuracy |", "|---" * 8 + "|"]
    for g in sorted(means, key=_group_key):
        rs = means[g]
        base = [m for m in BASELINES if m in rs]
        opts = [m for m in CLQ_OPTIONS if m in rs]
        if "CLQ" not in rs or not base:
            continue
        top = max(base, key=lambda m: mean(rs[m], "psnr"))
        best = max(opts, key=lambda m: mean(rs[m], "psnr"))
        lead = mean(rs[best], "psnr") > mean(rs[top], "psnr")
        mark = "**" if lead else ""
        out.append(f"| {' | '.join(g)} | {cell(rs['CLQ'])} | {top} | {cell(rs[top])} | "
                   f"{best} | {mark}{cell(rs[best])}{mark} |")
    return out


def machine(device) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
            "torch threads: see each command), PyTorch reference kernels")


def save(args, store, made) -> None:
    """Write the rows this run made into the json and rewrite the table. Runs with the same
    settings may share one json (e.g. one process per scale mode): under a lock, the file is
    re-read and this run's rows are merged in. ``--fresh`` replaces the file instead."""
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with locked(args.json):
        if not args.fresh and os.path.exists(args.json):
            with open(args.json) as f:
                store["rows"] = {**json.load(f)["rows"], **made}
        store["updated"] = str(datetime.date.today())
        store["command"] = _command()
        dump_json(args.json, store, indent=1)
        write_table(args, store)


def write_table(args, store) -> None:
    rows = store["rows"]
    settings = next(iter(rows.values()))["settings"] if rows else {}
    commands = list(dict.fromkeys(r.get("command", store["command"]) for r in rows.values()))
    lines = [
        "# Quality of the quantized tiny DiT (coloured shapes, 48 classes)",
        "",
        f"Last updated {store['updated']} on {store['machine']}. Rows were made by "
        + "; ".join(f"`{c}`" for c in commands) + " (a rerun keeps finished rows with the "
        "same settings; the json has each row's command and per-seed values).",
        f"{N_CLASSES * settings.get('per_class', 0)} images per seed "
        f"({settings.get('per_class')} per class), evaluation seeds {settings.get('seeds')}, "
        f"DDIM {settings.get('steps')} steps, guidance {settings.get('guidance')}, weights sha256 "
        f"{settings.get('weights', '?')}…, the same noise for every row of a "
        f"seed; calibration: {settings.get('calib_samples')} captured sampler steps of 12 "
        "other classes and other noise. Values: mean ± std over the seeds. Models: `toy` is "
        "the shipped model, `toy+outliers` the same FP function with real-DiT-like "
        "activation outliers (clq_triton.toy.outliers). Scale modes (kernels.formats): gN = "
        "activation scale per token per N channels and two-level 4-bit weights, per-channel "
        "= one scale per token and per output channel. Hadamard block 64.",
        "",
        *summary_tables(rows),
        "",
        "## All rows",
        "",
        "| model | bits | scales | method | acc (all 3) | shape acc | PSNR vs FP (dB) | FD ↓ |"
        " calib s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(["FP", *VARIANTS])}
    keyed = sorted(rows.values(), key=lambda r: (r["model"], r["bits"] != "-", r["bits"],
                                                 r["mode"], order.get(r["method"], 99)))
    for r in keyed:
        s = summary(r)
        lines.append(f"| {r['model']} | {r['bits']} | {r['mode']} | {r['method']} | {s['acc']} "
                     f"| {s['shape']} | {s['psnr']} | {s['fd']} | {r['calib_s']:.0f} |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
