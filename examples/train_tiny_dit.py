"""Train the tiny class-conditional DiT on procedurally generated coloured shapes (CPU).

    python examples/train_tiny_dit.py --minutes 25      # writes clq_triton/toy/weights/
    python examples/train_tiny_dit.py --device cuda --batch 256 --lr 1e-3 --patch-size 2

Data: clq_triton.toy.shapes (48 classes = shape × colour × quadrant), drawn fresh each step.
Objective: v-prediction, cosine noise schedule, min-SNR-γ loss weights (Hang et al. 2023),
AdamW with warm-up and cosine decay over the time budget, EMA of the weights (saved).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch

from clq_triton.toy.model import WEIGHTS_DIR, new_scheduler, new_tiny_dit, sample
from clq_triton.toy.shapes import N_CLASSES, accuracy, make_images


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=25.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--min-lr", type=float, default=0.1,
                    help="final learning rate as a fraction of --lr (cosine decay over the budget)")
    ap.add_argument("--min-snr", type=float, default=5.0,
                    help="min-SNR-γ loss weighting: weight min(SNR, γ)/(SNR + 1) for v-prediction "
                    "(0 = unweighted)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-dropout", type=float, default=0.1,
                    help="fraction of samples trained unconditionally (for guidance)")
    ap.add_argument("--init", help="continue from the weights saved in this directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to train (images are drawn on the CPU)")
    ap.add_argument("--patch-size", type=int, default=4, choices=(2, 4),
                    help="DiT patch size of a new model (2: 256 tokens, 4× the compute)")
    ap.add_argument("--out", default=WEIGHTS_DIR)
    ap.add_argument("--eval-samples", type=int, default=2 * N_CLASSES,
                    help="FP samples to check after training")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also check 48 EMA samples (10 DDIM steps) every N steps; 0 = never")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if args.init:
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel.from_pretrained(args.init).train()
    else:
        model = new_tiny_dit(patch_size=args.patch_size).train()
    # Classifier-free guidance needs the unconditional model: drop a sample's label (→ null
    # class N_CLASSES) for all blocks at once. diffusers' own dropout draws per block, so the
    # "null in every block" input used at sampling time would never be seen: switch it off.
    for mod in model.modules():
        if type(mod).__name__ == "LabelEmbedding":
            mod.dropout_prob = 0.0
    model = model.to(args.device)
    ema = copy.deepcopy(model).eval()
    noise_sched = new_scheduler()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    alphas = noise_sched.alphas_cumprod
    v_pred = noise_sched.config.prediction_type == "v_prediction"
    from diffusers import DDIMScheduler

    sampler = DDIMScheduler.from_config(noise_sched.config)
    start = time.time()
    step, running = 0, None
    while step < args.max_steps and time.time() - start < args.minutes * 60:
        labels = torch.randint(0, N_CLASSES, (args.batch,), generator=gen)
        x0 = make_images(labels, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch,), generator=gen)
        drop = torch.rand(args.batch, generator=gen) < args.label_dropout
        cond = torch.where(drop, N_CLASSES, labels)
        eps = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        lr = args.lr * _lr_factor(step, time.time() - start, args)
        for g in opt.param_groups:
            g["lr"] = lr
        target = noise_sched.get_velocity(x0, eps, t) if v_pred else eps
        weight = _loss_weight(a.flatten(), args.min_snr, v_pred)
        xt, t, cond, target, weight = (v.to(args.device) for v in (xt, t, cond, target, weight))
        err = (model(xt, timestep=t, class_labels=cond).sample - target).pow(2).mean((1, 2, 3))
        loss = (err * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        step += 1
        if step % 200 == 0:
            print(f"step {step}  loss {running:.4f}  {time.time() - start:.0f}s", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            labels = torch.arange(N_CLASSES)
            acc = accuracy(sample(ema, sampler, labels), labels)
            print(f"step {step}  EMA sample accuracy {_fmt(acc)}", flush=True)

    ema = ema.cpu()
    ema.save_pretrained(args.out, safe_serialization=True)
    sampler.save_pretrained(args.out)
    labels = torch.arange(args.eval_samples) % N_CLASSES
    acc = accuracy(sample(ema, sampler, labels), labels)
    print(f"trained {step} steps in {time.time() - start:.0f}s; saved to {args.out}")
    print(f"checker accuracy of {labels.numel()} FP samples: {_fmt(acc)}")


def _lr_factor(step: int, elapsed_s: float, args) -> float:
    """Linear warm-up over 200 steps, then cosine decay to args.min_lr at the end of the budget
    (time or steps, whichever comes first)."""
    done = min(1.0, max(elapsed_s / (args.minutes * 60), step / args.max_steps))
    cosine = args.min_lr + (1 - args.min_lr) * 0.5 * (1 + math.cos(math.pi * done))
    return min(1.0, (step + 1) / 200) * cosine


def _loss_weight(alpha_bar: torch.Tensor, gamma: float, v_pred: bool) -> torch.Tensor:
    """Per-sample loss weight [B]: min-SNR-γ, expressed for the v (or ε) target."""
    if gamma <= 0:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if v_pred else clipped / snr


def _fmt(acc: dict) -> str:
    return "  ".join(f"{k} {v:.0%}" for k, v in acc.items())


if __name__ == "__main__":
    main()
