"""Kernel benchmarks: fused rotate+quantize (GB/s, vs a copy) and quantized GEMMs in each
scale mode vs torch bf16, FP8 ``torch._scaled_mm`` and INT8 ``torch._int_mm`` (TOPS)."""

import pytest
import torch

from clq_triton.kernels.gemm import quant_matmul
from clq_triton.kernels.rotate_quantize import rotate_quantize
from bench_utils import CUDA, DEVICE, DTYPE, GEMM_SHAPES, GROUPS, run, shape_id

ROTATE_SHAPES = sorted({(m, k) for m, k, _ in GEMM_SHAPES})[: 4 if CUDA else 1]


def _gid(g):
    return f"g{g}" if g else "per-channel"


@pytest.mark.parametrize("group", GROUPS, ids=_gid)
@pytest.mark.parametrize("block", [None, 64, 128])
@pytest.mark.parametrize("shape", ROTATE_SHAPES, ids=lambda s: "M{}-K{}".format(*s))
def test_rotate_quantize(benchmark, info, shape, block, group):
    m, k = shape
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    perm = torch.randperm(k, device=DEVICE)
    t = run(benchmark, lambda: rotate_quantize(x, perm, block, group, 4))
    moved = m * k * x.element_size() + m * k // 2 + m * (k // group if group else 1) * 4
    info.update(M=m, K=k, hadamard_block=block, group=group, bits=4,
                GBps=round(moved / t / 1e9, 2))


@pytest.mark.parametrize("shape", ROTATE_SHAPES, ids=lambda s: "M{}-K{}".format(*s))
def test_copy_baseline(benchmark, info, shape):
    """What a plain read + write of x moves: the bandwidth the rotate kernel is held to."""
    m, k = shape
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    y = torch.empty_like(x)
    t = run(benchmark, lambda: y.copy_(x))
    info.update(M=m, K=k, op="copy", GBps=round(2 * x.numel() * x.element_size() / t / 1e9, 2))


def quantized_operands(m, n, k, a_bits, w_bits, group):
    """Random codes and scales in the kernel's layouts (kernels.formats)."""
    def codes(rows, bits):
        if bits == 4:
            return torch.randint(0, 256, (rows, k // 2), device=DEVICE, dtype=torch.uint8)
        return torch.randint(-127, 128, (rows, k), device=DEVICE, dtype=torch.int8)
    ng = k // group if group else 1
    xs = torch.rand(m, ng, device=DEVICE)
    ws = torch.rand(n, device=DEVICE)
    wz = (torch.randint(1, 17, (n, ng), device=DEVICE, dtype=torch.uint8)
          if w_bits == 4 and group else None)
    return codes(m, a_bits), xs, codes(n, w_bits), ws, wz


@pytest.mark.parametrize("group", GROUPS, ids=_gid)
@pytest.mark.parametrize("bits", ["w4a4", "w4a8", "w8a8"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=shape_id)
def test_quant_matmul(benchmark, info, shape, bits, group):
    m, k, n = shape
    w_bits, a_bits = int(bits[1]), int(bits[3])
    xq, xs, wq, ws, wz = quantized_operands(m, n, k, a_bits, w_bits, group)
    t = run(benchmark, lambda: quant_matmul(xq, xs, wq, ws, wz, None, a_bits, w_bits, group,
                                            DTYPE))
    info.update(M=m, K=k, N=n, bits=bits, group=group, TOPS=round(2 * m * n * k / t / 1e12, 3))


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


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=shape_id)
def test_torch_fp8_scaled_mm_baseline(benchmark, info, shape):
    """FP8 W8A8 with row-wise scales: the tensor-core rate a W4A4 kernel competes with."""
    m, k, n = shape
    if not CUDA or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 _scaled_mm needs an sm_89+ GPU")
    a = torch.randn(m, k, device=DEVICE).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, device=DEVICE).to(torch.float8_e4m3fn).T
    sa = torch.rand(m, 1, device=DEVICE)
    sb = torch.rand(1, n, device=DEVICE)
    t = run(benchmark, lambda: torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16))
    info.update(M=m, K=k, N=n, op="torch._scaled_mm fp8 rowwise",
                TOPS=round(2 * m * n * k / t / 1e12, 3))
