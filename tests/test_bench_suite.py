import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_suite_runs_once(tmp_path):
    """Every benchmark in bench/ runs (once, untimed) so that the suite cannot rot."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "bench"), "-q",
                          "--benchmark-disable", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "passed" in out.stdout


def test_calibration_scale_runs(tmp_path):
    """bench/calibration_scale.py --options end to end on its smallest configuration (one
    PixArt-Σ-wide block, one sample, 16 tokens, a 1 × 1 clip grid), in a subprocess as in a
    real run: CLQ and each calibration option."""
    out_md = tmp_path / "scale.md"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "calibration_scale.py"),
                          "--only-base", "--options", "--threads", "2", "--out", str(out_md)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    rows = [ln.split("|") for ln in out_md.read_text().splitlines() if "| 1 | 1 | 16 |" in ln]
    assert sorted(r[2].strip() for r in rows) == ["CLQ", "CLQ+GPTQ", "CLQ+low rank 32",
                                                  "SVDQuant 32"]
    assert all(r[6].strip() == "10" for r in rows)  # 10 Linears quantized
    assert (tmp_path / "scale.json").exists()
