import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quantize_pipeline_example_runs(tmp_path):
    env = dict(os.environ, CLQ_BACKEND="torch")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quantize_pipeline.py"),
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "clq w4a4: quantized 12 Linear layers" in out.stdout
    assert sorted(os.listdir(tmp_path)) == ["clq_config.json", "model.safetensors"]
