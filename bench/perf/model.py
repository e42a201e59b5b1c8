"""A static performance model of the quantized forward, from the compiled kernels (no GPU).

    python bench/perf/model.py                     # sm_90 + sm_89, writes bench/results/perf-model-DATE.md
    python bench/perf/model.py --arch 90 --sets pixart --modes w4a4-g64
    python bench/perf/model.py --validate          # the kernels as built now vs a measured run
    PYTHONPATH=/path/to/triton36 python bench/perf/model.py ...   # under another triton

Every GEMM launch of a forward (``shapes.py``: PixArt-Σ-, FLUX- and Wan-2.1-sized) is compiled
with the launcher's own table config (``tuning.fitted_table_config``) for a real target and
assembled with the ptxas triton bundles; the SASS gives registers, shared memory and the
K loop (``clq_triton.kernels.sass.tensor_loop``: found from the branches, no block indices).
Per GEMM: CTAs per SM (registers, shared memory, warps), tiles and waves, DRAM bytes, warp
instructions per 64×128×32 tensor-core instruction's worth of MACs, and three bounds — memory
(DRAM bytes / bandwidth), tensor (MACs at the int8 rate, wave-quantized), issue (instructions
at ``IPC`` per scheduler) — and a predicted time: each K step of a CTA issues its
instructions and then waits for its MMAs (the loop waits on every wgmma), CTAs resident on one
SM overlap each other, so a wave's step takes max(c·issue, c·mma, issue + mma) for c CTAs.
The activation pass is not modelled from its SASS yet: its DRAM bound times a factor
calibrated on the last measured run (``CALIBRATION``). Per forward: the GEMMs and activation
passes predicted, attention and the rest as measured in bf16 on the H200 (PixArt, FLUX;
scaled by bf16 rate and bandwidth for sm_89) or estimated (Wan), against bf16 with CUDA graphs (measured; Wan estimated). **Every figure is a
prediction**, except those marked measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import shapes  # noqa: E402

# Per arch: the machine the figures are for. sm_90: the H200 measured on 2026-12-04
# (bench/results/h200-2026-12-04): max SM clock, copy bandwidth, cuBLAS bf16 rate in the
# PixArt-sized forward; int8 MACs per clock per SM from the H100/H200 datasheet rate.
# sm_89: an L40S from its datasheet (not measured here).
GPUS = {
    90: dict(name="H200", sms=132, clock=1.98e9, dram=3.85e12, int8_macs=4096,
             bf16_flops=717e12, bf16_peak=989e12, regs=65536, smem=233472, max_threads=2048),
    89: dict(name="L40S (datasheet)", sms=142, clock=2.52e9, dram=0.864e12, int8_macs=1024,
             bf16_flops=0.7 * 362e12, bf16_peak=362e12, regs=65536, smem=101376,
             max_threads=1536),
}
# Fitted by --validate on the kernels of 98f3547 under triton 3.6 against the H200's GEMMs of
# 2026-12-04: an unpack-bound K loop issued 0.42-0.55 instructions per clock per scheduler
# (W4A4), and the int8 MMAs of a tensor-bound loop (W8A8, FLUX shapes) ran at ~74 % of peak.
IPC = 0.5
TENSOR_EFFICIENCY = 0.74
# Measured on the H200, 2026-12-04, triton 3.6 (profile_forward, CUDA graphs): ms per forward
# of the ops the model does not predict and of the bf16 forward (run 1), and of the activation
# pass per scale mode (run 2: per token "pc", group 64 "g64"), which calibrates its factor.
MEASURED = {
    "pixart": dict(attention=6.338, other=4.543, bf16_graph=18.144,
                   activation_pass=dict(pc=6.828, g64=3.544)),
    "flux": dict(attention=4.945, other=14.589, bf16_graph=36.276,
                 activation_pass=dict(pc=10.327, g64=2.921)),
}
MODES = {"w4a4-pc": (4, 4, None), "w4a4-g64": (4, 4, 64), "w8a8-pc": (8, 8, None)}


def occupancy(gpu: dict, regs: int, shared: int, warps: int) -> int:
    """CTAs per SM: registers (allocated per warp, rounded up to 8 per thread), shared memory
    (1 KB reserved per CTA) and threads."""
    per_cta = math.ceil(regs / 8) * 8 * 32 * warps
    return max(1, min(gpu["regs"] // per_cta, gpu["smem"] // (shared + 1024),
                      gpu["max_threads"] // (32 * warps)))


def gemm_bytes(m, k, n, a_bits, w_bits, group) -> int:
    groups = k // group if group else 1
    return (m * k * a_bits // 8 + n * k * w_bits // 8 + m * groups * 4 + n * 4
            + (n * groups if group and w_bits == 4 else 0) + m * n * 2 + n * 4)


def predict_gemm(gpu, r, cfg, m, k, n, a_bits, w_bits, group, ipc=IPC) -> dict:
    """Bounds and predicted µs of one GEMM launch (``r``: its compile_check Result)."""
    ctas = occupancy(gpu, r.registers, r.shared, cfg.num_warps)
    tiles = math.ceil(m / cfg.BM) * math.ceil(n / cfg.BN)
    waves = math.ceil(tiles / (gpu["sms"] * ctas))
    steps = k // cfg.BK
    issue = r.loop_instructions * cfg.num_warps / 4 / ipc  # clocks per K step of one CTA
    mma = cfg.BM * cfg.BN * cfg.BK / gpu["int8_macs"] / TENSOR_EFFICIENCY
    step = max(ctas * issue, ctas * mma, issue + mma)
    us = lambda clocks: clocks / gpu["clock"] * 1e6  # noqa: E731
    mem = gemm_bytes(m, k, n, a_bits, w_bits, group) / gpu["dram"] * 1e6
    loop = us(waves * steps * step)
    return dict(ctas_per_sm=ctas, tiles=tiles, waves=waves,
                per_gmma=round(r.per_gmma, 1) if r.per_gmma else None,
                mem_us=mem, tensor_us=us(waves * ctas * steps * mma),
                issue_us=us(tiles * steps * issue) / gpu["sms"],  # at ``ipc``
                predicted_us=max(loop, mem),
                bf16_us=2 * m * n * k / gpu["bf16_flops"] * 1e6)


def activation_us(gpu, m, k, a_bits, group, factor) -> float:
    """The activation pass: read x (bf16), write codes and scales, times ``factor``."""
    groups = k // group if group else 1
    return (m * k * 2 + m * k * a_bits // 8 + m * groups * 4) / gpu["dram"] * 1e6 * factor


@dataclass
class Compiled:
    """What the model reads off one compiled GEMM specialization."""
    registers: int
    spill_bytes: int
    shared: int
    loop_instructions: int
    per_gmma: float


def _sass_module():
    """This tree's SASS reader, loaded by path (``--src`` may import an older clq_triton)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_clq_sass", os.path.join(ROOT, "clq_triton", "kernels", "sass.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def compile_gemm(arch, a_bits, w_bits, group, cfg) -> Compiled:
    """Compile one GEMM specialization to a cubin (triton's own ptxas) and read its SASS."""
    import re
    import subprocess
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from clq_triton.kernels import gemm

    sass = _sass_module()
    fn = gemm._quant_matmul_kernel
    cons = dict(gemm.constexprs(a_bits, w_bits, group, cfg))
    sig = dict(gemm.signature(a_bits, w_bits, torch.bfloat16))
    sig.update({k: "constexpr" for k in cons})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in gemm.ALIGNED}
    k = triton.compile(ASTSource(fn, sig, cons, attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([sass.tool("cuobjdump"), "-res-usage", path], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res)
    loop = sass.tensor_loop(sass.disassemble(k.asm["cubin"]))
    return Compiled(int(m.group(1)), int(m.group(2)) + int(m.group(3)), k.metadata.shared,
                    loop.instructions,
                    sass.instructions_per_gmma(loop, cfg.BM, cfg.BN, cfg.BK, cfg.num_warps))


def compile_all(arch, calls):
    """Each distinct launch of ``calls`` compiled: {(cfg, a_bits, w_bits, group): Compiled}."""
    from clq_triton.kernels import tuning

    out = {}
    for _, m, k, n, _, (a_bits, w_bits, group) in calls:
        cfg = tuning.fitted_table_config(arch, m, k, group, a_bits, w_bits)
        key = (cfg, a_bits, w_bits, group)
        if key not in out:
            out[key] = compile_gemm(arch, a_bits, w_bits, group, cfg)
            print(f"compiled sm_{arch} w{w_bits}a{a_bits} g{group} {cfg}", file=sys.stderr,
                  flush=True)
    return out


def calibration(gpu, group, factor_sets=("pixart", "flux")) -> float:
    """Measured activation-pass time ÷ its DRAM bound, W4A4, per scale mode (per token for
    ``group`` None, else group 64's), averaged over the measured models."""
    ratios = []
    for name in factor_sets:
        bound = sum(c * activation_us(gpu, m, k, 4, group, 1.0)
                    for _, m, k, n, c in shapes.SETS[name]()) / 1e3
        ratios.append(MEASURED[name]["activation_pass"]["g64" if group else "pc"] / bound)
    return sum(ratios) / len(ratios)


def run(archs, sets, modes, ipc=IPC) -> dict:
    import triton

    out = dict(date=datetime.date.today().isoformat(), triton=triton.__version__, ipc=ipc,
               gemms=[], forwards=[])
    for arch in archs:
        gpu = GPUS[arch]
        # measured on the H200; applied to each arch's bound
        factors = {g: calibration(GPUS[90], g) for g in (None, 64)}
        calls = [(name, m, k, n, c, MODES[mode]) for name in sets
                 for (_, m, k, n, c) in shapes.SETS[name]() for mode in modes]
        compiled = compile_all(arch, calls)
        from clq_triton.kernels import tuning
        for name in sets:
            for mode in modes:
                a_bits, w_bits, group = MODES[mode]
                gemm_ms = act_ms = bf16_ms = 0.0
                for layer, m, k, n, count in shapes.SETS[name]():
                    cfg = tuning.fitted_table_config(arch, m, k, group, a_bits, w_bits)
                    r = compiled[cfg, a_bits, w_bits, group]
                    p = predict_gemm(gpu, r, cfg, m, k, n, a_bits, w_bits, group, ipc)
                    factor = factors[group]
                    act = activation_us(gpu, m, k, a_bits, group, factor)
                    out["gemms"].append(dict(arch=arch, set=name, layer=layer, mode=mode, M=m,
                                             K=k, N=n, count=count, registers=r.registers,
                                             spill_bytes=r.spill_bytes, shared=r.shared,
                                             config=f"{cfg.BM}x{cfg.BN}x{cfg.BK} "
                                                    f"w{cfg.num_warps} s{cfg.num_stages}",
                                             activation_us=act, **p))
                    gemm_ms += count * p["predicted_us"] / 1e3
                    act_ms += count * act / 1e3
                    bf16_ms += count * p["bf16_us"] / 1e3
                meas = MEASURED.get(name)
                if meas:  # the H200's, scaled to another arch by bf16 rate and bandwidth
                    h200 = GPUS[90]
                    rest = (meas["attention"] * h200["bf16_flops"] / gpu["bf16_flops"]
                            + meas["other"] * h200["dram"] / gpu["dram"])
                else:
                    rest = _wan_attention_ms(gpu)
                bf16_fwd = meas["bf16_graph"] if meas and arch == 90 else rest + bf16_ms
                fwd = rest + gemm_ms + act_ms
                out["forwards"].append(dict(arch=arch, set=name, mode=mode,
                                            gemm_ms=gemm_ms, activation_ms=act_ms,
                                            rest_ms=rest, predicted_ms=fwd, bf16_ms=bf16_fwd,
                                            bf16_measured=bool(meas and arch == 90),
                                            x_bf16=bf16_fwd / fwd,
                                            activation_factor=factors[group]))
    return out


def _wan_attention_ms(gpu, blocks=30, tokens=32760, text=512, d=1536) -> float:
    """Wan 2.1 1.3B attention, estimated: 4·L²·d FLOPs self, 4·L·text·d cross, at 60 % of the
    bf16 peak (FlashAttention-class kernels; an assumption, not measured here)."""
    flops = blocks * (4 * tokens * tokens * d + 4 * tokens * text * d)
    return flops / (0.6 * gpu["bf16_peak"]) * 1e3


# GEMMs measured on the H200 on 2026-12-04 (M = 4096, triton 3.6): run 1 (gpu_check, the
# kernels of 98f3547) and run 2 (gemm_sweep, the table configs of e1eea9d). --validate FILE
# compares the model of the kernels it runs on (``--src``, and triton via PYTHONPATH) with one.
RESULTS = os.path.join(ROOT, "bench", "results", "h200-2026-12-04")
MEASURED_GEMM = {"98f3547": os.path.join(RESULTS, "gpu-check-nvidia-h200-2026-12-04.json"),
                 "e1eea9d": os.path.join(RESULTS, "gemm-sweep-NVIDIA-H200-2026-12-04.json")}


def measured_gemms(path: str) -> list[tuple[int, int, int, str, float]]:
    """(M, K, N, mode, µs) from a gpu_check or a gemm_sweep JSON (table configs only)."""
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict):  # gemm_sweep
        return [(4096, r["K"], r["N"], r["mode"], r["ms"] * 1e3) for r in data["rows"]
                if r.get("table") and "ms" in r and r["mode"] in MODES]
    return [(r["M"], r["K"], r["N"], mode, r[mode + "_ms"] * 1e3) for r in data
            if r.get("section") == "gemm" and "w4a4-pc_ms" in r for mode in MODES]


def validate(path: str, ipc=IPC) -> list[dict]:
    """Predicted vs measured GEMM µs, and the IPC that would make each prediction meet it."""
    gpu, out = GPUS[90], []
    rows = measured_gemms(path)
    compiled = compile_all(90, [("gemm", m, k, n, 1, MODES[mode]) for m, k, n, mode, _ in rows])
    from clq_triton.kernels import tuning
    for m, k, n, mode, measured in rows:
        a_bits, w_bits, group = MODES[mode]
        cfg = tuning.fitted_table_config(90, m, k, group, a_bits, w_bits)
        res = compiled[cfg, a_bits, w_bits, group]
        pred = lambda x: predict_gemm(gpu, res, cfg, m, k, n, a_bits, w_bits, group, x)  # noqa
        fit = next((x / 100 for x in range(20, 201) if pred(x / 100)["predicted_us"]
                    <= measured), None)
        p = pred(ipc)
        out.append(dict(K=k, N=n, mode=mode, measured_us=round(measured, 1),
                        predicted_us=round(p["predicted_us"], 1),
                        ratio=round(p["predicted_us"] / measured, 2), ipc_fit=fit,
                        per_gmma=p["per_gmma"]))
    return out


def markdown(res: dict) -> str:
    lines = [f"# Performance model (predictions), {res['date']}, triton {res['triton']}",
             "", f"Made by `python bench/perf/model.py` (IPC {res['ipc']}); every figure is a "
             "prediction from the compiled code unless marked measured. See "
             "bench/perf/README.md.", "", "## Forward", "",
             "| arch | model | mode | GEMMs ms | activation pass ms | attention + rest ms | "
             "predicted ms | bf16 ms | × bf16 |", "|---|---|---|---|---|---|---|---|---|"]
    for f in res["forwards"]:
        lines.append(f"| sm_{f['arch']} | {f['set']} | {f['mode']} | {f['gemm_ms']:.1f} | "
                     f"{f['activation_ms']:.1f} | {f['rest_ms']:.1f} | {f['predicted_ms']:.1f} | "
                     f"{f['bf16_ms']:.1f}{' (measured)' if f['bf16_measured'] else ''} | "
                     f"{f['x_bf16']:.2f} |")
    lines += ["", "## GEMM launches", "",
              "| arch | model | layer | mode | M×K×N | config | regs | spill B | CTAs/SM | waves "
              "| instr/GMMA | mem µs | tensor µs | issue µs | predicted µs | bf16 µs | × bf16 |",
              "|" + "---|" * 17]
    for g in res["gemms"]:
        lines.append(f"| sm_{g['arch']} | {g['set']} | {g['layer']} | {g['mode']} | "
                     f"{g['M']}×{g['K']}×{g['N']} | {g['config']} | {g['registers']} | "
                     f"{g['spill_bytes']} | {g['ctas_per_sm']} | {g['waves']} | {g['per_gmma']} | "
                     f"{g['mem_us']:.1f} | {g['tensor_us']:.1f} | {g['issue_us']:.1f} | "
                     f"{g['predicted_us']:.1f} | {g['bf16_us']:.1f} | "
                     f"{g['bf16_us'] / g['predicted_us']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, action="append", help="90, 89 (default both)")
    ap.add_argument("--sets", default=",".join(shapes.SETS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--ipc", type=float, default=IPC)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--src", default=ROOT, help="the tree whose kernels are modelled")
    ap.add_argument("--validate", metavar="COMMIT_OR_JSON",
                    help="compare with GEMMs measured on the H200: 98f3547 or e1eea9d "
                         "(MEASURED_GEMM) or a gpu_check / gemm_sweep JSON")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.src)
    os.environ.setdefault("TRITON_INTERPRET", "0")
    if args.validate:
        for row in validate(MEASURED_GEMM.get(args.validate, args.validate), args.ipc):
            print(json.dumps(row))
        return 0
    res = run(args.arch or [90, 89], args.sets.split(","), args.modes.split(","), args.ipc)
    stem = os.path.join(args.out, f"perf-model-{res['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(res))
    print(markdown(res).split("## GEMM")[0])
    print("wrote", stem + ".md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
