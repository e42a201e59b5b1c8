import pytest
import torch

from clq_triton.kernels.gemm import quant_matmul
from clq_triton.kernels.quantize import pack_int4_ref
from helpers import TOL, dequant64

COMBOS = [(4, 4), (8, 4), (8, 8), (4, 8)]  # (a_bits, w_bits)


def _operands(m, n, k, a_bits, w_bits, gen):
    qa, qw = (7 if a_bits == 4 else 127), (7 if w_bits == 4 else 127)
    a = torch.randint(-qa, qa + 1, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-qw, qw + 1, (n, k), generator=gen, dtype=torch.int8)
    xq = pack_int4_ref(a) if a_bits == 4 else a
    wq = pack_int4_ref(b) if w_bits == 4 else b
    return a, b, xq, wq


@pytest.mark.parametrize("a_bits, w_bits", COMBOS)
@pytest.mark.parametrize("m, n, k, group", [(1, 48, 64, 32), (17, 64, 256, 64),
                                             (3, 33, 256, 256), (100, 96, 128, 128)])
def test_gemm_integer_sums_exact(kernel_device, a_bits, w_bits, m, n, k, group, gen):
    """With unit / power-of-two scales the fp32 result must equal the exact integer product."""
    a, b, xq, wq = _operands(m, n, k, a_bits, w_bits, gen)
    xs = torch.ones(m, k // group)
    ws = torch.full((n, k // group), 0.25, dtype=torch.float16)
    out = torch.full((m, n), float("nan"), device=kernel_device)
    y = quant_matmul(xq.to(kernel_device), xs.to(kernel_device), wq.to(kernel_device),
                     ws.to(kernel_device), None, a_bits, w_bits, group, torch.float32, out=out)
    assert y.data_ptr() == out.data_ptr()
    exact = (a.long() @ b.long().T).double() * 0.25
    assert torch.equal(y.cpu().double(), exact)


@pytest.mark.parametrize("a_bits, w_bits", COMBOS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17, 1000])
def test_gemm_scaled_matches_float64(kernel_device, a_bits, w_bits, out_dtype, m, gen):
    n, k, group = 40, 128, 64
    a, b, xq, wq = _operands(m, n, k, a_bits, w_bits, gen)
    xs = torch.rand(m, k // group, generator=gen) + 0.01
    ws = (torch.rand(n, k // group, generator=gen) * 0.1).to(torch.float16)
    bias = torch.randn(n, generator=gen).to(out_dtype)
    dev = kernel_device
    y = quant_matmul(xq.to(dev), xs.to(dev), wq.to(dev), ws.to(dev), bias.to(dev), a_bits, w_bits,
                     group, out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    expect = dequant64(a, xs, group) @ dequant64(b, ws, group).T + bias.double()
    scale = expect.abs().max().item()
    torch.testing.assert_close(y.cpu().double(), expect, rtol=TOL[out_dtype],
                               atol=TOL[out_dtype] * scale)


def test_gemm_nan_scale_poisons_only_its_row(kernel_device, gen):
    a, b, xq, wq = _operands(4, 32, 64, 4, 4, gen)
    xs = torch.ones(4, 2)
    xs[2, 1] = float("nan")
    ws = torch.ones(32, 2, dtype=torch.float16)
    dev = kernel_device
    y = quant_matmul(xq.to(dev), xs.to(dev), wq.to(dev), ws.to(dev), None, 4, 4, 32,
                     torch.float32).cpu()
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3]]).all()


def test_gemm_reference_backend_agrees(kernel_device, monkeypatch, gen):
    a, b, xq, wq = _operands(9, 24, 128, 4, 4, gen)
    xs, ws = torch.rand(9, 2, generator=gen), torch.rand(24, 2, generator=gen).half()
    dev = kernel_device
    yk = quant_matmul(xq.to(dev), xs.to(dev), wq.to(dev), ws.to(dev), None, 4, 4, 64,
                      torch.float32)
    monkeypatch.setenv("CLQ_BACKEND", "torch")
    yr = quant_matmul(xq, xs, wq, ws, None, 4, 4, 64, torch.float32)
    torch.testing.assert_close(yk.cpu(), yr, rtol=1e-5, atol=1e-4)  # fp32 dequantized matmul


def test_gemm_empty_m(kernel_device):
    xq = torch.empty(0, 32, dtype=torch.uint8, device=kernel_device)
    wq = torch.zeros(8, 32, dtype=torch.uint8, device=kernel_device)
    y = quant_matmul(xq, torch.empty(0, 1, device=kernel_device), wq,
                     torch.ones(8, 1, dtype=torch.float16, device=kernel_device), None, 4, 4, 64)
    assert y.shape == (0, 8)


def _args(**over):
    args = dict(xq=torch.zeros(4, 32, dtype=torch.uint8), xs=torch.ones(4, 1),
                wq=torch.zeros(8, 32, dtype=torch.uint8), ws=torch.ones(8, 1, dtype=torch.float16),
                bias=None, a_bits=4, w_bits=4, group_size=64)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, err, match",
    [
        (dict(xq=torch.zeros(4, 32, dtype=torch.int8)), TypeError, "xq must be torch.uint8"),
        (dict(wq=torch.zeros(8, 16, dtype=torch.uint8)), ValueError, "K=64 but weights have K=32"),
        (dict(xs=torch.ones(4, 2)), ValueError, "scales must be"),
        (dict(xs=torch.ones(4, 1, dtype=torch.float16)), TypeError, "xs must be torch.float32"),
        (dict(group_size=48), ValueError, "group_size must be"),
        (dict(a_bits=2), ValueError, "a_bits must be 4 or 8"),
        (dict(bias=torch.zeros(7)), ValueError, "bias must have 8"),
        (dict(bias=torch.zeros(8, device="meta")), ValueError, "one device"),
    ],
)
def test_gemm_errors(over, err, match):
    with pytest.raises(err, match=match):
        quant_matmul(**_args(**over))
