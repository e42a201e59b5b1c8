"""Module and model benchmarks: QuantLinear vs nn.Linear, a whole DiT forward, memory."""

import contextlib
import copy

import pytest
import torch
from torch import nn

import clq_triton
from clq_triton import QuantConfig, QuantLinear
from bench_utils import (CUDA, DEVICE, DTYPE, GEMM_SHAPES, pixart_model, run, shape_id,
                         stubbed_kernels)

LINEAR_SHAPES = GEMM_SHAPES[:4] if CUDA else GEMM_SHAPES[:1]
KINDS = ["nn.Linear", "w4a4", "w4a4-g128", "w4a4-g64", "w4a8", "w8a8"]


def quant_layer(lin, kind):
    """nn.Linear → QuantLinear for a kind like "w4a4" (per channel) or "w4a4-g128"."""
    bits, _, group = kind.partition("-g")
    return QuantLinear.from_linear(lin, QuantConfig.from_bits(
        bits, group_size=int(group) if group else None, hadamard_block=128))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=shape_id)
def test_linear(benchmark, info, shape, kind):
    m, k, n = shape
    lin = nn.Linear(k, n).to(DEVICE, DTYPE)
    layer = lin if kind == "nn.Linear" else quant_layer(lin, kind)
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        t = run(benchmark, lambda: layer(x))
    info.update(M=m, K=k, N=n, layer=kind, TOPS=round(2 * m * n * k / t / 1e12, 3))


def _pixart():
    """PixArt-Σ-sized transformer (28 blocks, 4096 tokens) on CUDA; a 2-block toy on CPU."""
    return pixart_model(CUDA, DEVICE, DTYPE)


@pytest.mark.parametrize("kind", ["fp", "w4a4", "w4a4-g128", "w4a8", "w8a8"])
def test_transformer_forward(benchmark, info, kind):
    model, inputs = _pixart()
    if kind != "fp":
        bits, _, group = kind.partition("-g")
        clq_triton.patch(model, QuantConfig.from_bits(
            bits, group_size=int(group) if group else None), progress=False)
    with torch.no_grad():
        run(benchmark, lambda: model(**inputs), rounds=5)
    info.update(model="PixArt-Σ-sized" if CUDA else "PixArt toy", kind=kind)


def test_memory_report(benchmark, info):
    """Weight bytes and (on CUDA) peak forward memory, FP vs W4A4."""
    fp, inputs = _pixart()
    q = copy.deepcopy(fp)
    report = clq_triton.patch(q, "w4a4", progress=False)

    def weight_bytes(m):
        return sum(t.numel() * t.element_size()
                   for t in list(m.parameters()) + list(m.buffers()))

    def peak(m):
        if not CUDA:
            return None
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            m(**inputs)
        return torch.cuda.max_memory_allocated()

    with torch.no_grad():
        run(benchmark, lambda: q(**inputs), rounds=3)
    info.update(fp_model_bytes=weight_bytes(fp), w4a4_model_bytes=weight_bytes(q),
                quantized_layers_fp_bytes=report.fp_weight_bytes,
                quantized_layers_w4a4_bytes=report.quant_weight_bytes,
                layer_ratio=round(report.weight_ratio, 4), fp_peak_bytes=peak(fp),
                w4a4_peak_bytes=peak(q))


@pytest.mark.parametrize("kind", ["nn.Linear", "w4a4", "w4a4-g128", "w4a4-int8", "w8a8"])
def test_host_overhead(benchmark, info, kind):
    """Host time per layer call with the GPU's work taken out, the same on every machine: a
    QuantLinear (PixArt-Σ's 1152 → 4608 at 4096 tokens, bf16) on CPU tensors with the
    package's launch path and every Triton launch a no-op (bench_utils.stubbed_kernels):
    checks, both operators' dispatch and implementations, launch plans and config lookups —
    all a GPU call runs on the host except Triton's own launcher (tens of µs per launch;
    CUDA graphs remove both). The nn.Linear row is a 64 → 64 layer on one CPU token: its
    dispatch plus a negligible matmul."""
    torch.set_num_threads(1)
    if kind == "nn.Linear":
        layer, x = nn.Linear(64, 64).to(torch.bfloat16), torch.randn(1, 64, dtype=torch.bfloat16)
        stub = contextlib.nullcontext()
    else:
        layer = quant_layer(nn.Linear(1152, 4608), kind.replace("-int8", "")).to(torch.bfloat16)
        if kind.endswith("-int8"):
            layer.use_int8_operands()
        x, stub = torch.empty(4096, 1152, dtype=torch.bfloat16), stubbed_kernels()
    with torch.inference_mode(), stub:
        layer(x)
        benchmark(layer, x)
    stats = benchmark.stats
    info.update(layer=kind, path="stubbed launches" if kind != "nn.Linear" else "cpu",
                us_per_call=round(stats.stats.median * 1e6, 2) if stats else None)
