import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.py")


def run_quickstart(*args):
    out = subprocess.run([sys.executable, QUICKSTART, *args], capture_output=True, text=True,
                         env=dict(os.environ, CLQ_BACKEND="torch"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def read_png(path):
    from PIL import Image

    return torch.from_numpy(__import__("numpy").asarray(Image.open(path)).copy())


def test_quickstart_on_shipped_tiny_dit(tmp_path):
    png = tmp_path / "grid.png"
    stdout = run_quickstart("--num-images", "4", "--steps", "3", "--calib-samples", "2",
                            "--out", str(png))
    assert "clq w4a4: quantized 36 Linear layers" in stdout
    for row in ("FP ", "w4a4 ", "PSNR of w4a4 vs FP", "MiB", "total wall time"):
        assert row in stdout, stdout
    img = read_png(png)
    # 4 tiles of 64 px with 2 px padding per side, an 8 px gap between the two grids
    assert img.shape == (2 + 66, 2 * (4 * 66 + 2) + 8, 3)


def test_quickstart_on_a_saved_pipeline(tmp_path):
    """The --model path on a small DiTPipeline saved to disk (random weights), with --save."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                               out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                               num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=(32,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, sample_size=8)
    DiTPipeline(transformer=tr.eval(), vae=vae.eval(), scheduler=DDIMScheduler()).save_pretrained(
        tmp_path / "pipe")
    stdout = run_quickstart("--model", str(tmp_path / "pipe"), "--steps", "3",
                            "--calib-samples", "2", "--class-label", "1", "--class-label", "2",
                            "--save", str(tmp_path / "q"), "--out", str(tmp_path / "grid.png"))
    assert "clq w4a4: quantized 12 Linear layers" in stdout
    assert "PSNR of w4a4 vs FP" in stdout
    assert sorted(os.listdir(tmp_path / "q")) == ["clq_config.json", "model.safetensors"]
    assert read_png(tmp_path / "grid.png").shape == (2 + 8 + 2, 2 * (2 * 10 + 2) + 8, 3)
