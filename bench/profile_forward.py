"""Where a quantized DiT forward spends its time: a PixArt-Σ-sized and a FLUX-sized
transformer, bf16 vs W4A4 vs W8A8, eager and replayed from a CUDA graph.

    python bench/profile_forward.py                        # CUDA: both models, FLUX as a slice
    python bench/profile_forward.py --flux-blocks 19       # the whole FLUX.1 (19 + 38 blocks)
    python bench/profile_forward.py --smoke                # tiny models on the CPU (the tests)

Per (model, mode), from random weights (data-free Hadamard quantization, per-channel scales;
``-g64`` = group 64, QuantConfig's default; ``w4a4-int8`` = W4A4 with ``use_int8_operands``;
``w4a4-clq`` = CLQ's layer structure
(random permutation, channel shift and multiplier per layer, ``bench_utils.clq_layers``) with
the MLPs' permutations folded as ``patch`` folds them, ``-runs`` with permutations of runs of
8 channels (``CLQ(perm_run=8)``: 16-byte loads), ``-unfolded`` without the fold (every layer
gathers its input); ``-fused`` = projections fused first,
``fuse_projections``, bf16 too): ms per forward eager and replayed from a CUDA
graph (``torch.cuda.graph``), per block too; GPU time by op family from torch.profiler
(activation pass, quantized GEMM, bf16 GEMM, attention, other); kernel launches per forward;
host time per quantized layer call (the two custom operators' CPU time) and per nn.Linear
call; peak forward memory and resident weight memory; output error vs bf16; speed ratios
against bf16 fused the same way. The FLUX-sized
model is batch 2 (a CFG pair), 4096 image + 512 text tokens, ``--flux-blocks`` double-stream
blocks and twice as many single-stream ones (default 2 + 4: per-block figures scale to 19 + 38).
Writes ``<out>/profile-<device>-<date>.json`` and ``.md``. On CPU (``--smoke``) the families
are operators' self CPU time, not kernels: the smoke run only proves the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_utils, gpu_check

import torch  # noqa: E402

import clq_triton  # noqa: E402
from bench_utils import clq_layers, flux_model, pixart_model  # noqa: E402
from gpu_check import env_info  # noqa: E402
from clq_triton.fuse import fuse_projections  # noqa: E402

# (family, substrings of kernel / operator names), first match wins
FAMILIES = (
    ("activation pass", ("rotate_quantize",)),
    ("quantized GEMM", ("quant_matmul",)),
    ("attention", ("flash", "fmha", "sdpa", "attention", "softmax")),
    ("bf16 GEMM", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "addmm", "aten::mm",
                   "aten::bmm", "aten::matmul", "aten::linear")),
)
MODES = ("bf16", "w4a4", "w8a8", "w4a4-g64", "w4a4-clq", "w4a4-clq-runs", "w4a4-clq-unfolded",
         "bf16-fused", "w4a4-fused", "w8a8-fused", "w4a4-int8")


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def build(name: str, mode: str, cuda: bool, flux_blocks: int):
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if name == "pixart":
        model, inputs = pixart_model(cuda, device, dtype)
        blocks = 28 if cuda else 2
    else:
        model, inputs = flux_model(cuda, device, dtype, blocks=flux_blocks)
        blocks = 3 * flux_blocks if cuda else 3
    bits, *flags = mode.split("-")
    if "fused" in flags:  # the same fusion for bf16, so the two compare like for like
        fuse_projections(model)
    group = 64 if "g64" in flags else None  # per channel unless -g64 (QuantConfig's default)
    config = clq_triton.QuantConfig.from_bits(bits, group_size=group) if bits != "bf16" else None
    if "clq" in flags:
        clq_layers(model, config, fold="unfolded" not in flags,
                   perm_run=8 if "runs" in flags else 1)
    elif config is not None:
        clq_triton.patch(model, config, progress=False)
        if "int8" in flags:
            clq_triton.use_int8_operands(model)
    return model, inputs, blocks


def resident_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def timed_ms(fn, cuda: bool, reps: int) -> float:
    """Median ms per call of ``fn`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def _device_us(evt) -> float:
    for attr in ("device_time_total", "cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def profile(forward, cuda: bool) -> dict:
    """One profiled forward: GPU (CPU) time by family, launches, host time per call."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=acts) as prof:
        forward()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    by_family: dict[str, float] = {}
    launches = 0
    if cuda:
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                launches += 1
                by_family[family(e.name)] = by_family.get(family(e.name), 0.0) + _device_us(e)
    else:
        for ka in prof.key_averages():
            fam = family(ka.key)
            by_family[fam] = by_family.get(fam, 0.0) + float(ka.self_cpu_time_total)
    ops = {}
    for e in events:
        if e.name in ("clq_triton::rotate_quantize", "clq_triton::quant_matmul", "aten::linear"):
            n, us = ops.get(e.name, (0, 0.0))
            ops[e.name] = (n + 1, us + float(e.cpu_time_total))
    rq, qm = (ops.get(k, (0, 0.0)) for k in ("clq_triton::rotate_quantize",
                                               "clq_triton::quant_matmul"))
    lin = ops.get("aten::linear", (0, 0.0))
    return dict(
        family_ms={k: round(v / 1e3, 3) for k, v in sorted(by_family.items())},
        launches=launches if cuda else None,
        quant_calls=rq[0],
        host_us_per_quant_call=round((rq[1] + qm[1]) / rq[0], 1) if rq[0] else None,
        linear_calls=lin[0],
        host_us_per_linear_call=round(lin[1] / lin[0], 1) if lin[0] else None)


def graph_ms(forward, cuda: bool, reps: int):
    """ms per forward replayed from a CUDA graph (static inputs), and the replay's output."""
    if not cuda:
        return None, None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward()
    graph.replay()
    torch.cuda.synchronize()
    return timed_ms(graph.replay, True, reps), out


def measure(name: str, mode: str, args, cuda: bool, ref) -> dict:
    model, inputs, blocks = build(name, mode, cuda, args.flux_blocks)
    if cuda:
        torch.cuda.empty_cache()
    row = dict(model=name, mode=mode, blocks=blocks, resident_mib=round(
        resident_bytes(model) / 2**20, 1))

    def forward():
        return model(**inputs).sample

    with torch.no_grad():
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        out = forward().float()
        if cuda:
            torch.cuda.synchronize()
            row["peak_forward_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        if ref is not None:
            row["rel_err_vs_bf16"] = round(float((out - ref).norm() / ref.norm()), 4)
        row["eager_ms"] = round(timed_ms(forward, cuda, args.reps), 3)
        row.update(profile(forward, cuda))
        try:
            g_ms, _ = graph_ms(forward, cuda, args.reps)
            row["graph_ms"] = round(g_ms, 3) if g_ms is not None else None
        except Exception as e:  # noqa: BLE001 - a capture failure is a finding, not a crash
            row["graph_error"] = repr(e)[:300]
    row["eager_ms_per_block"] = round(row["eager_ms"] / blocks, 3)
    if row.get("graph_ms"):
        row["graph_ms_per_block"] = round(row["graph_ms"] / blocks, 3)
    return row, out


def write(out_dir: str, info: dict, rows: list[dict]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    dev = info["device"].split(" (")[0].replace(" ", "-")
    stem = os.path.join(out_dir, f"profile-{dev}-{info['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(env=info, rows=rows), f, indent=1)
    fams = sorted({k for r in rows for k in r.get("family_ms", {})})
    lines = [f"# Forward profile: {info['device']}, {info['date']}", "",
             f"torch {info['torch']}, triton {info['triton']}, commit {info['commit']}; "
             "`python bench/profile_forward.py " + " ".join(sys.argv[1:]) + "`", "",
             "| model | mode | blocks | eager ms | vs bf16 | graph ms | vs bf16 | "
             + " | ".join(f"{f} ms" for f in fams)
             + " | launches | host µs / quant call | host µs / nn.Linear | peak MiB | "
               "resident MiB | rel. err |",
             "|---" * (13 + len(fams)) + "|"]
    base = {(r["model"], r["mode"] == "bf16-fused"): r for r in rows
            if r["mode"] in ("bf16", "bf16-fused") and "error" not in r}

    def ratio(r, key):  # against bf16 fused the same way (unfused bf16 if that is missing)
        fused = "fused" in r["mode"]
        b = base.get((r["model"], fused), base.get((r["model"], False), {})).get(key)
        return f"{b / r[key]:.2f}×" if b and r.get(key) else ""

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | error: {r['error'][:120]} |")
            continue
        cells = [r["model"], r["mode"], r["blocks"], r["eager_ms"], ratio(r, "eager_ms"),
                 r.get("graph_ms", r.get("graph_error", "")), ratio(r, "graph_ms"),
                 *[r["family_ms"].get(f, 0) for f in fams], r.get("launches"),
                 r.get("host_us_per_quant_call"), r.get("host_us_per_linear_call"),
                 r.get("peak_forward_mib"), r["resident_mib"], r.get("rel_err_vs_bf16", "")]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="pixart,flux")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--flux-blocks", type=int, default=2,
                    help="FLUX double-stream blocks (single-stream: twice as many); 19 = FLUX.1")
    ap.add_argument("--reps", type=int, default=10, help="timed forwards per measurement")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; later rows skip")
    ap.add_argument("--smoke", action="store_true", help="tiny models, CPU allowed")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the tiny CPU models")
    if args.smoke:
        args.reps = min(args.reps, 2)
    info = env_info("cuda" if cuda else "cpu")
    print(json.dumps(info), flush=True)
    rows, t0 = [], time.perf_counter()
    refs = {}  # model → its bf16 output
    # modes outside, models inside: a spent budget drops the last modes of every model
    for mode in args.modes.split(","):
        for name in args.models.split(","):
            if time.perf_counter() - t0 > args.budget:
                rows.append(dict(model=name, mode=mode, error="time budget spent"))
                continue
            try:
                row, out = measure(name, mode, args, cuda, refs.get(name))
                if mode == "bf16":
                    refs[name] = out
            except Exception as e:  # noqa: BLE001 - record it, go on with the rest
                row = dict(model=name, mode=mode, error=repr(e)[:600],
                           tb=traceback.format_exc()[-1500:])
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args.out, info, rows)  # after each row: a session's time limit may stop it
            if cuda:
                torch.cuda.empty_cache()
    stem = write(args.out, info, rows)
    print(f"wrote {stem}.md and .json")
    return 1 if any("error" in r and "budget" not in r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
