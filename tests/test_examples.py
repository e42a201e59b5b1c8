import json
import os
import subprocess
import sys

import torch

import clq_triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.py")


def run(*args):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                         env=dict(os.environ, CLQ_BACKEND="torch"), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def read_png(path):
    from PIL import Image

    return torch.from_numpy(__import__("numpy").asarray(Image.open(path)).copy())


def test_quickstart_on_shipped_tiny_dit(tmp_path):
    png = tmp_path / "grid.png"
    stdout = run(QUICKSTART, "--num-images", "4", "--steps", "3", "--calib-samples", "2",
                 "--out", str(png), "--save", str(tmp_path / "q"))
    assert "clq w4a4: quantized 36 Linear layers, skipped 0" in stdout
    for row in ("captured 2 calibration steps", "FP ", "w4a4 ", "PSNR of w4a4 vs FP", "MiB",
                "total wall time", "saved the quantized transformer"):
        assert row in stdout, stdout
    img = read_png(png)
    # a 14 px caption band, 4 tiles of 64 px with 2 px padding, an 8 px gap between the grids
    assert img.shape == (14 + 2 + 66, 2 * (4 * 66 + 2) + 8, 3)
    assert (img[:14, :60] < 100).any() and (img[:14, 4 * 66 + 12:] < 100).any()  # captions
    model = clq_triton.load_quantized(str(tmp_path / "q"))
    assert sum(isinstance(m, clq_triton.QuantLinear) for m in model.modules()) == 36


def test_quickstart_data_free_method_captures_nothing(tmp_path):
    stdout = run(QUICKSTART, "--method", "rtn", "--num-images", "2", "--steps", "2",
                 "--out", str(tmp_path / "g.png"), "--fuse-projections")
    # fused: each block's q/k/v are one layer, 6 blocks x (6 - 2) layers
    assert "captured" not in stdout and "rtn w4a4: quantized 24 Linear layers" in stdout


def _saved_pipeline(path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                               out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                               num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=(32,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, sample_size=8)
    DiTPipeline(transformer=tr.eval(), vae=vae.eval(), scheduler=DDIMScheduler()).save_pretrained(
        path)


def test_quickstart_on_a_saved_pipeline(tmp_path):
    """The --model path on a small DiTPipeline saved to disk (random weights), with --save."""
    _saved_pipeline(tmp_path / "pipe")
    stdout = run(QUICKSTART, "--model", str(tmp_path / "pipe"), "--steps", "3",
                 "--calib-samples", "2", "--prompt", "1", "--prompt", "2",
                 "--save", str(tmp_path / "q"), "--out", str(tmp_path / "grid.png"))
    assert "clq w4a4: quantized 12 Linear layers" in stdout
    assert "PSNR of w4a4 vs FP" in stdout
    assert sorted(os.listdir(tmp_path / "q")) == ["config.json",
                                                  "diffusion_pytorch_model.safetensors"]
    assert read_png(tmp_path / "grid.png").shape == (14 + 2 + 8 + 2, 2 * (2 * 10 + 2) + 8, 3)


def test_cli_quantize_saves_a_loadable_transformer(tmp_path):
    from diffusers import DiffusionPipeline

    _saved_pipeline(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("# DiT: class ids\n3\n7\n")
    stdout = run("-m", "clq_triton.cli", "quantize", str(tmp_path / "pipe"), "--bits", "w4a8",
                 "--method", "clq", "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
                 "--calib-samples", "2", "--out", str(tmp_path / "q"), "--gptq", "--lowrank", "4")
    assert "captured 2 calibration steps" in stdout
    assert "clq w4a8: quantized 12 Linear layers, skipped 0" in stdout
    assert "DiffusionPipeline.from_pretrained(" in stdout
    method = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"][
        "method"]
    assert method["method"] == "clq" and method["gptq"] and method["lowrank"] == 4
    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "pipe", transformer=clq_triton.load_quantized(str(tmp_path / "q")))
    assert pipe.transformer.transformer_blocks[1].ff.net[2].config.name == "w4a8"


def test_cli_errors_are_messages(tmp_path):
    out = subprocess.run([sys.executable, "-m", "clq_triton.cli", "quantize", "x", "--out",
                          str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0 and "give --prompts FILE" in out.stderr
    out = subprocess.run([sys.executable, "-m", "clq_triton.cli", "quantize", "x", "--prompts",
                          str(tmp_path / "none.txt"), "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "cannot read prompts" in out.stderr
    for extra, message in ((["--method", "rtn", "--gptq"], "--gptq needs a calibrated method"),
                           (["--method", "quarot", "--lowrank", "4"], "option of clq and svdquant"),
                           (["--lowrank", "-1"], "argument --lowrank: must be >= 0, got -1"),
                           (["--method", "quarot", "--gptq"], "give --prompts FILE")):
        out = subprocess.run([sys.executable, "-m", "clq_triton.cli", "quantize", "x", "--out",
                              str(tmp_path), *extra], capture_output=True, text=True)
        assert out.returncode != 0 and message in out.stderr, (extra, out.stderr[-500:])


def test_console_script_is_declared():
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts == {"clq-triton": "clq_triton.cli:main"}


def test_two_process_capture_gives_the_one_process_checkpoint(tmp_path):
    """clq-triton quantize under torchrun (2 CPU processes, gloo): each process captures half
    of the prompt batches, the samples are gathered in batch order, one process calibrates
    and saves, the other loads. The checkpoint is the one-process run's, bit for bit."""
    _saved_pipeline(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("3\n7\n11\n19\n")
    args = ["quantize", str(tmp_path / "pipe"), "--method", "clq", "--prompts",
            str(tmp_path / "prompts.txt"), "--steps", "3", "--calib-samples", "2",
            "--calib-batch", "1"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"  # the same threads in both runs (and no oversubscription)
    one = subprocess.run([sys.executable, "-m", "clq_triton.cli", *args, "--out",
                          str(tmp_path / "q1")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "clq_triton.cli", *args, "--out",
                          str(tmp_path / "q2")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "captured 8 calibration steps" in one.stdout and "rank 1: loaded" in two.stdout
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        assert (tmp_path / "q1" / name).read_bytes() == (tmp_path / "q2" / name).read_bytes()


def test_cli_numbers_and_output_paths_are_checked_before_any_work(tmp_path, capsys):
    """Counts below their minimum, non-integers, an --out that is a file or in a missing
    folder: argparse errors (exit 2, a usage message), before any model is loaded."""
    import pytest

    from clq_triton import cli

    (tmp_path / "file").write_text("")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1\n")
    quantize = ["quantize", "missing-model", "--prompts", str(prompts)]
    out = ["--out", str(tmp_path / "q")]
    for argv, message in (
            (quantize + out + ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
            (quantize + out + ["--steps", "-3"], "argument --steps: must be >= 1, got -3"),
            (quantize + out + ["--calib-samples", "0"], "--calib-samples: must be >= 1"),
            (quantize + out + ["--calib-batch", "0"], "--calib-batch: must be >= 1, got 0"),
            (quantize + out + ["--calib-batch", "-1"], "--calib-batch: must be >= 1"),
            (quantize + out + ["--steps", "2.5"], "--steps: '2.5' is not an integer"),
            (quantize + ["--out", str(tmp_path / "file")], "exists and is not a directory"),
            (quantize + ["--out", str(tmp_path / "file" / "q")], "is not a directory"),
            (["quickstart", "--steps", "0"], "argument --steps: must be >= 1"),
            (["quickstart", "--num-images", "0"], "argument --num-images: must be >= 1"),
            (["quickstart", "--out", str(tmp_path / "no" / "g.png")], "does not exist"),
            (["quickstart", "--out", str(tmp_path)], "is a directory, not a file"),
            (["quickstart", "--save", str(tmp_path / "file")], "exists and is not a directory")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "usage:" in err, (argv, err)


def test_dit_prompts_must_be_class_ids(tmp_path, capsys):
    import pytest

    from clq_triton import cli

    _saved_pipeline(tmp_path / "pipe")
    (tmp_path / "prompts.txt").write_text("3\na photo of a cat\n")
    with pytest.raises(SystemExit, match="class ids .*'a photo of a cat'"):
        cli.main(["quantize", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"),
                  "--out", str(tmp_path / "q"), "--steps", "2"])
    assert not (tmp_path / "q").exists()


def test_gptq_help_quotes_the_measured_slowdown():
    """--gptq's help gives the calibration-time ratio docs/calibration.md measures."""
    import re

    from clq_triton import cli

    with open(os.path.join(ROOT, "docs", "calibration.md")) as f:
        measured = re.search(r"CLQ\+GPTQ [\d.]+ s \(([\d.]+)× CLQ\)", f.read()).group(1)
    sub = cli.parser()._subparsers._group_actions[0].choices["quantize"]
    helps = {a.dest: a.help for a in sub._actions}
    assert f"about {measured}x longer" in helps["gptq"], (measured, helps["gptq"])
