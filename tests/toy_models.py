"""A tiny DiT pipeline (real diffusers classes, random weights with planted outliers)."""

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel


def planted_dit(seed: int, layers: int = 2) -> DiTTransformer2DModel:
    """DiT whose FFN hidden channels 0..4 and attention value channels 0..2 carry outliers."""
    torch.manual_seed(seed)
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                               out_channels=8, num_layers=layers, sample_size=8, patch_size=2,
                               num_embeds_ada_norm=1000).eval()
    with torch.no_grad():
        for b in tr.transformer_blocks:
            b.ff.net[0].proj.weight[:5] *= 20
            b.attn1.to_v.weight[:3] *= 15
    return tr


def dit_pipeline(seed: int = 0, layers: int = 2) -> DiTPipeline:
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(32,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=32, sample_size=8).eval()
    pipe = DiTPipeline(transformer=planted_dit(seed, layers), vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, labels, steps=4, seed=0):
    return pipe(class_labels=labels, num_inference_steps=steps, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images
