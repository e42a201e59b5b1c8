import math

import pytest
import torch

from clq_triton.images import image_grid, psnr, save_png, side_by_side


def test_psnr_matches_formula(gen):
    a = torch.rand(3, 3, 5, 7, generator=gen) * 2 - 1
    b = a + 0.01 * torch.randn(a.shape, generator=gen)
    want = sum(10 * math.log10(4 / ((a[i] - b[i]).double().pow(2).mean().item()))
               for i in range(3)) / 3
    assert psnr(a, b) == pytest.approx(want, rel=1e-9)
    assert psnr((a + 1) / 2, (b + 1) / 2, peak_to_peak=1.0) == pytest.approx(want, rel=1e-6)
    assert psnr(a, a) == pytest.approx(10 * math.log10(4e10))  # identical: capped, not inf
    with pytest.raises(ValueError, match="paired"):
        psnr(a, b[:2])


def test_grid_places_every_tile(gen):
    imgs = torch.rand(5, 3, 4, 6, generator=gen) * 2 - 1
    grid = image_grid(imgs, ncol=2, pad=1, scale=2)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 3 * 9 + 1, 2 * 13 + 1)
    for i in range(5):
        y, x = 1 + (i // 2) * 9, 1 + (i % 2) * 13
        want = ((imgs[i] + 1) / 2 * 255).round().to(torch.uint8)
        assert torch.equal(grid[:, y:y + 8:2, x:x + 12:2], want)
    assert (grid[:, 19:, 14:] == 128).all()  # the empty sixth slot stays grey


def test_side_by_side_and_png_roundtrip(tmp_path, gen):
    from PIL import Image

    a = torch.randint(0, 256, (3, 4, 5), generator=gen, dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 6, 2), generator=gen, dtype=torch.uint8)
    out = side_by_side(a, b, gap=3)
    assert out.shape == (3, 6, 10)
    assert torch.equal(out[:, :4, :5], a) and torch.equal(out[:, :, 8:], b)
    assert (out[:, 4:, :5] == 255).all() and (out[:, :, 5:8] == 255).all()
    save_png(out, str(tmp_path / "x.png"))
    back = torch.from_numpy(__import__("numpy").asarray(Image.open(tmp_path / "x.png")).copy())
    assert torch.equal(back.permute(2, 0, 1), out)


def test_caption_band_holds_dark_text_on_white():
    from clq_triton.images import captioned

    grid = torch.full((3, 20, 80), 128, dtype=torch.uint8)
    out = captioned(grid, "w4a4")
    assert out.shape == (3, 34, 80) and torch.equal(out[:, 14:], grid)
    band = out[:, :14]
    assert (band == 255).float().mean() > 0.7 and (band < 100).any()
