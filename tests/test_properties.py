"""Inputs nobody planned for (hypothesis): random shapes, dtypes, group sizes, Hadamard
blocks, outlier channels, zero rows and NaN/Inf, checked against the references."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from clq_triton import QuantConfig, QuantLinear, backend
from clq_triton.kernels.formats import BIT_PAIRS, pack_codes
from clq_triton.kernels.gemm import quant_matmul
from clq_triton.kernels.rotate_quantize import rotate_quantize
from helpers import dequant64, explicit_rotation, unpack64

SETTINGS = settings(max_examples=25, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])  # stateless
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def layouts(draw):
    """(M, K, Hadamard block, group size) that the format allows."""
    k = 64 * draw(st.integers(1, 8))
    blocks = [None] + [b for b in (16, 32, 64, 128, 256, 512) if k % b == 0]
    groups = [None] + [g for g in (64, 128, 256) if k % g == 0]
    return draw(st.integers(1, 40)), k, draw(st.sampled_from(blocks)), draw(st.sampled_from(groups))


@st.composite
def activations(draw, m, k, dtype):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    n_out = draw(st.integers(0, 3))
    if n_out:  # outlier channels, up to 1e4× (fp16 stays finite: < 65504)
        cols = torch.randperm(k, generator=g)[:n_out]
        x[:, cols] *= draw(st.sampled_from([10.0, 100.0, 1e3]))
    if m > 1 and draw(st.booleans()):
        x[draw(st.integers(0, m - 1))] = 0.0
    if draw(st.booleans()):
        x[draw(st.integers(0, m - 1)), draw(st.integers(0, k - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return x.to(dtype), g


@SETTINGS
@given(data=st.data(), layout=layouts(), dtype=st.sampled_from(DTYPES),
       bits=st.sampled_from([4, 8]), use_perm=st.booleans(), use_cs=st.booleans(),
       use_sh=st.booleans())
def test_rotate_quantize_kernel_vs_reference(kernel_device, data, layout, dtype, bits, use_perm,
                                             use_cs, use_sh):
    m, k, block, group = layout
    x, g = data.draw(activations(m, k, dtype))
    perm = torch.randperm(k, generator=g) if use_perm else None
    cs = torch.rand(k, generator=g) + 0.5 if use_cs else None
    sh = torch.randn(k, generator=g) * 4 if use_sh else None
    dev = kernel_device
    q, s = rotate_quantize(x.to(dev), perm.to(dev) if use_perm else None, block, group, bits,
                           channel_scale=cs.to(dev) if use_cs else None,
                           channel_shift=sh.to(dev) if use_sh else None)
    with backend("torch"):
        qr, sr = rotate_quantize(x, perm, block, group, bits, channel_scale=cs,
                                 channel_shift=sh)
    s, q = s.cpu(), q.cpu()
    assert torch.equal(torch.isnan(s), torch.isnan(sr))  # the same groups are poisoned
    torch.testing.assert_close(s, sr, rtol=1e-5, atol=1e-30, equal_nan=True)
    codes = unpack64(q) if bits == 4 else q.long()
    codes_r = unpack64(qr) if bits == 4 else qr.long()
    diff = (codes - codes_r).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01  # rounding ties only
    # clean rows: within half a step of the exact float64 rotation
    clean = torch.isfinite(x.double()).all(1)
    if clean.any():
        xd = (x.double() - (sh.double() if use_sh else 0.0)) * (cs.double() if use_cs else 1.0)
        exact = xd[clean] @ explicit_rotation(k, perm, block)
        step = dequant64(torch.ones_like(codes[clean]), s[clean])
        err = (dequant64(codes[clean], s[clean]) - exact).abs()
        assert (err <= step * 0.5 * (1 + 1e-3) + step * (diff[clean] > 0) + 1e-9).all()


@SETTINGS
@given(data=st.data(), bits=st.sampled_from(BIT_PAIRS), m=st.integers(1, 40),
       n=st.integers(1, 70), kt=st.integers(1, 6), group=st.sampled_from([None, 64, 128, 256]))
def test_gemm_integer_exact_in_every_mode(kernel_device, data, bits, m, n, kt, group):
    w_bits, a_bits = bits
    k = 64 * kt
    if group and k % group:
        group = None
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    qa, qw = (7 if a_bits == 4 else 127), (7 if w_bits == 4 else 127)
    a = torch.randint(-qa, qa + 1, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-qw, qw + 1, (n, k), generator=g, dtype=torch.int8)
    ng = k // group if group else 1
    wz = (torch.randint(1, 17, (n, ng), generator=g, dtype=torch.uint8)
          if w_bits == 4 and group else None)
    xs = 2.0 ** torch.randint(-3, 3, (m, ng), generator=g).float()  # exact products
    ws = 2.0 ** torch.randint(-3, 3, (n,), generator=g).float()
    dev = kernel_device
    y = quant_matmul(*[t.to(dev) if t is not None else None for t in (
        pack_codes(a, a_bits), xs, pack_codes(b, w_bits), ws, wz)], None, a_bits, w_bits,
        group, torch.float32).cpu()
    w = b.double() * (wz.double().repeat_interleave(group, 1) if wz is not None else 1.0)
    exact = (a.double() * xs.double().repeat_interleave(k // ng, 1)) @ w.T * ws.double()
    assert torch.equal(y.double(), exact)


@SETTINGS
@given(data=st.data(), layout=layouts(), dtype=st.sampled_from(DTYPES),
       bits=st.sampled_from(BIT_PAIRS), n=st.integers(1, 48), use_perm=st.booleans())
def test_quant_linear_computes_with_its_dequantized_weight(kernel_device, data, layout, dtype,
                                                           bits, n, use_perm):
    """y = Q(x·G) · (Ŵ·G)ᵀ + b, with Ŵ = the layer's dequantized weight and Q(x·G) the
    activation codes of the fused kernel (checked against its reference above)."""
    m, k, block, group = layout
    w_bits, a_bits = bits
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / math.sqrt(k))
    perm = torch.randperm(k, generator=g) if use_perm else None
    layer = QuantLinear.from_linear(lin, QuantConfig(w_bits=w_bits, a_bits=a_bits,
                                                     group_size=group, hadamard_block=block),
                                    perm=perm).to(kernel_device)
    x = torch.randn(m, k, generator=g).to(dtype)
    y = layer(x.to(kernel_device)).cpu()
    assert y.dtype == dtype and y.shape == (m, n)
    q, s = rotate_quantize(x.to(kernel_device), layer.perm, layer.config.hadamard_block, group,
                           a_bits)
    q, s = q.cpu(), s.cpu()
    codes = unpack64(q) if a_bits == 4 else q.long()
    x_hat = dequant64(codes, s)  # in the rotated basis
    w_rot = layer.cpu().dequantized_weight().double() @ explicit_rotation(
        k, perm, layer.config.hadamard_block)
    expect = x_hat @ w_rot.T + lin.bias.double()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    err = (y.double() - expect).norm() / expect.norm().clamp_min(1e-12)
    assert err < tol  # the output dtype's rounding


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quant_linear_rejects_non_finite_weights(bad):
    lin = nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight[3, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantLinear.from_linear(lin)
