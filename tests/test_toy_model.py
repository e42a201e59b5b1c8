import json
import os
import subprocess
import sys

import pytest
import torch

from clq_triton.toy.model import load_tiny_dit, new_scheduler, new_tiny_dit, sample
from clq_triton.toy.shapes import N_CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sample_shape_range_and_same_noise_for_same_seed():
    from diffusers import DDIMScheduler

    model = new_tiny_dit().eval()
    sched = DDIMScheduler.from_config(new_scheduler().config)
    labels = torch.tensor([0, 5, N_CLASSES - 1])
    a = sample(model, sched, labels, steps=3, seed=7)
    b = sample(model, sched, labels, steps=3, seed=7)
    c = sample(model, sched, labels, steps=3, seed=8)
    assert a.shape == (3, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_load_without_weights_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tiny_dit.py"):
        load_tiny_dit(str(tmp_path))


def test_train_script_and_quality_table_run(tmp_path):
    """Train 3 steps, reload, then run bench/quality.py on those weights with tiny settings."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_tiny_dit.py"),
                          "--max-steps", "3", "--batch", "8", "--eval-samples", "4",
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trained 3 steps" in out.stdout
    model, sched = load_tiny_dit(str(tmp_path))
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in new_tiny_dit().parameters())
    table, store = tmp_path / "quality.md", tmp_path / "quality.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "quality.py"), "--weights", str(tmp_path),
           "--models", "toy+outliers", "--bits", "w4a4", "--methods", "RTN", "CLQ",
           "--per-class", "1", "--seeds", "0", "1", "--steps", "2", "--calib-samples", "1",
           "--w-clips", "1.0", "0.9", "--a-clips", "1.0", "--w8a8-groups",
           "--out", str(table), "--json", str(store)]
    env = dict(os.environ, CLQ_BACKEND="torch")
    out = subprocess.run(cmd + ["--groups", "64"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    out = subprocess.run(cmd + ["--groups", "64", "none"], capture_output=True, text=True,
                         timeout=600, env=env)  # adds the per-channel rows, keeps the g64 ones
    assert out.returncode == 0, out.stderr[-2000:]
    assert "g64" not in out.stdout and out.stdout.count("per-channel") == 2
    summary, full = table.read_text().split("## All rows")
    assert "| toy+outliers | w4a4 | g64 |" in summary and "**" in summary
    rows = [ln.split("|") for ln in full.splitlines() if ln.startswith("| ")]
    assert [(r[3].strip(), r[4].strip()) for r in rows[1:]] == [
        ("-", "FP"), ("g64", "RTN"), ("g64", "CLQ"), ("per-channel", "RTN"),
        ("per-channel", "CLQ")]
    assert all(r[1].strip() == "toy+outliers" and " ± " in r[5] for r in rows[1:])
    saved = json.loads(store.read_text())
    table.unlink()  # --summary rewrites the table from the json alone and prints the summary
    out = subprocess.run(cmd + ["--summary"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    tables, readme = out.stdout.split("\nREADME table:")
    assert tables.strip() in table.read_text()
    assert "| toy+outliers | w4a4 | g64 | " in readme and "| RTN | " in readme  # the baseline
    assert len(saved["rows"]) == 5 and all(len(r["seeds"]) == 2 for r in saved["rows"].values())
    # rows of other settings are not mixed into one table: a rerun with other seeds refuses
    out = subprocess.run(cmd[:cmd.index("--seeds")] + ["--seeds", "0"]
                         + cmd[cmd.index("--steps"):] + ["--groups", "64"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0 and "--fresh" in out.stderr
    assert json.loads(store.read_text()) == saved
    # under torchrun the rows are dealt over the processes and merged into one json
    two = tmp_path / "two.json"
    cmd2 = [a if a != str(store) else str(two) for a in cmd]
    cmd2[cmd2.index("CLQ")] = "Hadamard"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2"] + cmd2[1:] + ["--groups", "64", "none",
                                                                 "--threads", "1"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = json.loads(two.read_text())["rows"]
    assert sorted(rows) == sorted(["toy+outliers|FP"] + [
        f"toy+outliers|w4a4|{m}|{n}" for m in ("g64", "per-channel") for n in ("RTN", "Hadamard")])
    assert sum(ln.startswith("toy+outliers|w4a4") for ln in out.stdout.splitlines()) == 4
