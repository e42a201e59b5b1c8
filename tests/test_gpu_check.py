import json
import os
import subprocess
import sys

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
    assert sections == {"env", "correctness", "gemm", "rotate", "linear", "pixart"}
    for r in rows:
        if r.get("op") == "rotate_quantize":
            assert r["bytes_equal"] > 0.99 and r["scale_max_rel"] < 1e-5, r
            assert r["scale_nan_mismatch"] == 0, r
        elif r.get("op") == "quant_matmul":
            assert r["max_rel"] < 1e-5, r
        elif r.get("op") == "QuantLinear":
            assert r["triton_vs_torch"] < 1e-3, r
    assert (tmp_path / js.name.replace(".json", ".md")).read_text().startswith("# GPU check")
