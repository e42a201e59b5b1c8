"""The tiny class-conditional DiT: construction, loading the shipped weights, sampling."""

from __future__ import annotations

import os

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

from .shapes import N_CLASSES

WEIGHTS_DIR = os.path.join(os.path.dirname(__file__), "weights")
IMAGE_SIZE = 32
# Classifier-free guidance scale of the shipped sampler: chosen on FP checker accuracy of the
# shipped weights (noise seed 7, not an evaluation seed); stronger guidance pushes 10-step DDIM
# samples of this small model off the data (speckled shapes, wrong colours).
GUIDANCE = 1.25


def new_tiny_dit(patch_size: int = 4) -> DiTTransformer2DModel:
    """6 blocks, hidden 128 (4 heads × 32), patch 4 on 32×32 RGB (64 tokens; patch 2: 256),
    48 classes plus the null class 48 for classifier-free guidance."""
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=32, in_channels=3,
                                 out_channels=3, num_layers=6, sample_size=IMAGE_SIZE,
                                 patch_size=patch_size, num_embeds_ada_norm=N_CLASSES)


def new_scheduler() -> DDPMScheduler:
    """Training noise schedule: cosine betas, v-prediction (epsilon prediction barely trains
    the high-noise steps where layout is decided), trailing timesteps so sampling starts at
    t = 999. The shipped sampler is a DDIMScheduler made from this config."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         clip_sample=True, prediction_type="v_prediction",
                         timestep_spacing="trailing")


def load_tiny_dit(directory: str = WEIGHTS_DIR, outliers: bool = False
                  ) -> tuple[DiTTransformer2DModel, DDIMScheduler]:
    """The shipped model (eval mode, float32, CPU) and its DDIM sampling scheduler.

    outliers: give it the activation outliers of real DiTs (scaled channels and adaLN
    offsets) by the function-preserving transform of :func:`toy.outliers.add_outliers`
    (default settings, seed 0): the same FP model, harder to quantize."""
    if not os.path.exists(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"no tiny DiT weights in {directory}: train them with "
                                "examples/train_tiny_dit.py")
    model = DiTTransformer2DModel.from_pretrained(directory).eval()
    scheduler = DDIMScheduler.from_pretrained(directory)
    if outliers:
        from .outliers import add_outliers

        add_outliers(model)
    return model, scheduler


@torch.no_grad()
def sample(model, scheduler, labels: torch.Tensor, steps: int = 10,
           guidance: float = GUIDANCE, seed: int = 0) -> torch.Tensor:
    """Generate one image per label: float32 [B, 3, 32, 32] in [-1, 1].

    The initial noise depends only on ``seed`` and the batch size, so two models sampled with
    the same seed and labels are compared from the same noise."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    b = labels.numel()
    noise = torch.randn(b, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    x = noise.to(device)
    labels = labels.flatten().long().to(device)
    null = torch.full_like(labels, N_CLASSES)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        inp = torch.cat([x, x]).to(dtype)
        tt = torch.full((2 * b,), int(t), device=device)
        eps = model(inp, timestep=tt, class_labels=torch.cat([labels, null])).sample.float()
        cond, uncond = eps.chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x.clamp(-1, 1).cpu()


def calibration_data(model, scheduler, steps: int = 10, samples: int = 8, progress: bool = True,
                     guidance: float = GUIDANCE):
    """CalibrationData for the tiny DiT: ``samples`` steps captured from one ``steps``-step
    DDIM run over 12 classes (every 4th label) with seed 1, i.e. other classes and other noise
    than evaluation samples drawn with :func:`sample`'s default seed 0."""
    from ..capture import capture_calibration

    labels = torch.arange(0, N_CLASSES, 4)
    return capture_calibration(model, lambda: sample(model, scheduler, labels, steps=steps,
                                                     guidance=guidance, seed=1),
                               every=max(1, steps // samples), max_samples=samples,
                               progress=progress)
