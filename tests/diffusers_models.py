"""Small diffusers transformers built from configs (random weights) and inputs for them."""

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    LTXVideoTransformer3DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)


def pixart(gen):
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                 out_channels=8, num_layers=2, cross_attention_dim=64,
                                 sample_size=8, patch_size=2, caption_channels=32)
    x = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
             encoder_hidden_states=torch.randn(2, 5, 32, generator=gen),
             timestep=torch.tensor([10, 500]),
             added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return m, x


def dit(gen):
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    x = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen), timestep=torch.tensor([3, 900]),
             class_labels=torch.tensor([1, 7]))
    return m, x


def sd3(gen):
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                              attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                              caption_projection_dim=64, pooled_projection_dim=16, out_channels=4,
                              pos_embed_max_size=16)
    x = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
             encoder_hidden_states=torch.randn(2, 6, 32, generator=gen),
             pooled_projections=torch.randn(2, 16, generator=gen), timestep=torch.tensor([10, 700]))
    return m, x


def flux(gen):
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                               attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                               pooled_projection_dim=16, axes_dims_rope=(8, 12, 12))
    tokens, text = 16, 6
    x = dict(hidden_states=torch.randn(1, tokens, 16, generator=gen),
             encoder_hidden_states=torch.randn(1, text, 32, generator=gen),
             pooled_projections=torch.randn(1, 16, generator=gen), timestep=torch.tensor([0.5]),
             img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3))
    return m, x


def cogvideox(gen):
    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                    out_channels=4, time_embed_dim=64, text_embed_dim=32,
                                    num_layers=2, sample_width=8, sample_height=8, sample_frames=5,
                                    patch_size=2, max_text_seq_length=6)
    x = dict(hidden_states=torch.randn(1, 2, 4, 8, 8, generator=gen),
             encoder_hidden_states=torch.randn(1, 6, 32, generator=gen),
             timestep=torch.tensor([100]))
    return m, x


def wan(gen, i2v=False):
    """Wan text-to-video; ``i2v``: image-to-video, with the image cross-attention's k/v
    (add_k_proj / add_v_proj) and 512 text tokens (its processor splits the image tokens off
    at 512 from the end)."""
    image = dict(image_dim=48, added_kv_proj_dim=64) if i2v else {}
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                              in_channels=4, out_channels=4, text_dim=32, freq_dim=64, ffn_dim=128,
                              num_layers=2, rope_max_seq_len=32, **image)
    x = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=gen),
             encoder_hidden_states=torch.randn(1, 512 if i2v else 6, 32, generator=gen),
             timestep=torch.tensor([300]))
    if i2v:
        x["encoder_hidden_states_image"] = torch.randn(1, 5, 48, generator=gen)
    return m, x


def wan_i2v(gen):
    return wan(gen, i2v=True)


def ltx(gen):
    """LTX-Video: its attention processor calls to_q / to_k / to_v whether or not the
    attention is fused (not in MODELS: clq_triton leaves it unfused)."""
    m = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                   num_attention_heads=2, attention_head_dim=32,
                                   cross_attention_dim=64, num_layers=2, caption_channels=16)
    x = dict(hidden_states=torch.randn(1, 2 * 4 * 4, 8, generator=gen),
             encoder_hidden_states=torch.randn(1, 5, 16, generator=gen),
             timestep=torch.tensor([300]), encoder_attention_mask=torch.ones(1, 5),
             num_frames=2, height=4, width=4)
    return m, x


MODELS = {"pixart": pixart, "dit": dit, "sd3": sd3, "flux": flux, "cogvideox": cogvideox,
          "wan": wan}


def output(model, inputs):
    out = model(**inputs, return_dict=False)[0]
    return out
