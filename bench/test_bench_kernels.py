"""Kernel benchmarks: fused rotate+quantize (GB/s) and quantized GEMMs vs torch (TOPS)."""

import pytest
import torch

from clq_triton.kernels.gemm import quant_matmul
from clq_triton.kernels.rotate_quantize import rotate_quantize
from bench_utils import CUDA, DEVICE, DTYPE, GEMM_SHAPES, run, shape_id

GROUP = 64


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [None, 64, 128])
@pytest.mark.parametrize("shape", GEMM_SHAPES[: 6 if CUDA else 1], ids=shape_id)
def test_rotate_quantize(benchmark, info, shape, block, bits):
    m, k, _ = shape
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    perm = torch.randperm(k, device=DEVICE)
    t = run(benchmark, lambda: rotate_quantize(x, perm, block, GROUP, bits))
    moved = m * k * x.element_size() + m * k * bits // 8 + m * (k // GROUP) * 4
    info.update(M=m, K=k, hadamard_block=block, bits=bits, GBps=round(moved / t / 1e9, 2))


def _quantized_operands(m, n, k, a_bits, w_bits):
    def codes(rows, bits):
        if bits == 4:
            return torch.randint(0, 256, (rows, k // 2), device=DEVICE, dtype=torch.uint8)
        return torch.randint(-127, 128, (rows, k), device=DEVICE, dtype=torch.int8)
    xs = torch.rand(m, k // GROUP, device=DEVICE)
    ws = torch.rand(n, k // GROUP, device=DEVICE).half()
    return codes(m, a_bits), xs, codes(n, w_bits), ws


@pytest.mark.parametrize("bits", ["w4a4", "w4a8", "w8a8"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=shape_id)
def test_quant_matmul(benchmark, info, shape, bits):
    m, k, n = shape
    w_bits, a_bits = int(bits[1]), int(bits[3])
    xq, xs, wq, ws = _quantized_operands(m, n, k, a_bits, w_bits)
    t = run(benchmark, lambda: quant_matmul(xq, xs, wq, ws, None, a_bits, w_bits, GROUP, DTYPE))
    info.update(M=m, K=k, N=n, bits=bits, group=GROUP, TOPS=round(2 * m * n * k / t / 1e12, 3))


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=shape_id)
def test_torch_matmul_baseline(benchmark, info, shape):
    m, k, n = shape
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE)
    t = run(benchmark, lambda: x @ w.T)
    info.update(M=m, K=k, N=n, op=f"torch.matmul {DTYPE}", TOPS=round(2 * m * n * k / t / 1e12, 3))


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=shape_id)
def test_torch_int_mm_baseline(benchmark, info, shape):
    m, k, n = shape
    a = torch.randint(-127, 128, (m, k), device=DEVICE, dtype=torch.int8)
    b = torch.randint(-127, 128, (k, n), device=DEVICE, dtype=torch.int8)
    try:
        torch._int_mm(a, b)
    except (RuntimeError, AttributeError) as e:
        pytest.skip(f"torch._int_mm unavailable here: {e}")
    t = run(benchmark, lambda: torch._int_mm(a, b))
    info.update(M=m, K=k, N=n, op="torch._int_mm int8", TOPS=round(2 * m * n * k / t / 1e12, 3))
