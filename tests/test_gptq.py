"""GPTQ weight rounding against an independent float64 reference, and against RTN."""

import pytest
import torch

from clq_triton.gptq import factor_hessian, gptq_weight, transform_hessian
from clq_triton.kernels.formats import qmax_for
from clq_triton.kernels.hadamard import rotate_ref
from clq_triton.kernels.quantize import dequantize_weight_ref, quantize_weight_ref

MODES = [(4, 64), (4, 128), (4, None), (8, None)]


def _inputs(m, k, gen, outliers):
    x = torch.randn(m, k, generator=gen, dtype=torch.float64)
    if outliers:  # a few channels 30x larger and a per-channel offset, as in DiT activations
        x[:, torch.randperm(k, generator=gen)[:6]] *= 30
        x += torch.randn(k, generator=gen, dtype=torch.float64) * 2
    return x


def naive_gptq(w, h, group_size, bits, damp=0.01):
    """GPTQ in its sequential form: quantize column i, spread its error over the later
    columns through the inverse Hessian, then drop row and column i from that inverse."""
    _, scale, gint = quantize_weight_ref(w, group_size, bits)
    n, k = w.shape
    step = scale.double()[:, None].expand(n, k).clone()
    if gint is not None:
        step *= gint.double().repeat_interleave(group_size, 1)
    W, H = w.double().clone(), h.double().clone()
    H += damp * torch.diagonal(H).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(H)
    q = torch.zeros_like(W)
    for i in range(k):
        r = W[:, i] / step[:, i]
        q[:, i] = torch.sign(r) * torch.clamp(torch.floor(r.abs() + 0.5), max=qmax_for(bits))
        err = (W[:, i] - q[:, i] * step[:, i]) / hinv[i, i]
        W[:, i + 1:] -= err[:, None] * hinv[i, i + 1:][None, :]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return q.to(torch.int8), scale, gint


@pytest.mark.parametrize("bits, group", MODES)
def test_blocked_gptq_matches_the_sequential_reference(gen, bits, group):
    w = torch.randn(24, 256, generator=gen)
    x = _inputs(300, 256, gen, outliers=True)
    h = x.T @ x
    want = naive_gptq(w, h, group, bits)
    for block in (128, 7):  # lazy batches of any width give the same codes
        got = gptq_weight(w, h, group, bits, block=block)
        assert torch.equal(got[0], want[0]), block
        assert torch.equal(got[1], want[1])
        assert (got[2] is None and want[2] is None) or torch.equal(got[2], want[2])


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("bits, group", MODES)
def test_gptq_beats_round_to_nearest_every_time(gen, bits, group, outliers):
    """||X·Wᵀ − X·Ŵᵀ|| on the calibration inputs is lower with GPTQ's codes than with RTN's
    (same scales), on every one of 5 random layers."""
    for _ in range(5):
        w = torch.randn(32, 256, generator=gen) / 16
        x = _inputs(512, 256, gen, outliers)
        codes, scale, gint = quantize_weight_ref(w, group, bits)
        rtn = dequantize_weight_ref(codes, scale, gint).double()
        g_codes, g_scale, g_gint = gptq_weight(w, x.T @ x, group, bits)
        gptq = dequantize_weight_ref(g_codes, g_scale, g_gint).double()
        ref = x @ w.double().T
        e_rtn, e_gptq = (x @ rtn.T - ref).norm(), (x @ gptq.T - ref).norm()
        assert e_gptq < e_rtn, (float(e_gptq), float(e_rtn))


def test_dead_input_channels_get_zero_codes(gen):
    w = torch.randn(8, 128, generator=gen)
    x = _inputs(64, 128, gen, outliers=False)
    x[:, 5] = 0  # never active: no information about its column
    codes, _, _ = gptq_weight(w, x.T @ x, 64, 4)
    assert (codes[:, 5] == 0).all()


@pytest.mark.parametrize("block", [None, 64, 256])
def test_transform_hessian_is_the_hessian_of_the_transformed_inputs(gen, block):
    k = 256
    x = _inputs(200, k, gen, outliers=True)
    shift = torch.randn(k, generator=gen)
    scale = torch.rand(k, generator=gen) + 0.5
    perm = torch.randperm(k, generator=gen).int()
    xt = rotate_ref((x - shift.double()) * scale.double(), perm, block)
    want = xt.T @ xt
    got = transform_hessian(x.T @ x, x.sum(0), x.shape[0], shift, scale, perm, block)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("bits, group", MODES[:2])
def test_a_hessian_factor_gives_the_codes_of_its_hessian(gen, bits, group):
    """gptq_weight with factor_hessian(H) is bit for bit gptq_weight with H, at every clip (the
    factor is what CLPS reuses across its candidates); a factor of another width is refused."""
    w = torch.randn(16, 256, generator=gen)
    x = _inputs(320, 256, gen, outliers=True)
    x[:, 3] = 0  # a dead column: the factor carries it
    h = x.T @ x
    f = factor_hessian(h)
    for clip in (1.0, 0.85):
        got, want = gptq_weight(w, f, group, bits, clip), gptq_weight(w, h, group, bits, clip)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, want))
    assert (got[0][:, 3] == 0).all()
    with pytest.raises(ValueError, match="256 columns"):
        gptq_weight(w, factor_hessian(h[:128, :128]), group, bits)


def test_clip_search_factors_each_hessian_once(pipe_and_data, monkeypatch):
    """CLQ+GPTQ's CLPS quantizes each layer once per weight clip, with one Hessian factor per
    layer (the three O(K³) steps do not depend on the clip)."""
    import copy

    import clq_triton
    import clq_triton.calibrate as cal

    pipe, data = pipe_and_data
    calls = []
    monkeypatch.setattr(cal, "factor_hessian",
                        lambda h, **kw: calls.append(1) or factor_hessian(h, **kw))
    with clq_triton.backend("torch"):  # the kernels are not under test
        report = clq_triton.patch(copy.deepcopy(pipe.transformer), "w4a4", clq_triton.CLQ(
            gptq=True, w_clip_grid=(1.0, 0.9, 0.8), a_clip_grid=(1.0,)), data, progress=False)
    assert len(calls) == len(report.quantized)


def test_channel_statistics_hessian_is_exact_under_large_channel_means(gen):
    """ChannelRange(gram=True) + transform_hessian against Σ (x − δ)ᵀ(x − δ) in float64 when
    a few channels carry an offset of +200…+1000 (a DiT's adaLN shift), over several calls:
    the raw float32 Gram lost the spread to rounding and GPTQ's Cholesky failed."""
    from torch import nn

    from clq_triton.smoothing import ChannelRange

    k = 128
    lin = nn.Linear(k, 8)
    offset = torch.zeros(k)
    offset[torch.randperm(k, generator=gen)[:5]] = 200 + 800 * torch.rand(5, generator=gen)
    xs = [torch.randn(4, 257, k, generator=gen) + offset * (1 + 0.01 * i) for i in range(3)]
    stats = ChannelRange({"l": lin}, gram=True)
    for x in xs:
        lin(x)
    stats.close()
    x = torch.cat(xs).reshape(-1, k).double()
    shift = stats.mean["l"]
    xc = x - shift.double()
    want = xc.T @ xc
    got = transform_hessian(stats.gram["l"], stats.total["l"], stats.rows["l"], shift, None,
                            None, None)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.diagonal().min()))
    factor_hessian(got)  # positive definite


def test_damping_escalates_then_the_failure_names_the_layer(pipe_and_data, monkeypatch):
    """An indefinite Hessian is factored with more damping; one that no damping fixes raises
    a ValueError that names the layer, and patch() rolls back."""
    import copy

    import clq_triton
    import clq_triton.calibrate as cal

    h = torch.eye(64, dtype=torch.float64)
    h[0, 0] = -0.05  # needs damping > 5 % of the mean diagonal
    f = factor_hessian(h)
    assert torch.isfinite(f.upper).all()
    with pytest.raises(ValueError, match="not positive definite"):
        factor_hessian(torch.full((8, 8), float("nan"), dtype=torch.float64))
    pipe, data = pipe_and_data
    model = copy.deepcopy(pipe.transformer)
    monkeypatch.setattr(cal, "transform_hessian", lambda g, *a: g * float("nan"))
    with clq_triton.backend("torch"), pytest.raises(ValueError, match="GPTQ on layer "
                                                                      "transformer_blocks.0."):
        clq_triton.patch(model, "w4a8", clq_triton.CLQ(gptq=True, clps=False), data,
                         progress=False)
    assert not any(isinstance(m, clq_triton.QuantLinear) for m in model.modules())
