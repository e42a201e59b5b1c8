"""Calibrate and quantize a diffusers pipeline's transformer with CLQ, then save it.

    python examples/quantize_pipeline.py                       # tiny random DiT, CPU, seconds
    python examples/quantize_pipeline.py --model PATH_OR_ID --prompt "a red fox" --steps 20 \
        --bits w4a4 --out pixart-w4a4                           # a real pipeline (GPU advised)

Without --model it builds a small DiT pipeline with random weights, which shows the API but
says nothing about image quality.
"""

from __future__ import annotations

import argparse
import time

import torch

import clq_triton


def tiny_dit_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                               out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                               num_embeds_ada_norm=1000)
    vae = AutoencoderKL(block_out_channels=(32,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, sample_size=8)
    return DiTPipeline(transformer=tr.eval(), vae=vae.eval(), scheduler=DDIMScheduler())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="diffusers pipeline id or path (default: tiny random DiT)")
    ap.add_argument("--prompt", action="append", help="calibration prompt (repeatable)")
    ap.add_argument("--steps", type=int, default=4, help="sampler steps during calibration")
    ap.add_argument("--bits", default="w4a4", choices=["w4a4", "w4a8", "w8a8"])
    ap.add_argument("--method", default="clq", choices=list(clq_triton.METHODS))
    ap.add_argument("--max-samples", type=int, default=16)
    ap.add_argument("--out", help="directory to save the quantized transformer")
    args = ap.parse_args()

    if args.model:
        from diffusers import DiffusionPipeline

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype)
        pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    else:
        pipe = tiny_dit_pipeline()
    pipe.set_progress_bar_config(disable=True)

    if type(pipe).__name__ == "DiTPipeline":
        run = lambda: pipe(class_labels=[1, 207, 360], num_inference_steps=args.steps)  # noqa: E731
    else:
        prompts = args.prompt or ["a photo of a cat", "a red car on a street"]
        run = lambda: pipe(prompts, num_inference_steps=args.steps)  # noqa: E731

    t0 = time.time()
    data = clq_triton.capture_calibration(pipe.transformer, run, max_samples=args.max_samples)
    report = clq_triton.patch(pipe.transformer, bits=args.bits, method=args.method,
                              calibration=data)
    print(f"{args.method} {args.bits}: {report}")
    print(f"calibration + quantization took {time.time() - t0:.1f} s on {len(data)} samples")
    if args.out:
        clq_triton.save_quantized(pipe.transformer, args.out)
        print(f"saved to {args.out}; reload with clq_triton.load_quantized(transformer, "
              f"{args.out!r})")


if __name__ == "__main__":
    main()
