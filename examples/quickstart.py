"""Quickstart: calibrate a DiT with CLQ, quantize it to W4A4, compare FP and W4A4 samples.

    python examples/quickstart.py                   # shipped tiny DiT, CPU, a few minutes
    python examples/quickstart.py --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS \
        --prompt "a red fox in snow" --steps 20 --save pixart-w4a4          # real model, GPU

Writes one PNG (``--out``): FP samples on the left, quantized samples from the same noise on
the right. Prints the metrics (for the tiny DiT: the shape/colour/position checker, paired
PSNR vs FP, Fréchet feature distance to real images; for a real model: paired PSNR), the
weight memory before and after, and the wall time of each phase.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import clq_triton
from clq_triton.images import image_grid, psnr, save_png, side_by_side


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


class Timer:
    def __init__(self):
        self.start = self.last = time.time()

    def lap(self, what: str) -> None:
        now = time.time()
        print(f"  [{now - self.last:6.1f} s] {what}", flush=True)
        self.last = now


def quantize(transformer, args, data, timer):
    """Patch ``transformer`` in place; print what was quantized and the memory."""
    before = model_bytes(transformer)
    report = clq_triton.patch(transformer, bits=args.bits, method=args.method, calibration=data,
                              progress=True)
    timer.lap(f"{args.method} {args.bits} calibration + quantization")
    print(f"{args.method} {args.bits}: {report}")
    print(f"transformer, all weights and buffers: {before / 2**20:.2f} MiB "
          f"→ {model_bytes(transformer) / 2**20:.2f} MiB")


def tiny_dit(args, timer):
    from clq_triton.toy.model import calibration_data, load_tiny_dit, sample
    from clq_triton.toy.shapes import (N_CLASSES, accuracy, frechet_distance, image_features,
                                       real_features)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp, sched = load_tiny_dit()
    fp = fp.to(device)
    timer.lap(f"loaded the shipped tiny DiT ({sum(p.numel() for p in fp.parameters()):,} "
              f"parameters, {device})")
    data = calibration_data(fp, sched, args.steps, args.calib_samples)
    timer.lap(f"captured {len(data)} calibration steps")
    quant = copy.deepcopy(fp)
    quantize(quant, args, data, timer)

    labels = torch.arange(args.num_images) % N_CLASSES
    fp_imgs = sample(fp, sched, labels, steps=args.steps, seed=0)
    q_imgs = sample(quant, sched, labels, steps=args.steps, seed=0)
    timer.lap(f"sampled {len(labels)} FP and {len(labels)} {args.bits} images, "
              f"{args.steps} DDIM steps")
    real = real_features(20)
    print(f"{'':8} {'overall':>8} {'shape':>6} {'colour':>6} {'position':>8} {'FD':>8}")
    for name, imgs in (("FP", fp_imgs), (args.bits, q_imgs)):
        acc = accuracy(imgs, labels)
        fd = frechet_distance(image_features(imgs), real)
        print(f"{name:8} {acc['overall']:8.3f} {acc['shape']:6.3f} {acc['colour']:6.3f} "
              f"{acc['position']:8.3f} {fd:8.4f}")
    print(f"PSNR of {args.bits} vs FP (same noise): {psnr(q_imgs, fp_imgs):.2f} dB")
    print("(checker accuracy: shape, colour and quadrant read back from pixels; FD: Fréchet "
          "distance of checker features to real images, lower is better)")
    ncol = min(8, len(labels))
    return image_grid(fp_imgs, ncol, scale=2), image_grid(q_imgs, ncol, scale=2)


def real_pipeline(args, timer):
    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    timer.lap(f"loaded {args.model} ({type(pipe).__name__}, {device}, {dtype})")
    if not hasattr(pipe, "transformer"):
        raise SystemExit(f"{type(pipe).__name__} has no .transformer to quantize")

    def generate(seed: int) -> torch.Tensor:
        """Images float [B, 3, H, W] in [0, 1] (first frame for video pipelines)."""
        gen = torch.Generator(device).manual_seed(seed)
        if type(pipe).__name__ == "DiTPipeline":
            out = pipe(class_labels=args.class_label or [207, 360, 387, 974],
                       num_inference_steps=args.steps, generator=gen, output_type="np")
        else:
            out = pipe(args.prompt or ["a photo of a cat", "a red car on a street"],
                       num_inference_steps=args.steps, generator=gen, output_type="np")
        imgs = torch.as_tensor(out.images if hasattr(out, "images") else out.frames).float()
        if imgs.dim() == 5:  # video [B, F, H, W, C]
            imgs = imgs[:, 0]
        return imgs.permute(0, 3, 1, 2)

    fp_imgs = generate(seed=0)
    timer.lap(f"generated {len(fp_imgs)} FP images")
    data = clq_triton.capture_calibration(pipe.transformer, lambda: generate(seed=1),
                                          max_samples=args.calib_samples)
    timer.lap(f"captured {len(data)} calibration steps")
    quantize(pipe.transformer, args, data, timer)
    q_imgs = generate(seed=0)
    timer.lap(f"generated {len(q_imgs)} {args.bits} images")
    print(f"PSNR of {args.bits} vs FP (same noise): {psnr(q_imgs, fp_imgs, 1.0):.2f} dB")
    if args.save:
        clq_triton.save_quantized(pipe.transformer, args.save)
        print(f"saved the quantized transformer to {args.save}; reload with "
              f"clq_triton.load_quantized(transformer, {args.save!r})")
    ncol = min(4, len(fp_imgs))
    rng = (0.0, 1.0)
    return image_grid(fp_imgs, ncol, value_range=rng), image_grid(q_imgs, ncol, value_range=rng)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="diffusers pipeline id or path (default: shipped tiny DiT)")
    ap.add_argument("--bits", default="w4a4", choices=["w4a4", "w4a8", "w8a8"])
    ap.add_argument("--method", default="clq", choices=list(clq_triton.METHODS))
    ap.add_argument("--steps", type=int, default=10, help="sampler steps (real models: try 20)")
    ap.add_argument("--calib-samples", type=int, default=8,
                    help="sampler steps captured for calibration")
    ap.add_argument("--num-images", type=int, default=48, help="tiny DiT: images per side")
    ap.add_argument("--prompt", action="append", help="real model: prompt (repeatable)")
    ap.add_argument("--class-label", type=int, action="append",
                    help="real DiT (class-conditional) model: ImageNet class (repeatable)")
    ap.add_argument("--save", help="real model: directory to save the quantized transformer")
    ap.add_argument("--out", default="quickstart.png", help="PNG of FP (left) vs quantized")
    args = ap.parse_args()

    timer = Timer()
    fp_grid, q_grid = (real_pipeline if args.model else tiny_dit)(args, timer)
    save_png(side_by_side(fp_grid, q_grid), args.out)
    print(f"wrote {args.out} (left FP, right {args.bits}); total wall time "
          f"{time.time() - timer.start:.1f} s")


if __name__ == "__main__":
    main()
