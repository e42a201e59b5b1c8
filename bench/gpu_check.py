"""One-shot GPU check: are the compiled kernels right, and how fast are they?

    python bench/gpu_check.py                   # on a CUDA machine, about 3-5 minutes
    python bench/gpu_check.py --autotune        # also: shipped table vs autotuned configs
    TRITON_INTERPRET=1 python bench/gpu_check.py --smoke   # tiny shapes on CPU (CI runs this)

Sections (each logs a JSON line as it finishes; a failing section is recorded and the rest
go on; sections are skipped once --budget seconds have passed):
1. correctness: rotate+quantize and the GEMM (every scale mode and bit width) and
   QuantLinear, compiled kernels vs their PyTorch references;
2. GEMM table at M = 4096: W4A4 / W4A8 / W8A8 per channel, group 128 and group 64 vs
   torch bf16, FP8 ``torch._scaled_mm`` (row-wise) and INT8 ``torch._int_mm``; first-call times;
3. rotate+quantize GB/s vs a copy;
4. QuantLinear vs nn.Linear;
5. a PixArt-Σ-sized transformer (28 blocks, hidden 1152, 4096 image tokens, random weights):
   FP bf16 vs W4A4 / W8A8, time, peak memory, first-call time, output error;
6. CLQ calibration of that transformer on the GPU: wall time and peak memory.
Section 3 also times QuaRot's Hadamard block for each K (512 … 4096: the outer factor).
Sections 1, 4 and 5 also run 4-bit layers with int8 operands (``use_int8_operands``).
Writes ``<out>/gpu-check-<device>-<date>.json`` and ``.md`` (device, versions, commit).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_utils

import torch  # noqa: E402
from torch import nn  # noqa: E402

LOG: list[dict] = []
T0 = time.perf_counter()


def log(**row):
    row["t"] = round(time.perf_counter() - T0, 1)
    LOG.append(row)
    print(json.dumps(row), flush=True)


def section(name, budget):
    def deco(fn):
        def run(*a, **k):
            if time.perf_counter() - T0 > budget:
                log(section=name, skipped="time budget spent")
                return None
            try:
                return fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - record it, go on with the rest
                log(section=name, error=repr(e)[:600], tb=traceback.format_exc()[-1500:])
                return None
        return run
    return deco


def timer(cuda: bool, smoke: bool = False):
    """ms per call: triton's do_bench on CUDA, a median of perf_counter runs elsewhere (one
    run, without a warm-up call, in --smoke mode: its figures mean nothing)."""
    if cuda:
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50)

    def cpu_ms(fn):
        if not smoke:
            fn()
        runs = []
        for _ in range(1 if smoke else 3):
            t = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t) * 1e3)
        return statistics.median(runs)
    return cpu_ms


def first_call_s(fn, cuda):
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return round(time.perf_counter() - t, 3)


def env_info(device):
    import triton

    import clq_triton
    from clq_triton.kernels import tuning

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    info = dict(date=datetime.date.today().isoformat(), python=platform.python_version(),
                torch=torch.__version__, triton=triton.__version__,
                clq_triton=clq_triton.__version__, commit=commit + ("+dirty" if dirty else ""),
                autotune=tuning.autotune_enabled())
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(), sms=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}")
    else:
        info.update(device="cpu (Triton interpreter)" if os.environ.get("TRITON_INTERPRET")
                    else "cpu (PyTorch references)")
    return info


MODES = ((4, 4, None), (4, 4, 128), (4, 4, 64), (4, 8, None), (4, 8, 128), (8, 8, None),
         (8, 8, 128))  # (w_bits, a_bits, group)


SECTIONS = ("correctness", "gemm", "rotate", "linear", "pixart", "calibration")


def mode_name(w, a, g):
    return f"w{w}a{a}-" + (f"g{g}" if g else "pc")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--budget", type=float, default=270.0, help="seconds; later sections skip")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU allowed")
    ap.add_argument("--autotune", action="store_true",
                    help="also compare the shipped config table with autotuned configs")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--shapes", default=None,
                    help="comma-separated indices into the GEMM shapes (gemm/rotate/linear)")
    ap.add_argument("--modes", default=None,
                    help="comma-separated GEMM modes, e.g. w4a4-pc,w8a8-g128 (gemm/linear)")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32",
                    help="input dtypes of the rotate+quantize correctness checks on CUDA")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        ap.error("no CUDA device: use --smoke for a dry run on CPU")
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32

    from clq_triton import QuantConfig, QuantLinear, patch, use_int8_operands
    from clq_triton.kernels import tuning
    from clq_triton.kernels._runtime import backend
    from clq_triton.kernels.gemm import quant_matmul
    from clq_triton.kernels.quantize import quantize_ref, quantize_weight_ref
    from clq_triton.kernels.formats import pack_codes
    from clq_triton.kernels.rotate_quantize import rotate_quantize
    from clq_triton.methods import fit_hadamard_block

    ms = timer(cuda, args.smoke)
    info = env_info(dev)
    log(section="env", **info)
    m_big = 4096 if not args.smoke else 64
    gemm_shapes = ([(m_big, 1152, 4608), (m_big, 4608, 1152), (m_big, 3072, 12288),
                    (m_big, 12288, 3072)] if not args.smoke else [(64, 256, 128)])
    if args.shapes is not None:
        gemm_shapes = [gemm_shapes[int(i)] for i in args.shapes.split(",")]
    modes = MODES if args.modes is None else tuple(
        m for m in MODES if mode_name(*m) in args.modes.split(","))
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    rotate_dtypes = [dtypes[d] for d in args.dtypes.split(",")] if cuda else [dtype]
    sec = lambda name: section(name, args.budget)  # noqa: E731

    @sec("correctness")
    def correctness():
        g = torch.Generator(device="cpu").manual_seed(0)
        m, k, n = (333, 1152, 640) if not args.smoke else (37, 256, 48)

        def rotate_vs_reference(op, x, perm, block, group, bits, **vectors):
            """The kernel's codes and scales against the PyTorch reference's, logged."""
            q, s = rotate_quantize(x, perm, block, group, bits, **vectors)
            with backend("torch"):
                qr, sr = rotate_quantize(x, perm, block, group, bits, **vectors)
            nan_mismatch = (s.isnan() != sr.isnan()).sum().item()  # NaN vs a number
            rel = ((s - sr).abs() / sr.abs().clamp_min(1e-30))[~(s.isnan() & sr.isnan())]
            log(section="correctness", op=op, dtype=str(x.dtype)[6:], block=block, group=group,
                bits=bits, bytes_equal=round((q == qr).float().mean().item(), 5),
                scale_max_rel=float(rel.max()) if rel.numel() else 0.0,
                scale_nan_mismatch=nan_mismatch)

        for xdt in rotate_dtypes:
            x = (torch.randn(m, k, generator=g) * 2)
            x[:, 5] *= 40  # an outlier channel
            x = x.to(xdt).to(dev)
            perm = torch.randperm(k, generator=g).to(dev)
            for block in (None, 16, 64, 128, 256 if k % 256 == 0 else 128, 512 if k % 512 == 0
                          else 64):
                for group in (None, 64, 128):
                    for bits in (4, 8):
                        rotate_vs_reference("rotate_quantize", x, perm, block, group, bits)
            # OBS's per-channel shift and multiplier, fused in the kernel
            shift = (torch.randn(k, generator=g) * 8).to(dev)
            cs = (torch.rand(k, generator=g) + 0.5).to(dev)
            for block in (64, 256 if k % 256 == 0 else 128):
                rotate_vs_reference("rotate_quantize+shift+scale", x, perm, block, 64, 4,
                                    channel_shift=shift, channel_scale=cs)
        x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g)
        bias = torch.randn(n, generator=g)
        for wb, ab, group in MODES:
            xc, xs = quantize_ref(x, group, ab)
            wc, ws, wz = quantize_weight_ref(w, group, wb)
            ops = [t.to(dev) if t is not None else None
                   for t in (pack_codes(xc, ab), xs, pack_codes(wc, wb), ws, wz, bias)]
            y = quant_matmul(*ops, ab, wb, group, torch.float32)
            with backend("torch"):
                yr = quant_matmul(*[o.cpu() if o is not None else None for o in ops], ab, wb,
                                  group, torch.float32)
            log(section="correctness", op="quant_matmul", mode=mode_name(wb, ab, group),
                max_rel=float((y.cpu() - yr).abs().max() / yr.abs().max()))
        lin = nn.Linear(k, n).to(dev, dtype)
        xx = torch.randn(m, k, generator=g).to(dev, dtype)
        for wb, ab, group in MODES:
            ql = QuantLinear.from_linear(lin, QuantConfig(w_bits=wb, a_bits=ab, group_size=group,
                                                          hadamard_block=64),
                                         perm=torch.randperm(k, generator=g).to(dev))
            with torch.no_grad():
                y = ql(xx).float()
                with backend("torch"):
                    yr = ql(xx).float()
                ref = lin(xx).float()
                # int8 operands: the W8A8 kernel on unpacked 4-bit codes, the same sums
                y8 = ql.use_int8_operands()(xx).float() if 4 in (wb, ab) else y
            log(section="correctness", op="QuantLinear", mode=mode_name(wb, ab, group),
                triton_vs_torch=float((y - yr).norm() / yr.norm()),
                vs_fp=float((y - ref).norm() / ref.norm()),
                int8_operands_equal=bool(torch.equal(y8, y)))

    @sec("gemm")
    def gemm():
        for m, k, n in gemm_shapes:
            flop = 2 * m * n * k
            x = torch.randn(m, k, device=dev, dtype=dtype)
            w = torch.randn(n, k, device=dev, dtype=dtype)
            row = dict(section="gemm", M=m, K=k, N=n, bf16_ms=ms(lambda: x @ w.T))
            if cuda and torch.cuda.get_device_capability() >= (8, 9):
                a8 = x.to(torch.float8_e4m3fn)
                b8 = w.to(torch.float8_e4m3fn).T
                sa = torch.rand(m, 1, device=dev)
                sb = torch.rand(1, n, device=dev)
                row["fp8_scaled_mm_ms"] = ms(lambda: torch._scaled_mm(
                    a8, b8, sa, sb, out_dtype=torch.bfloat16))
            try:
                ai = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
                bi = torch.randint(-127, 128, (k, n), device=dev, dtype=torch.int8)
                row["int_mm_ms"] = ms(lambda: torch._int_mm(ai, bi))
            except RuntimeError as e:
                row["int_mm_error"] = str(e)[:100]
            for wb, ab, group in modes:
                xc, xs = quantize_ref(torch.randn(m, k, device=dev), group, ab)
                wc, ws, wz = quantize_weight_ref(torch.randn(n, k, device=dev), group, wb)
                xq, wq = pack_codes(xc, ab), pack_codes(wc, wb)
                fn = lambda: quant_matmul(xq, xs, wq, ws, wz, None, ab, wb, group, dtype)  # noqa
                name = mode_name(wb, ab, group)
                row[f"{name}_first_s"] = first_call_s(fn, cuda)
                row[f"{name}_ms"] = ms(fn)
                if args.autotune and cuda:
                    tuning.set_autotune(True)
                    try:
                        first_call_s(fn, cuda)  # tunes this shape
                        row[f"{name}_autotuned_ms"] = ms(fn)
                        row[f"{name}_autotuned_cfg"] = tuned_cfg(m, n, k, ab, wb, group)
                    finally:
                        tuning.set_autotune(False)
            if cuda:
                row["table_cfg"] = str(tuning.table_config(tuning.device_arch(x.device), m))
            for key in [k_ for k_ in row if k_.endswith("_ms")]:
                row[key[:-3] + "_tops"] = round(flop / row[key] / 1e9, 1)
                row[key[:-3] + "_x_bf16"] = round(row["bf16_ms"] / row[key], 3)
            log(**row)

    @sec("rotate")
    def rotate():
        for m, k in sorted({(m, k) for m, k, _ in gemm_shapes}):
            x = torch.randn(m, k, device=dev, dtype=dtype)
            y = torch.empty_like(x)
            copy_ms = ms(lambda: y.copy_(x))
            row = dict(section="rotate", M=m, K=k,
                       copy_GBps=round(2 * x.numel() * x.element_size() / copy_ms / 1e6, 1))
            perm = torch.randperm(k, device=dev)
            quarot = fit_hadamard_block(k, 1 << (k.bit_length() - 1))  # QuaRot's block for K
            for block in (None, 64, 128) + ((quarot,) if quarot > 128 else ()):
                for group in (None, 128, 64):
                    fn = lambda: rotate_quantize(x, perm, block, group, 4)  # noqa: E731
                    t = ms(fn)
                    moved = x.numel() * x.element_size() + x.numel() // 2 + \
                        m * (k // group if group else 1) * 4
                    key = f"H{block or 0}-{'g%d' % group if group else 'pc'}"
                    row[f"{key}_GBps"] = round(moved / t / 1e6, 1)
                    row[f"{key}_of_copy"] = round(row[f"{key}_GBps"] / row["copy_GBps"], 3)
            log(**row)

    @sec("linear")
    def linear():
        for m, k, n in gemm_shapes:
            lin = nn.Linear(k, n).to(dev, dtype)
            x = torch.randn(m, k, device=dev, dtype=dtype)
            with torch.no_grad():
                row = dict(section="linear", M=m, K=k, N=n, linear_ms=ms(lambda: lin(x)))
                for wb, ab, group in modes:
                    ql = QuantLinear.from_linear(lin, QuantConfig(
                        w_bits=wb, a_bits=ab, group_size=group, hadamard_block=128))
                    for suffix in ("", "-int8") if 4 in (wb, ab) else ("",):
                        ql.use_int8_operands(suffix == "-int8")
                        name = mode_name(wb, ab, group) + suffix
                        row[f"{name}_ms"] = ms(lambda: ql(x))
                        row[f"{name}_x_linear"] = round(row["linear_ms"] / row[f"{name}_ms"], 3)
            log(**row)

    @sec("pixart")
    def pixart():
        from bench_utils import pixart_model

        fp, inputs = pixart_model(not args.smoke, dev, dtype)
        side = inputs["hidden_states"].shape[-1]

        def measure(model, name):
            with torch.no_grad():
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                outs = []
                first = first_call_s(lambda: outs.append(model(**inputs)[0].float()), cuda)
                # --smoke: that one forward stands for the timing too (its figures mean nothing)
                t = first * 1e3 if args.smoke else ms(lambda: model(**inputs))
                out = outs[0] if args.smoke else model(**inputs)[0].float()
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
            return out, dict(name=name, ms=t, first_call_s=first, peak_MiB=peak)

        ref, row = measure(fp, "fp")
        log(section="pixart", tokens=(side // 2) ** 2, blocks=len(fp.transformer_blocks), **row)
        import copy

        def obs_shaped(q, report):
            """Re-quantize the layers that patch() quantized in ``q`` shaped like CLQ's: a
            permutation, a channel multiplier and a shift before the rotation, so the
            rotation's dots take float32 values (random transforms: time and memory; the
            error is not CLQ's)."""
            g = torch.Generator().manual_seed(0)
            for name in report.quantized:
                k, config = q.get_submodule(name).in_features, q.get_submodule(name).config
                q.set_submodule(name, QuantLinear.from_linear(
                    fp.get_submodule(name), config, perm=torch.randperm(k, generator=g).to(dev),
                    channel_scale=(torch.rand(k, generator=g) + 0.5).to(dev),
                    channel_shift=(torch.randn(k, generator=g) * 0.1).to(dev)))

        # (bits, group, int8 operands, CLQ-shaped layers); data-free patch() otherwise
        for bits, group, int8, obs in (("w4a4", None, False, False), ("w4a4", None, True, False),
                                       ("w4a4", 128, False, False), ("w4a4", 128, True, False),
                                       ("w8a8", None, False, False), ("w4a4", None, False, True),
                                       ("w4a4", None, True, True), ("w4a4", 128, False, True)):
            q = copy.deepcopy(fp)
            report = patch(q, QuantConfig.from_bits(bits, group_size=group), progress=False)
            if obs:
                obs_shaped(q, report)
            if int8:
                use_int8_operands(q)
            out, r = measure(q, f"{bits}-{'g%d' % group if group else 'pc'}"
                             + ("-obs" if obs else "") + ("-int8" if int8 else ""))
            r["x_fp"] = round(row["ms"] / r["ms"], 3)
            r["rel_err_vs_fp"] = float((out - ref).norm() / ref.norm())
            if not obs:  # the re-quantized layers also hold the channel vectors
                r["weight_ratio"] = round(report.weight_ratio, 4)
            log(section="pixart", **r)
            del q

    @sec("calibration")
    def calibration():
        """CLQ calibration of the PixArt-Σ-sized transformer on the GPU (2 samples, a 2 × 2
        clip grid): wall time and peak GPU memory."""
        from bench_utils import pixart_model

        from clq_triton import CLQ, CalibrationData

        model, inputs = pixart_model(not args.smoke, dev, dtype)
        blocks = len(model.transformer_blocks)
        data = CalibrationData.from_inputs([
            {**inputs, "timestep": torch.tensor([t], device=dev)} for t in (999, 400)])
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        grid = (1.0,) if args.smoke else (1.0, 0.9)  # smoke: one candidate, the same code
        report = patch(model, "w4a4", CLQ(w_clip_grid=grid, a_clip_grid=grid), data,
                       progress=False)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        log(section="calibration", method=f"clq w4a4, grid {len(grid)}x{len(grid)}",
            blocks=blocks, samples=len(data),
            tokens=inputs["hidden_states"].shape[-1] ** 2 // 4, layers=len(report.quantized),
            seconds=round(seconds, 2), s_per_block=round(seconds / blocks, 3),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
            fp_weights_gib=round(weights / 2**30, 3))

    def tuned_cfg(m, n, k, a_bits, w_bits, group):
        """The autotuner's pick for one GEMM (from its per-GPU cache)."""
        d = torch.device(dev, torch.cuda.current_device())
        key = tuning.autotune_key(tuning.device_arch(d), w_bits, a_bits, group, m, n, k)
        return str(tuning.tuned_configs(d).get(key))

    steps = dict(correctness=correctness, gemm=gemm, rotate=rotate, linear=linear, pixart=pixart,
                 calibration=calibration)
    for name in sections:  # the files after each section: a session's time limit may stop it
        steps[name]()
        write(args.out, info)


def write(out_dir, info):
    os.makedirs(out_dir, exist_ok=True)
    name = "".join(c if c.isalnum() else "-" for c in info["device"]).strip("-").lower()
    stem = os.path.join(out_dir, f"gpu-check-{name}-{info['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(LOG, f, indent=1)
    lines = [f"# GPU check: {info['device']}, {info['date']}", "",
             "Made by `python bench/gpu_check.py`; raw rows in the JSON beside this file.", "",
             "| " + " | ".join(f"{k}: {v}" for k, v in info.items()) + " |", ""]
    for sec_name in SECTIONS:
        rows = [r for r in LOG if r.get("section") == sec_name]
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("section", "t")))
        lines += [f"## {sec_name}", "", "| " + " | ".join(keys) + " |",
                  "|" + "---|" * len(keys)]
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
        lines.append("")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    out_env = os.environ.get("OUT")
    if out_env and os.path.isdir(out_env) and os.path.abspath(out_env) != os.path.abspath(out_dir):
        for ext in (".json", ".md"):
            with open(stem + ext) as src, open(os.path.join(out_env, os.path.basename(stem) + ext),
                                               "w") as dst:
                dst.write(src.read())
    print(f"wrote {stem}.json and .md", flush=True)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


if __name__ == "__main__":
    main()
