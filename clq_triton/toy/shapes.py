"""Procedural dataset of coloured shapes and an analytic checker for generated images.

An image is ``size × size`` RGB in [-1, 1] on a black background with one shape. Its class
label encodes (shape, colour, quadrant): ``label = (shape * N_COLOURS + colour) * 4 + quadrant``,
48 classes. The checker reads shape, colour and quadrant back from pixels (no learned part),
in the spirit of GenEval's object / colour / position checks.
"""

from __future__ import annotations

import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.2, 0.3, 1.0),
           "yellow": (1.0, 1.0, 0.1)}
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
N_COLOURS = len(COLOURS)
N_CLASSES = len(SHAPES) * N_COLOURS * len(QUADRANTS)
_PALETTE = torch.tensor(list(COLOURS.values()))


def decode_label(label: int) -> tuple[str, str, str]:
    """label → (shape, colour, quadrant) names."""
    quadrant, rest = label % 4, label // 4
    return SHAPES[rest // N_COLOURS], list(COLOURS)[rest % N_COLOURS], QUADRANTS[quadrant]


def encode_label(shape: int, colour: int, quadrant: int) -> int:
    return (shape * N_COLOURS + colour) * 4 + quadrant


def make_images(labels: torch.Tensor, size: int = 32, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Render one image per label: float32 [B, 3, size, size] in [-1, 1].

    The shape's centre is jittered inside its quadrant and its radius drawn in
    [size/8, 3·size/16]."""
    b = labels.numel()
    labels = labels.flatten().long()
    quadrant, rest = labels % 4, labels // 4
    shape, colour = rest // N_COLOURS, rest % N_COLOURS
    q = size / 4
    cx = q * (1 + 2 * (quadrant % 2)).float() + (torch.rand(b, generator=generator) - 0.5) * q / 2
    cy = q * (1 + 2 * (quadrant // 2)).float() + (torch.rand(b, generator=generator) - 0.5) * q / 2
    r = size / 8 + torch.rand(b, generator=generator) * size / 16
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    x = grid.view(1, 1, size) - cx.view(b, 1, 1)
    y = grid.view(1, size, 1) - cy.view(b, 1, 1)
    r = r.view(b, 1, 1)
    circle = x**2 + y**2 <= r**2
    square = (x.abs() <= 0.85 * r) & (y.abs() <= 0.85 * r)
    triangle = (y >= -r) & (y <= r) & (x.abs() <= (y + r) / 2)  # apex up
    s = shape.view(b, 1, 1)
    mask = torch.where(s == 0, circle, torch.where(s == 1, square, triangle))
    rgb = _PALETTE[colour].view(b, 3, 1, 1)
    img = torch.where(mask.unsqueeze(1), rgb, torch.zeros(()))
    return img * 2 - 1


def image_features(images: torch.Tensor) -> torch.Tensor:
    """Per-image features [B, 8]: foreground mean RGB (3), centroid x/y in [0, 1] (2),
    fill ratio of the bounding box, foreground area fraction, bbox aspect (w/h).

    Foreground = pixels whose brightest channel is above mid-grey. Images with no foreground
    get zeros."""
    img = (images.float().clamp(-1, 1) + 1) / 2  # [B, 3, H, W] in [0, 1]
    b, _, h, w = img.shape
    fg = img.amax(1) > 0.5  # [B, H, W]
    area = fg.flatten(1).sum(1).float()
    safe = area.clamp(min=1)
    rgb = (img * fg.unsqueeze(1)).flatten(2).sum(2) / safe.unsqueeze(1)
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    cx = (fg * xs).flatten(1).sum(1) / safe / w
    cy = (fg * ys).flatten(1).sum(1) / safe / h
    rows, cols = fg.any(2), fg.any(1)
    idx_h, idx_w = torch.arange(h), torch.arange(w)
    top = torch.where(rows, idx_h, h).amin(1)
    bottom = torch.where(rows, idx_h, -1).amax(1)
    left = torch.where(cols, idx_w, w).amin(1)
    right = torch.where(cols, idx_w, -1).amax(1)
    bh = (bottom - top + 1).clamp(min=1).float()
    bw = (right - left + 1).clamp(min=1).float()
    fill = area / (bh * bw)
    feats = torch.stack([rgb[:, 0], rgb[:, 1], rgb[:, 2], cx, cy, fill, area / (h * w),
                         bw / bh], 1)
    return torch.where((area > 0).unsqueeze(1), feats, torch.zeros_like(feats))


def real_features(per_class: int, seed: int = 123) -> torch.Tensor:
    """:func:`image_features` of ``per_class`` freshly drawn real images of every class
    (fixed ``seed``): the reference set for :func:`frechet_distance`."""
    labels = torch.arange(N_CLASSES).repeat(per_class)
    return image_features(make_images(labels, generator=torch.Generator().manual_seed(seed)))


def classify(images: torch.Tensor) -> torch.Tensor:
    """Analytic label read back from pixels: int64 [B], or -1 where no shape is found."""
    f = image_features(images)
    colour = torch.cdist(f[:, :3], _PALETTE).argmin(1)
    quadrant = (f[:, 3] >= 0.5).long() + 2 * (f[:, 4] >= 0.5).long()
    fill = f[:, 5]
    shape = torch.where(fill > 0.9, 1, torch.where(fill > 0.64, 0, 2))
    label = (shape * N_COLOURS + colour) * 4 + quadrant
    return torch.where(f[:, 6] * images.shape[-1] * images.shape[-2] >= 4, label, -1)


def accuracy(images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Fraction of images whose shape / colour / position / all three match the labels."""
    got = classify(images)
    want = labels.flatten().long()
    found = got >= 0
    parts = {"shape": lambda v: v // 4 // N_COLOURS, "colour": lambda v: v // 4 % N_COLOURS,
             "position": lambda v: v % 4}
    out = {k: float(((fn(got) == fn(want)) & found).float().mean()) for k, fn in parts.items()}
    out["overall"] = float(((got == want) & found).float().mean())
    return out


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]
    (the FID formula, on :func:`image_features` instead of Inception features)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # trace of sqrt(ca·cb) via the eigenvalues of sqrt(ca)·cb·sqrt(ca) (symmetric PSD)
    ea, va = torch.linalg.eigh(ca)
    sa = va @ torch.diag(ea.clamp(min=0).sqrt()) @ va.T
    tr_sqrt = torch.linalg.eigvalsh(sa @ cb @ sa).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * tr_sqrt)
