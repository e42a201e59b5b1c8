"""Benchmark settings and helpers: real DiT shapes on CUDA, tiny shapes on CPU (where the
launchers run their PyTorch references, so CPU timings only show that the suite runs).

Run: ``pytest bench --benchmark-only``. Each benchmark stores what it measured (shape,
backend, GB/s or TOPS) in ``extra_info``; ``--benchmark-json FILE`` keeps them.
"""

import contextlib
import time

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
BACKEND = "triton" if CUDA else "torch-reference"

# (tokens M, in K, out N): PixArt-Σ hidden 1152 / FFN 4608; FLUX hidden 3072 / FFN 12288.
# M = 4096 is the target row; 1024 shows a smaller batch.
GEMM_SHAPES = (
    [(m, k, n) for m in (4096, 1024)
     for k, n in ((1152, 4608), (4608, 1152), (3072, 12288), (12288, 3072))]
    if CUDA else [(64, 256, 256), (64, 256, 512)]
)
GROUPS = (None, 128, 64)  # scale modes: per channel, group 128, group 64


def shape_id(shape):
    return "M{}-K{}-N{}".format(*shape)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def run(benchmark, fn, rounds=None):
    """Benchmark ``fn`` (synchronised) and return the mean seconds per call."""
    def call():
        fn()
        sync()

    fn()  # compile / autotune outside the timing
    sync()
    start = time.perf_counter()
    if rounds:
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
    else:
        benchmark(call)
    if benchmark.stats is None:  # --benchmark-disable: one untimed-by-plugin call
        return time.perf_counter() - start
    return benchmark.stats.stats.mean


def pixart_model(full: bool, device, dtype, seed: int = 0):
    """(model, inputs): a PixArt-Σ-sized transformer (28 blocks, hidden 1152, 4096 image
    tokens from a 128×128 latent, 120 text tokens; random weights) when ``full``, else a
    2-block toy of the same class."""
    from diffusers import PixArtTransformer2DModel

    if full:
        cfg = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28,
                   sample_size=128, cross_attention_dim=1152, caption_channels=4096)
        side, text = 128, 120
    else:
        cfg = dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, sample_size=8,
                   cross_attention_dim=64, caption_channels=32)
        side, text = 8, 5
    torch.manual_seed(seed)
    # PixArt-Σ has no resolution/aspect-ratio embedding (diffusers turns it on for
    # sample_size 128 unless told otherwise)
    model = PixArtTransformer2DModel(in_channels=4, out_channels=8, patch_size=2,
                                     use_additional_conditions=False, **cfg)
    model = model.to(device, dtype).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, side, side, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, text, cfg["caption_channels"], device=device,
                                          dtype=dtype),
        timestep=torch.tensor([500], device=device),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs


def flux_model(full: bool, device, dtype, blocks: int = 19, batch: int = 2, seed: int = 0):
    """(model, inputs): a FLUX.1-sized transformer (hidden 3072 = 24 heads × 128, ``blocks``
    double-stream blocks and 2 × ``blocks`` single-stream ones — 19 and 38 in FLUX.1 —,
    4096 image + 512 text tokens, batch 2 as a classifier-free-guidance pair; random weights)
    when ``full``, else a toy of the same class (1 + 2 blocks, 16 + 6 tokens)."""
    from diffusers import FluxTransformer2DModel

    if full:
        cfg = dict(num_layers=blocks, num_single_layers=2 * blocks, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   in_channels=64, axes_dims_rope=(16, 56, 56))
        tokens, text = 4096, 512
    else:
        cfg = dict(num_layers=1, num_single_layers=2, attention_head_dim=32,
                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                   in_channels=16, axes_dims_rope=(8, 12, 12))
        tokens, text = 16, 6
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, **cfg).to(device, dtype).eval()
    c, j, p = cfg["in_channels"], cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    inputs = dict(
        hidden_states=torch.randn(batch, tokens, c, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text, j, device=device, dtype=dtype),
        pooled_projections=torch.randn(batch, p, device=device, dtype=dtype),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(text, 3, device=device))
    return model, inputs


def clq_layers(model, config, fold: bool = True, perm_run: int = 1, seed: int = 0) -> int:
    """Quantize ``model``'s eligible Linears (clq_triton.eligible_linears) in place with the
    layer structure CLQ gives them — a permutation (dealt as smoothing.outlier_permutation
    deals it: single channels, or runs of ``perm_run`` = 8 as with CLQ(perm_run=8)), a
    channel shift and a multiplier before the block Hadamard, and the MLPs' permutations
    folded (clq_triton.fold) unless ``fold`` is
    False — from random transforms instead of a calibration run: function-preserving, the
    same kernels' work, for timing at sizes too large to calibrate in a GPU session. Returns
    how many layers it quantized."""
    from clq_triton import Hadamard, QuantLinear, eligible_linears
    from clq_triton.fold import fold_permutations
    from clq_triton.smoothing import outlier_permutation
    from clq_triton.swap import set_submodule

    gen = torch.Generator().manual_seed(seed)
    layers = eligible_linears(model)
    for name, lin in layers:
        k = lin.in_features
        cfg = Hadamard().layer_config(config, k)
        perm = outlier_permutation(torch.rand(k, generator=gen), cfg.hadamard_block, perm_run)
        set_submodule(model, name, QuantLinear.from_linear(
            lin, cfg, perm=perm,
            channel_scale=torch.rand(k, generator=gen) + 0.5,
            channel_shift=torch.randn(k, generator=gen) * 0.01))
    if fold:
        fold_permutations(model)
    return len(layers)


class _NoLaunch:
    """Stands for a Triton kernel: ``kernel[grid](*args, **kw)`` does nothing but count."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


@contextlib.contextmanager
def stubbed_kernels(arch: int = 90):
    """The package's launch path with every Triton launch a no-op, on CPU tensors: the
    "triton" backend, the GEMM table of ``arch`` and no interpreter, so a QuantLinear call
    runs its checks, both operators' dispatch and real implementations (allocations, launch
    plans, config lookups, argument packing) — everything a GPU call runs on the host except
    Triton's own launcher."""
    from unittest import mock

    import clq_triton  # not at import: conftest loads this module before TRITON_INTERPRET is set
    from clq_triton import quant_linear
    from clq_triton.kernels import _runtime, gemm, rotate_quantize, tuning

    def kernels(t):  # CPU tensors take the kernels' path (use_triton refuses them otherwise)
        return True

    with clq_triton.backend("triton"), \
            mock.patch.object(gemm, "_quant_matmul_kernel", _NoLaunch()), \
            mock.patch.object(rotate_quantize, "_rotate_quantize_kernel", _NoLaunch()), \
            mock.patch.object(tuning, "device_arch", lambda device: arch), \
            mock.patch.object(gemm, "use_triton", kernels), \
            mock.patch.object(rotate_quantize, "use_triton", kernels), \
            mock.patch.object(quant_linear, "use_triton", kernels), \
            mock.patch.object(_runtime, "INTERPRET", False):  # what interpreter_on() reads
        yield
