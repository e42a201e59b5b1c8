"""The ``clq-triton`` command line.

    clq-triton quickstart [--bits w4a4] [--method clq] [--save DIR]
        the shipped tiny DiT: calibrate, quantize, compare FP and quantized samples (CPU, ~2 min)
    clq-triton quickstart --model ID_OR_PATH --prompt "..."
        the same on a real diffusers pipeline (GPU advised)
    clq-triton quantize ID_OR_PATH --bits w4a4 --method clq --prompts FILE --out DIR
        calibrate and quantize a pipeline's transformer, save it in the diffusers layout
    torchrun --nproc-per-node 2 -m clq_triton.cli quantize ... --calib-batch 4
        the same, the calibration capture spread over 2 processes (same checkpoint)

``python -m clq_triton.cli ...`` is the same command.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time

import torch

from .methods import CLQ, METHODS, Calibrated, SVDQuant


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


def quantize(transformer, bits, method, data, timer, fuse=False):
    """Patch ``transformer`` in place; print what was quantized and skipped, and the memory."""
    from . import patch

    before = model_bytes(transformer)
    report = patch(transformer, bits, method, data, progress=True, fuse_projections=fuse)
    timer.lap(f"{report.method.name} {bits} " + ("calibration + " if data else "")
              + "quantization")
    print(report.summary())
    print(f"transformer, all weights and buffers: {before / 2**20:.2f} MiB "
          f"→ {model_bytes(transformer) / 2**20:.2f} MiB")
    return report


def method_from_args(args):
    """The method config of ``--method`` with ``--gptq`` and ``--lowrank`` applied."""
    method = METHODS[args.method]()
    if args.gptq:
        if not isinstance(method, Calibrated):
            raise SystemExit(f"--gptq needs a calibrated method (clq, smoothquant, svdquant, "
                             f"quarot), not {args.method}")
        method = dataclasses.replace(method, gptq=True)
    if args.lowrank:
        if not isinstance(method, (CLQ, SVDQuant)):
            raise SystemExit(f"--lowrank is an option of clq and svdquant, not {args.method}")
        field = "lowrank" if isinstance(method, CLQ) else "rank"
        try:
            method = dataclasses.replace(method, **{field: args.lowrank})
        except ValueError as e:
            raise SystemExit(f"--lowrank: {e}") from None
    return method


# ------------------------------------------------------------------------------ quickstart


def tiny_dit(args, timer):
    from .toy.model import calibration_data, load_tiny_dit, sample
    from .toy.shapes import N_CLASSES, accuracy, frechet_distance, image_features, real_features
    from .images import image_grid, psnr

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp, sched = load_tiny_dit()
    fp = fp.to(device)
    timer.lap(f"loaded the shipped tiny DiT ({sum(p.numel() for p in fp.parameters()):,} "
              f"parameters, {device})")
    data = None
    if args.method_config.calibrated:
        data = calibration_data(fp, sched, args.steps, args.calib_samples)
        timer.lap(f"captured {len(data)} calibration steps")
    quant = copy.deepcopy(fp)
    quantize(quant, args.bits, args.method_config, data, timer, args.fuse_projections)
    if args.save:
        _save(quant, args.save)

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


def load_pipeline(model_id: str, timer):
    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = DiffusionPipeline.from_pretrained(model_id, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    timer.lap(f"loaded {model_id} ({type(pipe).__name__}, {device}, {dtype})")
    if not hasattr(pipe, "transformer"):
        raise SystemExit(f"{type(pipe).__name__} has no .transformer to quantize")
    return pipe


CALIB_SEED = 1  # calibration prompt i starts from the noise of seed CALIB_SEED + i


def check_prompts(pipe, prompts: list[str]) -> None:
    """Exit with a message unless a DiT pipeline's prompts are ImageNet class ids."""
    if type(pipe).__name__ == "DiTPipeline":
        bad = [p for p in prompts if not p.strip().isdigit() or int(p) >= 1000]
        if bad:
            raise SystemExit(f"{type(pipe).__name__} takes ImageNet class ids (0-999) as "
                             f"prompts, got {bad[:3]}")


def generate(pipe, prompts: list[str], steps: int, seed: int | list[int]) -> torch.Tensor:
    """Images float [B, 3, H, W] in [0, 1] (first frame for video pipelines). For
    class-conditional DiT pipelines the prompts are ImageNet class ids. ``seed``: one
    generator for the batch, or a list: one per prompt (its noise does not depend on the
    batch it is in)."""
    device = pipe.transformer.device
    gen = ([torch.Generator(device).manual_seed(s) for s in seed] if isinstance(seed, list)
           else torch.Generator(device).manual_seed(seed))
    if type(pipe).__name__ == "DiTPipeline":
        out = pipe(class_labels=[int(p) for p in prompts], num_inference_steps=steps,
                   generator=gen, output_type="np")
    else:
        out = pipe(prompts, num_inference_steps=steps, generator=gen, output_type="np")
    imgs = torch.as_tensor(out.images if hasattr(out, "images") else out.frames).float()
    if imgs.dim() == 5:  # video [B, F, H, W, C]
        imgs = imgs[:, 0]
    return imgs.permute(0, 3, 1, 2)


def calibrate_pipeline(pipe, prompts, steps, samples, timer, batch=None):
    """Calibration samples from the pipeline on ``prompts``, in batches of ``batch`` prompts
    (all in one by default), ``samples`` spread over each batch's sampler steps (one
    transformer call per step: diffusers batches classifier-free guidance). Under torchrun /
    accelerate launch the batches are dealt over the processes (clq_triton.distributed).
    Prompt i starts from the noise of seed ``CALIB_SEED + i`` whatever its batch and
    process."""
    from .distributed import capture_sharded

    batch = batch or len(prompts)
    numbered = list(enumerate(prompts))
    batches = [numbered[i:i + batch] for i in range(0, len(prompts), batch)]
    data = capture_sharded(
        pipe.transformer, lambda b: generate(pipe, [p for _, p in b], steps,
                                             seed=[CALIB_SEED + i for i, _ in b]),
        batches, max_samples=samples, calls=steps)
    timer.lap(f"captured {len(data)} calibration steps")
    return data


def real_pipeline(args, timer):
    from .images import image_grid, psnr

    pipe = load_pipeline(args.model, timer)
    prompts = args.prompt or (["207", "360", "387", "974"] if type(pipe).__name__ == "DiTPipeline"
                              else ["a photo of a cat", "a red car on a street"])
    check_prompts(pipe, prompts)
    fp_imgs = generate(pipe, prompts, args.steps, seed=0)
    timer.lap(f"generated {len(fp_imgs)} FP images")
    data = (calibrate_pipeline(pipe, prompts, args.steps, args.calib_samples, timer)
            if args.method_config.calibrated else None)
    quantize(pipe.transformer, args.bits, args.method_config, data, timer, args.fuse_projections)
    q_imgs = generate(pipe, prompts, args.steps, seed=0)
    timer.lap(f"generated {len(q_imgs)} {args.bits} images")
    print(f"PSNR of {args.bits} vs FP (same noise): {psnr(q_imgs, fp_imgs, 1.0):.2f} dB")
    if args.save:
        _save(pipe.transformer, args.save, args.model)
    ncol = min(4, len(fp_imgs))
    rng = (0.0, 1.0)
    return image_grid(fp_imgs, ncol, value_range=rng), image_grid(q_imgs, ncol, value_range=rng)


def _save(transformer, directory, base=None):
    from . import save_quantized

    save_quantized(transformer, directory)
    load = f"clq_triton.load_quantized({directory!r})"
    print(f"saved the quantized transformer to {directory}; load it with {load}"
          + (f", or a pipeline with DiffusionPipeline.from_pretrained({base!r}, "
             f"transformer={load})" if base else ""))


def cmd_quickstart(args) -> None:
    from .images import captioned, save_png, side_by_side

    timer = Timer()
    fp_grid, q_grid = (real_pipeline if args.model else tiny_dit)(args, timer)
    save_png(side_by_side(captioned(fp_grid, "FP"),
                          captioned(q_grid, f"{args.method} {args.bits}")), args.out)
    print(f"wrote {args.out} (left FP, right {args.method} {args.bits}); total wall time "
          f"{time.time() - timer.start:.1f} s")


# -------------------------------------------------------------------------------- quantize


def read_prompts(path: str) -> list[str]:
    try:
        with open(path) as f:
            prompts = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    except OSError as e:
        raise SystemExit(f"cannot read prompts from {path}: {e}") from None
    if not prompts:
        raise SystemExit(f"{path} holds no prompts (one per line)")
    return prompts


def cmd_quantize(args) -> None:
    timer = Timer()
    prompts = read_prompts(args.prompts) if args.prompts else None
    if args.method_config.calibrated and not prompts:
        raise SystemExit(f"--method {args.method} calibrates on the pipeline's own samples: "
                         "give --prompts FILE (one prompt, or DiT class id, per line)")
    from .distributed import barrier, init_from_env, is_main, rank_and_world

    init_from_env()  # several processes under torchrun / accelerate launch: capture is shared
    pipe = load_pipeline(args.model, timer)
    if prompts:
        check_prompts(pipe, prompts)
    data = (calibrate_pipeline(pipe, prompts, args.steps, args.calib_samples, timer,
                               args.calib_batch) if args.method_config.calibrated else None)
    if is_main():  # one process calibrates and saves, the others wait and load
        quantize(pipe.transformer, args.bits, args.method_config, data, timer,
                 args.fuse_projections)
        _save(pipe.transformer, args.out, args.model)
    barrier()
    if not is_main():
        from . import load_quantized

        load_quantized(args.out)
        print(f"rank {rank_and_world()[0]}: loaded {args.out}")
    print(f"total wall time {time.time() - timer.start:.1f} s")


# ---------------------------------------------------------------------------------- parser


def count(minimum: int):
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def output_problem(path: str, directory: bool) -> str | None:
    """Why ``path`` cannot be written as an output directory (created with its parents) or
    file (its folder must exist); None when it can."""
    if directory:
        if os.path.exists(path) and not os.path.isdir(path):
            return f"{path} exists and is not a directory"
        parent = os.path.abspath(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            return f"{parent} is not a directory: {path} cannot be created"
    else:
        if os.path.isdir(path):
            return f"{path} is a directory, not a file"
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            return f"the folder of {path} does not exist"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None


def check_outputs(ap: argparse.ArgumentParser, args) -> None:
    """argparse errors for output paths that cannot be written, before any work."""
    outputs = [(args.out, args.command == "quantize"), (getattr(args, "save", None), True)]
    for path, directory in outputs:
        problem = path and output_problem(path, directory)
        if problem:
            ap.error(problem)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clq-triton", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, steps=10, calib=8):
        p.add_argument("--bits", default="w4a4", choices=["w4a4", "w4a8", "w8a8"])
        p.add_argument("--method", default="clq", choices=list(METHODS))
        p.add_argument("--steps", type=count(1), default=steps, help="sampler steps")
        p.add_argument("--calib-samples", type=count(1), default=calib,
                       help="sampler steps captured for calibration")
        p.add_argument("--gptq", action="store_true",
                       help="round weights with GPTQ (calibrated methods; quality.md: better "
                            "in every group, calibration about 2.3x longer)")
        p.add_argument("--lowrank", type=count(0), default=0, metavar="R",
                       help="clq: rank of the low-rank branch; svdquant: its rank (default 32)")
        p.add_argument("--fuse-projections", action="store_true",
                       help="quantize q/k/v (and k/v, context q/k/v, FLUX single blocks' "
                            "q/k/v + MLP input) as one layer each: one activation pass and "
                            "one GEMM")

    q = sub.add_parser("quickstart", help="calibrate + quantize + compare FP and quantized images")
    common(q)
    q.add_argument("--model", help="diffusers pipeline id or path (default: shipped tiny DiT)")
    q.add_argument("--num-images", type=count(1), default=48, help="tiny DiT: images per side")
    q.add_argument("--prompt", action="append",
                   help="real model: prompt, or ImageNet class id for DiT (repeatable)")
    q.add_argument("--save", help="directory to save the quantized transformer in")
    q.add_argument("--out", default="quickstart.png", help="PNG: FP (left) vs quantized")
    q.set_defaults(run=cmd_quickstart)

    z = sub.add_parser("quantize", help="quantize a pipeline's transformer and save it")
    z.add_argument("model", help="diffusers pipeline id or path")
    common(z, steps=20, calib=16)
    z.add_argument("--prompts", help="calibration prompts, one per line (DiT: class ids)")
    z.add_argument("--calib-batch", type=count(1), default=None,
                   help="prompts per captured pipeline run (default: all in one), each "
                        "giving --calib-samples steps; under torchrun the runs are spread "
                        "over the processes")
    z.add_argument("--out", required=True, help="directory for the quantized transformer")
    z.set_defaults(run=cmd_quantize)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    check_outputs(ap, args)
    args.method_config = method_from_args(args)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
