"""GPU probe of the rotate+quantize kernel's launch settings: for each Hadamard block and scale
mode, tile rows (BM), warps, persistent programs per column (in waves of the GPU's SMs) and,
for per-token scales, one launch per span or two per tile (``_split_spans``): the time on a
PixArt-sized input and the share of packed bytes equal to the PyTorch reference's on a small
one. Also the dot precision for block 128, and the path of CLQ's layers ("obs": a channel
shift and multiplier before the rotation, so the dots take float32 values: "tf32x2", the
shipped split into two tf32 parts, vs triton's tf32x3 and ieee), and the shipped plan with its
input gathered by a scattered permutation, by one of runs of 8 (CLQ(perm_run=8)'s) and read in order
(no permutation, or one folded away: clq_triton.fold).

    python bench/rotate_probe.py [bf16|fp32]     # on a CUDA machine; one JSON line per setting
    python bench/rotate_probe.py --summary probe.jsonl   # per (block, group): shipped vs best

Written after block 128 gave wrong codes on an H100 with triton 3.6 while the interpreter and
every CPU test agreed with the reference (bench/results/gpu-2026-11-27/); now for choosing the
launcher's settings (``rotate_quantize.plan``, ``_programs_per_column``) from measurements.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clq_triton.kernels import rotate_quantize as rq  # noqa: E402
from clq_triton.kernels._runtime import backend  # noqa: E402
from clq_triton.smoothing import outlier_permutation  # noqa: E402

ORIG_PLAN = rq.plan
ORIG_SPLIT = rq._split_spans
OVERRIDE: dict = {}


def plan(*args, **kwargs):
    """The launcher's plan with the OVERRIDE settings (BM, PREC, num_warps) applied."""
    p = ORIG_PLAN(*args, **kwargs)
    p = dict(p, constexprs=dict(p["constexprs"]))
    for key, value in OVERRIDE.items():
        if key == "num_warps":
            p["num_warps"] = value
        elif key not in ("waves", "split"):
            p["constexprs"][key] = value
    return p


def split_spans(programs, device):
    """OVERRIDE["split"] if set, else the shipped rule."""
    return OVERRIDE["split"] if "split" in OVERRIDE else ORIG_SPLIT(programs, device)


def programs_per_column(device):
    """Persistent programs along the rows: OVERRIDE["waves"] × the SMs (the shipped: 4)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == \
        "cuda" else 1
    return OVERRIDE.get("waves", 4) * sms


def settings(xdt):
    """(block, group, BM, warps, waves, precision, split, obs): the shipped plan (None = as
    shipped) and a grid around it; the dot precision only for block 128; per-token scales
    (group None) also with one launch per span and with two per tile; with ``obs`` a channel
    shift and multiplier first (CLQ's layers), shipped and per dot precision. The shipped
    settings and the CLQ path come first: the GPU session gives the probe a time limit."""
    pairs = list(itertools.product((None, 64, 128), (None, 64)))
    out = [(block, group, None, None, None, None, None, False) for block, group in pairs]
    for block, group in itertools.product((64, 128), (None, 64)):
        out += [(block, group, None, None, None, p, None, True)
                for p in (None, "tf32x3", "ieee")]
    # block 256 with float32 values: shipped with 8 warps (fewer spills), vs 4
    out += [(256, group, None, w, None, None, None, True) for group in (None, 64)
            for w in (None, 4)]
    precs = ("tf32", "tf32x3", "ieee") if xdt != torch.float32 else ("tf32x2", "tf32x3", "ieee")
    out += [(128, 64, None, None, None, p, None, False) for p in precs]
    for block, group in pairs:
        splits = (False, True) if group is None else (None,)
        out += [(block, group, bm, w, waves, None, sp, False) for bm in (16, 32, 64, 128)
                for w in (4, 8) for waves in (2, 4, 8) for sp in splits]
    return out


def main(dtype_name="bf16"):
    rq.plan = plan
    rq._programs_per_column = programs_per_column
    rq._split_spans = split_spans
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    xdt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    g = torch.Generator().manual_seed(0)
    m, k = (333, 1152) if dev == "cuda" else (37, 256)
    x = torch.randn(m, k, generator=g) * 2
    x[:, 5] *= 40
    x = x.to(xdt).to(dev)
    perm = torch.randperm(k, generator=g).to(dev)

    def obs_vectors(n, device):
        """A channel shift and multiplier as OBS makes them (float32 [n])."""
        gv = torch.Generator().manual_seed(1)
        return ((torch.randn(n, generator=gv) * 3).to(device),
                (torch.rand(n, generator=gv) * 4 + 0.25).to(device))

    sh, cs = obs_vectors(k, dev)
    # timing shape: PixArt's FFN input (4096 tokens × 4608), with an outlier-score permutation
    xt = torch.randn(4096, 4608, device=dev, dtype=xdt) if dev == "cuda" else None
    pt = torch.randperm(4608, device=dev) if dev == "cuda" else None
    sht, cst = obs_vectors(4608, dev) if dev == "cuda" else (None, None)
    if dev == "cuda":
        from triton.testing import do_bench

        y = torch.empty_like(xt)
        print(json.dumps(dict(dtype=dtype_name, copy_ms=do_bench(lambda: y.copy_(xt)),
                              gather_ms=do_bench(lambda: torch.index_select(xt, 1, pt)))),
              flush=True)
        # the shipped plan with the input gathered by a scattered permutation (CLQ's
        # default), by one of runs of 8 (CLQ(perm_run=8)'s: smoothing.outlier_permutation)
        # and in order (no permutation, or one folded into the producer: clq_triton.fold)
        runs = outlier_permutation(torch.rand(4608, generator=g), 64, run=8).to(dev)
        for block, group, obs in itertools.product((64, 128), (None, 64), (False, True)):
            vect = dict(channel_shift=sht, channel_scale=cst) if obs else {}
            ms = {name: do_bench(lambda p=p, r=r: rq.rotate_quantize(
                xt, p, block, group, 4, check_perm_values=False, perm_runs=r, **vect))
                for name, p, r in (("gather", pt, 1), ("runs", runs, 8), ("in_order", None, 1))}
            # the run path's loads, on this GPU, against the plain gather of the same perm
            q8, s8 = rq.rotate_quantize(xt, runs, block, group, 4, perm_runs=8, **vect)
            q1, s1 = rq.rotate_quantize(xt, runs, block, group, 4, perm_runs=1, **vect)
            same = bool(torch.equal(q8, q1) and torch.equal(s8.nan_to_num(-1), s1.nan_to_num(-1)))
            print(json.dumps(dict(dtype=dtype_name, hadamard_block=block, group=group, obs=obs,
                                  permutation_ms=ms, runs_equal_gather=same)), flush=True)
    refs = {}
    for block, group, bm, warps, waves, prec, split, obs in settings(xdt):
        vec = dict(channel_shift=sh, channel_scale=cs) if obs else {}
        vect = dict(channel_shift=sht, channel_scale=cst) if obs else {}
        if (block, group, obs) not in refs:
            with backend("torch"):
                refs[block, group, obs] = rq.rotate_quantize(x, perm, block, group, 4, **vec)
        qr, sr = refs[block, group, obs]
        OVERRIDE.clear()
        OVERRIDE.update({key: v for key, v in (("BM", bm), ("num_warps", warps),
                                               ("waves", waves), ("PREC", prec)) if v})
        if split is not None:
            OVERRIDE["split"] = split
        rq._launch_plan.cache_clear()  # its plans were made with the previous OVERRIDE
        row = dict(dtype=dtype_name, block=block, group=group, obs=obs, BM=bm, warps=warps,
                   waves=waves, prec=prec, split=split)
        try:
            q, s = rq.rotate_quantize(x, perm, block, group, 4, **vec)
            row["bytes_equal"] = round((q == qr).float().mean().item(), 5)
            row["scale_nan_mismatch"] = int((s.isnan() != sr.isnan()).sum())
            if dev == "cuda":
                row["ms_4096x4608"] = do_bench(lambda: rq.rotate_quantize(
                    xt, pt, block, group, 4, check_perm_values=False, **vect))
        except Exception as e:  # noqa: BLE001 - a setting that fails is a result
            row["error"] = repr(e)[:200]
        print(json.dumps(row), flush=True)


def summary(lines) -> list[str]:
    """Markdown: per (dtype, block, group, obs), the shipped setting's time, the fastest correct
    setting (≥ 99.9 % of bytes equal to the reference, no NaN mismatch) and, for per-token
    scales, the fastest with one launch per span and with two per tile."""
    rows = [json.loads(ln) for ln in lines if ln.startswith("{") and '"block"' in ln]
    ok = [r for r in rows if "ms_4096x4608" in r and r.get("bytes_equal", 0) >= 0.999
          and not r.get("scale_nan_mismatch")]
    out = ["| dtype | block | group | obs | shipped ms | best ms | best setting | one launch "
           "| two |", "|---|---|---|---|---|---|---|---|---|"]

    def key_of(r):
        return r["dtype"], r["block"], r["group"], r.get("obs", False)

    keys = list(dict.fromkeys(key_of(r) for r in rows))
    settings_of = ("BM", "warps", "waves", "prec", "split")
    for key in keys:
        mine = [r for r in ok if key_of(r) == key]
        shipped = [r for r in mine if all(r.get(k) is None for k in settings_of)]
        best = min(mine, key=lambda r: r["ms_4096x4608"], default=None)

        def fastest(split):
            t = [r["ms_4096x4608"] for r in mine if r.get("split") is split]
            return f"{min(t):.3f}" if t else ""

        out.append("| " + " | ".join(str(v) for v in key) + " | "
                   + (f"{shipped[0]['ms_4096x4608']:.3f}" if shipped else "") + " | "
                   + (f"{best['ms_4096x4608']:.3f}" if best else "") + " | "
                   + (", ".join(f"{k}={best.get(k)}" for k in settings_of
                                if best.get(k) is not None) if best else "")
                   + f" | {fastest(False)} | {fastest(True)} |")
    bad = [r for r in rows if r.get("error") or r.get("bytes_equal", 1) < 0.999
           or r.get("scale_nan_mismatch")]
    out.append(f"\n{len(rows)} settings, {len(ok)} timed and correct, {len(bad)} failed or "
               "wrong")
    perm = [json.loads(ln) for ln in lines if '"permutation_ms"' in ln]
    if perm:
        out += ["", "| dtype | block | group | obs | scattered ms | runs of 8 ms | in order ms "
                "| scattered / in order | runs / in order |", "|---" * 9 + "|"]
        for r in perm:
            t = r["permutation_ms"]
            g, u, o = t["gather"], t["runs"], t["in_order"]
            out.append(f"| {r['dtype']} | {r['hadamard_block']} | {r['group']} | {r['obs']} | "
                       f"{g:.3f} | {u:.3f} | {o:.3f} | {g / o:.2f}× | {u / o:.2f}× |")
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:
        with open(sys.argv[2]) as f:
            print("\n".join(summary(f.readlines())))
    else:
        main(*sys.argv[1:])
