"""Image helpers for comparing FP and quantized samples: paired PSNR and PNG grids."""

from __future__ import annotations

import numpy as np
import torch


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float = 2.0) -> float:
    """Mean PSNR in dB over a batch of paired images [B, C, H, W].

    ``peak_to_peak`` is the value range: 2 for images in [-1, 1], 1 for [0, 1]."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs paired images of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(peak_to_peak**2 / mse)).mean())


def image_grid(images: torch.Tensor, ncol: int, pad: int = 2, scale: int = 1,
               value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Tile images [B, 3, H, W] row by row, ``ncol`` per row, into uint8 [3, H', W'].

    Pixels are mapped from ``value_range`` to 0..255; ``pad`` grey pixels separate tiles;
    ``scale`` repeats every pixel (nearest neighbour) to enlarge small images."""
    lo, hi = value_range
    img = ((images.float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    img = img.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    b, c, h, w = img.shape
    nrow = -(-b // ncol)
    grid = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 0.5)
    for i in range(b):
        y, x = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[:, y:y + h, x:x + w] = img[i]
    return (grid * 255).round().to(torch.uint8)


def side_by_side(left: torch.Tensor, right: torch.Tensor, gap: int = 8) -> torch.Tensor:
    """Two uint8 grids [3, H, W] next to each other, ``gap`` white pixels between them."""
    h = max(left.shape[1], right.shape[1])
    out = torch.full((3, h, left.shape[2] + gap + right.shape[2]), 255, dtype=torch.uint8)
    out[:, :left.shape[1], :left.shape[2]] = left
    out[:, :right.shape[1], left.shape[2] + gap:] = right
    return out


def captioned(grid: torch.Tensor, text: str, height: int = 14) -> torch.Tensor:
    """A white band of ``height`` pixels with ``text`` in black above a uint8 grid [3, H, W]."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (grid.shape[2], height), "white")
    ImageDraw.Draw(band).text((2, 1), text, fill="black")
    top = torch.from_numpy(np.asarray(band).copy()).permute(2, 0, 1)
    return torch.cat([top, grid], dim=1)


def save_png(grid: torch.Tensor, path: str) -> None:
    """Write a uint8 [3, H, W] image as PNG (Pillow, which diffusers already requires)."""
    from PIL import Image

    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(path)
