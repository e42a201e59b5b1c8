"""The quantized Linear calls of one forward, as (name, M, K, N, count): M rows (tokens ×
batch), K in, N out, ``count`` calls per forward. Unfused projections, as ``patch`` leaves a
model by default. Each set matches what ``bench/profile_forward.py`` builds (PixArt-Σ: 28
blocks; FLUX-sized: 2 double + 4 single blocks, batch 2), so predictions compare with its
measurements; Wan 2.1 1.3B at 480p × 81 frames (32760 tokens) stands for video DiTs."""

from __future__ import annotations


def pixart(blocks: int = 28, tokens: int = 4096, text: int = 120, d: int = 1152) -> list:
    return [("attn1 q/k/v/o", tokens, d, d, 4 * blocks),
            ("attn2 q/o", tokens, d, d, 2 * blocks),
            ("attn2 k/v (text)", text, d, d, 2 * blocks),
            ("ff up", tokens, d, 4 * d, blocks),
            ("ff down", tokens, 4 * d, d, blocks)]


def flux(double: int = 2, single: int = 4, batch: int = 2, tokens: int = 4096, text: int = 512,
         d: int = 3072) -> list:
    img, txt, joint = batch * tokens, batch * text, batch * (tokens + text)
    return [("double img q/k/v/o", img, d, d, 4 * double),
            ("double txt q/k/v/o", txt, d, d, 4 * double),
            ("double img ff up", img, d, 4 * d, double),
            ("double img ff down", img, 4 * d, d, double),
            ("double txt ff up", txt, d, 4 * d, double),
            ("double txt ff down", txt, 4 * d, d, double),
            ("single q/k/v", joint, d, d, 3 * single),
            ("single proj_mlp", joint, d, 4 * d, single),
            ("single proj_out", joint, 5 * d, d, single)]


def wan(blocks: int = 30, tokens: int = 32760, text: int = 512, d: int = 1536,
        ffn: int = 8960) -> list:
    return [("self q/k/v/o", tokens, d, d, 4 * blocks),
            ("cross q/o", tokens, d, d, 2 * blocks),
            ("cross k/v (text)", text, d, d, 2 * blocks),
            ("ffn up", tokens, d, ffn, blocks),
            ("ffn down", tokens, ffn, d, blocks)]


SETS = {"pixart": pixart, "flux": flux, "wan": wan}
