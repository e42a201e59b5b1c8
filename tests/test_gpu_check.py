import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_runs_every_section(tmp_path):
    """bench/gpu_check.py is meant for a GPU session with minutes to spare: a Python error
    found there costs device time. Its --smoke mode runs every section here, in the
    interpreter, and its correctness rows must agree with the references."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("OUT", None)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (js,) = tmp_path.glob("gpu-check-*.json")
    rows = json.loads(js.read_text())
    assert not [r for r in rows if "error" in r or "skipped" in r]
    sections = {r["section"] for r in rows}
    assert sections == {"env", "correctness", "gemm", "rotate", "linear", "pixart",
                        "calibration"}
    (cal,) = [r for r in rows if r["section"] == "calibration"]
    assert cal["layers"] > 0 and cal["seconds"] > 0, cal
    for r in rows:
        if r.get("op") == "rotate_quantize":
            assert r["bytes_equal"] > 0.99 and r["scale_max_rel"] < 1e-5, r
            assert r["scale_nan_mismatch"] == 0, r
        elif r.get("op") == "quant_matmul":
            assert r["max_rel"] < 1e-5, r
        elif r.get("op") == "QuantLinear":
            assert r["triton_vs_torch"] < 1e-3 and r["int8_operands_equal"], r
    names = {r.get("name") for r in rows if r["section"] == "pixart"}
    assert {"w4a4-pc-int8", "w4a4-g128-int8", "w4a4-pc-obs", "w4a4-pc-obs-int8",
            "w4a4-g128-obs"} <= names
    assert any("w4a4-pc-int8_ms" in r for r in rows if r["section"] == "linear")
    assert (tmp_path / js.name.replace(".json", ".md")).read_text().startswith("# GPU check")


def test_rotate_probe_runs_and_summarizes(kernel_device, monkeypatch, capsys):
    """bench/rotate_probe.py on a subset of its settings (in the interpreter: correctness only,
    no timings): every setting, split spans included, equals the reference; its summary of
    GPU-like lines picks the fastest correct setting and skips the wrong ones."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import rotate_probe

    import clq_triton.kernels.rotate_quantize as rq

    monkeypatch.setattr(rq, "plan", rq.plan)  # main() overrides them; restored after the test
    monkeypatch.setattr(rq, "_split_spans", rq._split_spans)
    monkeypatch.setattr(rq, "_programs_per_column", rq._programs_per_column)
    full = rotate_probe.settings(torch.bfloat16)
    subset = [s for s in full if s[:2] == (64, None) and s[2] in (None, 32) and s[3] in (None, 4)
              and s[4] in (None, 2) and not s[7]] + [s for s in full if s[5] and not s[7]]
    obs = [s for s in full if s[7] and s[:2] == (64, 64)]  # shift + multiplier: each precision
    assert [s[5] for s in obs] == [None, "tf32x3", "ieee"]
    subset += obs
    monkeypatch.setattr(rotate_probe, "settings", lambda xdt: subset)
    rotate_probe.main("bf16")
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(subset) and {r["split"] for r in rows} == {None, False, True}
    assert [r["obs"] for r in rows].count(True) == 3
    assert all(r["bytes_equal"] == 1.0 and r["scale_nan_mismatch"] == 0 for r in rows), rows
    timed = [dict(r, ms_4096x4608=t)
             for r, t in zip(rows, (0.3, 0.2, 0.1, 0.05, 0.4, 0.5, 0.7, 0.6, 0.9))]
    timed[3]["bytes_equal"] = 0.5  # fastest, but wrong: not picked
    table = rotate_probe.summary([json.dumps(r) for r in timed])
    line = next(t for t in table if t.startswith("| bf16 | 64 | None | False |"))
    assert "| 0.300 | 0.100 | BM=32, warps=4, waves=2, split=True | 0.200 | 0.100 |" in line
    line = next(t for t in table if t.startswith("| bf16 | 64 | 64 | True |"))
    assert "| 0.700 | 0.600 | prec=tf32x3 |" in line
    assert table[-1].endswith("1 failed or wrong")
    gathered = json.dumps(dict(dtype="bf16", hadamard_block=64, group=None, obs=True,
                               permutation_ms={"gather": 0.3, "runs": 0.15, "in_order": 0.1}))
    table = rotate_probe.summary([json.dumps(r) for r in timed] + [gathered])
    assert table[-1] == "| bf16 | 64 | None | True | 0.300 | 0.150 | 0.100 | 3.00× | 1.50× |"
    assert sum("failed or wrong" in t for t in table) == 1  # not counted as a setting


def test_profile_forward_smoke(tmp_path):
    """bench/profile_forward.py, the first measurement of a GPU session: its --smoke mode runs
    every model and mode on the CPU and writes its table."""
    # the PyTorch references (not the interpreter): the script is under test, not the kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "profile_forward.py"),
                          "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (js,) = tmp_path.glob("profile-*.json")
    rows = json.loads(js.read_text())["rows"]
    modes = ("bf16", "w4a4", "w4a4-int8", "w8a8", "w4a4-g64", "w4a4-clq", "w4a4-clq-runs",
             "w4a4-clq-unfolded", "bf16-fused", "w4a4-fused", "w8a8-fused")
    assert {(r["model"], r["mode"]) for r in rows} == {
        (m, k) for m in ("pixart", "flux") for k in modes}
    by = {(r["model"], r["mode"]): r for r in rows}
    for r in rows:
        assert "error" not in r, r
        assert r["eager_ms"] > 0 and r["family_ms"], r
        if r["mode"].endswith("-fused") and r["mode"] != "bf16-fused":  # fewer passes
            assert r["quant_calls"] < by[r["model"], r["mode"][:-6]]["quant_calls"], r
        if not r["mode"].startswith("bf16"):
            assert r["quant_calls"] > 0 and r["host_us_per_quant_call"] > 0, r
            assert r["rel_err_vs_bf16"] < (0.01 if r["mode"] == "w8a8" else 0.2), r
            assert r["family_ms"].get("activation pass", 0) > 0, r
        if r["mode"] == "w4a4-clq":  # the same layers as the other CLQ modes and plain W4A4
            assert r["quant_calls"] == by[r["model"], "w4a4-clq-unfolded"]["quant_calls"] \
                == by[r["model"], "w4a4-clq-runs"]["quant_calls"] \
                == by[r["model"], "w4a4"]["quant_calls"], r
    assert (tmp_path / js.name.replace(".json", ".md")).read_text().startswith("# Forward profile")
