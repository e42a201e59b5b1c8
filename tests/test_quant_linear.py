import contextlib
import copy
import json
import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from clq_triton import QuantConfig, QuantLinear
from helpers import explicit_rotation


def _linear(k, n, gen, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return lin.to(dtype)


def _activations(m, k, gen, outliers=True):
    x = torch.randn(m, k, generator=gen)
    if outliers:  # a few channels 30× larger, as in DiT activations
        x[:, torch.randperm(k, generator=gen)[:4]] *= 30
    return x


def rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


# Bounds on ||Y - Y_fp|| / ||Y_fp|| for Gaussian weights, activations with 4 outlier channels.
ERROR_BOUNDS = {"w8a8": 0.02, "w4a8": 0.15, "w4a4": 0.25}


@pytest.mark.parametrize("group", [64, 128, None])
@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w4a4"])
def test_end_to_end_error_vs_fp_layer(device, bits, group, gen):
    k, n = 256, 96
    lin = _linear(k, n, gen)
    x = _activations(33, k, gen)
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    cfg = QuantConfig.from_bits(bits, group_size=group, hadamard_block=64)
    q = QuantLinear.from_linear(lin, cfg).to(device)
    err = rel_err(q(x.to(device)).cpu(), ref)
    print(f"{bits} g{group} H64 relative error vs FP: {err:.4f}")
    assert err < ERROR_BOUNDS[bits] * (1.3 if group is None else 1.0)


def test_hadamard_lowers_w4a4_error_on_outliers(device, gen):
    k, n = 256, 64
    lin = _linear(k, n, gen)
    x = _activations(64, k, gen)
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    errs = {}
    for block in (None, 256):
        q = QuantLinear.from_linear(lin, QuantConfig(hadamard_block=block)).to(device)
        errs[block] = rel_err(q(x.to(device)).cpu(), ref)
    print(f"w4a4 error: RTN {errs[None]:.4f}, Hadamard-256 {errs[256]:.4f}")
    assert errs[256] < errs[None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_matches_explicit_dequantized_math(device, dtype, gen):
    """y == Q(x·G)·Q(W·G)ᵀ + b, with G dense float64 and the quantized values from the layer."""
    k, n = 128, 40
    lin = _linear(k, n, gen, dtype=dtype)
    perm = torch.randperm(k, generator=gen)
    q = QuantLinear.from_linear(lin, QuantConfig(hadamard_block=32), perm=perm).to(device)
    x = _activations(5, k, gen).to(dtype)
    y = q(x.to(device))
    assert y.dtype == dtype and y.shape == (5, n)
    g = explicit_rotation(k, perm, 32)
    xr = x.double() @ g
    # quantize xr per token per group of 64 with the same rule, in float64
    grp = xr.reshape(5, 2, 64)
    s = grp.abs().amax(-1, keepdim=True) / 7
    xq = (torch.floor(grp.abs() / s + 0.5).clamp(max=7) * grp.sign() * s).reshape(5, k)
    w_hat = q.dequantized_weight().double().cpu() @ g  # back in the rotated basis
    expect = xq @ w_hat.T + lin.bias.double()
    tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    # rare rounding ties may flip one activation code by one step
    assert rel_err(y.cpu(), expect) < tol * 5


def test_dequantized_weight_close_and_memory_ratio(gen):
    k, n = 1152, 128
    lin = _linear(k, n, gen)
    for group, bound in ((64, 0.262), (128, 0.256), (None, 0.252)):
        q = QuantLinear.from_linear(lin, QuantConfig(group_size=group, hadamard_block=128))
        ratio = q.weight_nbytes() / (n * k * 2)
        print(f"W4 g{group}: weight bytes {q.weight_nbytes()} = {ratio:.4f}× bf16")
        assert ratio <= bound
        assert rel_err(q.dequantized_weight(), lin.weight) < 0.15


def test_state_dict_roundtrip(device, gen):
    lin = _linear(128, 48, gen)
    cfg = QuantConfig(w_bits=4, a_bits=8, group_size=64, hadamard_block=128, a_clip=0.9)
    q = QuantLinear.from_linear(lin, cfg, perm=torch.randperm(128, generator=gen)).to(device)
    sd = q.state_dict()
    fresh = QuantLinear(128, 48, config=QuantConfig(w_bits=4, group_size=64, hadamard_block=128),
                        has_perm=True).to(device)
    fresh.load_state_dict(sd)
    assert fresh.config == cfg
    x = torch.randn(7, 128, generator=gen).to(device)
    assert torch.equal(fresh(x), q(x))


def test_state_dict_mismatch_is_clear(gen):
    q = QuantLinear.from_linear(_linear(128, 48, gen), QuantConfig())
    other = QuantLinear(128, 48, config=QuantConfig(w_bits=8, a_bits=8))
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|w8a8|w4a4"):
        other.load_state_dict(q.state_dict())


def test_format_1_state_is_refused_clearly(gen):
    """A layer saved by clq-triton 0.1 (interleaved nibbles, fp16 group scales) must not load
    as garbage."""
    q = QuantLinear.from_linear(_linear(128, 48, gen), QuantConfig())
    sd = q.state_dict()
    old = json.loads(bytes(sd["_extra_state"].tolist()))
    del old["format"]
    sd["_extra_state"] = torch.tensor(list(json.dumps(old).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="weight format 1.*quantize the full-precision model"):
        QuantLinear(128, 48).load_state_dict(sd)


@pytest.mark.parametrize("which", ["kernel", "torch"])
def test_perm_checked_on_load_not_per_forward(monkeypatch, gen, which):
    import clq_triton
    import clq_triton.kernels.hadamard as hd
    import clq_triton.kernels.rotate_quantize as rq

    q = QuantLinear.from_linear(_linear(128, 48, gen), QuantConfig(),
                                perm=torch.randperm(128, generator=gen))
    sd = q.state_dict()
    sd["perm"] = sd["perm"].clone()
    sd["perm"][3] = sd["perm"][4]  # a duplicate: no longer a permutation
    with pytest.raises(ValueError, match="not a permutation"):
        QuantLinear(128, 48, has_perm=True).load_state_dict(sd)
    calls = []
    real = hd.check_perm
    for module in (rq, hd):  # the launcher's and the reference path's
        monkeypatch.setattr(module, "check_perm", lambda p, k, values=True: (
            calls.append(values), real(p, k, values)))
    with clq_triton.backend("auto" if which == "kernel" else "torch"):
        q(torch.randn(5, 128, generator=gen))
    assert calls == []  # forward does not validate perm, let alone read it back (a sync)


def test_nonfinite_input_gives_nan_rows_only(device, gen):
    q = QuantLinear.from_linear(_linear(64, 16, gen), QuantConfig()).to(device)
    x = torch.randn(4, 64, generator=gen)
    x[1, 3] = float("nan")
    x[2, 9] = float("inf")
    y = q(x.to(device)).cpu()
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 3]]).all()


def test_zero_input_gives_bias(device, gen):
    lin = _linear(64, 16, gen)
    q = QuantLinear.from_linear(lin, QuantConfig()).to(device)
    y = q(torch.zeros(3, 64, device=device)).cpu()
    torch.testing.assert_close(y, lin.bias.detach().expand(3, -1))


def test_batched_shapes_and_empty(device, gen):
    q = QuantLinear.from_linear(_linear(64, 16, gen, bias=False), QuantConfig()).to(device)
    assert q(torch.randn(2, 3, 5, 64, device=device)).shape == (2, 3, 5, 16)
    assert q(torch.randn(0, 64, device=device)).shape == (0, 16)


def test_errors(gen):
    lin = _linear(64, 16, gen)
    q = QuantLinear.from_linear(lin, QuantConfig())
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        q(torch.ones(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="in_features=64"):
        q(torch.randn(2, 32))
    with pytest.raises(ValueError, match="x is on meta"):
        q(torch.randn(2, 64, device="meta"))
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        QuantLinear.from_linear(_linear(192, 8, gen), QuantConfig(group_size=128))
    with pytest.raises(ValueError, match="not a positive multiple of 64"):
        QuantLinear.from_linear(_linear(96, 8, gen), QuantConfig(group_size=None))
    with pytest.raises(ValueError, match="Hadamard block"):
        QuantLinear.from_linear(_linear(64, 8, gen), QuantConfig(hadamard_block=128))
    bad = _linear(64, 8, gen)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantLinear.from_linear(bad, QuantConfig())
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1), QuantConfig())


class _OpsSeen(TorchFunctionMode):
    """Records the package's operators called through ``torch.ops`` (a direct call of their
    implementations, the eager fast path, records none)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("clq_triton."):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("group", [None, 64])
def test_eager_calls_skip_the_dispatcher_only_where_they_may(monkeypatch, group, gen):
    """A plain eager call runs the operators' implementations directly (~20 µs of dispatch
    each saved); an input that needs a gradient, an active dispatch mode, torch.jit.trace and
    ``CLQ_DIRECT_OPS=0`` go through ``torch.ops`` (torch.compile's tracing too:
    tests/test_torch_ops.py). Every route gives the same output, bit for bit."""
    from clq_triton.kernels import _runtime

    q = QuantLinear.from_linear(_linear(128, 32, gen), QuantConfig(group_size=group))
    x = torch.randn(2, 3, 128, generator=gen)
    both = ["clq_triton.rotate_quantize", "clq_triton.quant_matmul"]

    def call(x):
        seen = _OpsSeen()
        with seen:
            y = q(x)
        return seen.ops, y.detach()

    ops, want = call(x)
    assert ops == []
    with warnings.catch_warnings():  # torch.jit.trace is deprecated
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(q, x, check_trace=False)  # the operators, not their insides
    assert {"clq_triton::rotate_quantize", "clq_triton::quant_matmul"} <= {
        n.kind() for n in traced.graph.nodes()}
    assert torch.equal(traced(x), want)
    for route in ("grad", "mode", "off"):
        if route == "off":
            monkeypatch.setattr(_runtime, "DIRECT_OPS", False)
        with _PassThrough() if route == "mode" else contextlib.nullcontext():
            ops, y = call(x.clone().requires_grad_() if route == "grad" else x)
        # a "grad" call: the dispatcher's autograd fallback marks the activation pass's
        # float scales as needing a gradient too, so the GEMM takes the dispatcher as well
        assert ops == both, route
        assert torch.equal(y, want), route


@pytest.mark.parametrize("direct", [True, False])
def test_forward_checks_x_on_every_route(monkeypatch, direct, gen):
    """The hot path trusts the layer's buffers (checked when built or loaded) but not x: a
    wrong dtype, feature count, rank or device is a clear error, with or without the
    dispatcher, before anything runs."""
    from clq_triton.kernels import _runtime

    monkeypatch.setattr(_runtime, "DIRECT_OPS", direct)
    q = QuantLinear.from_linear(_linear(64, 16, gen), QuantConfig())
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32, got torch.int32"):
        q(torch.ones(2, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        q([[0.0] * 64])
    for bad in (torch.randn(2, 32), torch.randn(64, 2), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"x has shape .*expected \[\.\.\., in_features=64"):
            q(bad)
    with pytest.raises(ValueError, match="x is on meta but the QuantLinear weights are on cpu"):
        q(torch.randn(2, 64, device="meta"))
    assert q(torch.randn(3, 64, generator=gen).bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("kw, match", [
    (dict(w_bits=3), "w_bits"), (dict(w_bits=8, a_bits=4), "w8a4"),
    (dict(group_size=32), "group_size"), (dict(group_size=100), "group_size"),
    (dict(hadamard_block=24), "hadamard"), (dict(a_clip=0.0), "a_clip"),
    (dict(w_clip_segments=((8, 1.2),)), "clips must be"),
    (dict(w_clip_segments=((0, 0.9),)), "rows must be"),
    (dict(w_clip_segments=(0.9, 0.8)), "pairs")])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kw)
    with pytest.raises(ValueError, match="look like"):
        QuantConfig.from_bits("int4")


def test_channel_scale_is_exact_in_fp_and_matches_kernel(device, gen):
    """D folded into W (W·D⁻¹) and applied to x (x·D) leaves the FP product unchanged, and the
    kernel path (x·D rounded to x's dtype) agrees with the reference path."""
    k, n = 128, 24
    lin = _linear(k, n, gen)
    cs = torch.rand(k, generator=gen) * 2 + 0.5
    q = QuantLinear.from_linear(lin, QuantConfig(w_bits=8, a_bits=8, hadamard_block=64),
                                perm=torch.randperm(k, generator=gen), channel_scale=cs)
    assert rel_err(q.dequantized_weight(), lin.weight.detach()) < 0.02
    x = _activations(9, k, gen)
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    y = q.to(device)(x.to(device)).cpu()
    assert rel_err(y, ref) < ERROR_BOUNDS["w8a8"]
    with pytest.raises(ValueError, match="channel_scale must be positive"):
        QuantLinear.from_linear(lin, QuantConfig(), channel_scale=-cs)


@pytest.mark.parametrize("bias", [True, False])
def test_channel_shift_removes_offsets_and_folds_into_bias(device, gen, bias):
    """x with large per-channel offsets (the same in every token): subtracting them (δ) and
    folding W·δ into the bias keeps the product exact in FP and cuts the W4A4 error."""
    k, n = 128, 32
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    delta = torch.zeros(k)
    delta[torch.randperm(k, generator=gen)[:6]] = 40 * (torch.rand(6, generator=gen) + 0.5)
    x = torch.randn(33, k, generator=gen) + delta
    ref = x.double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
    cfg = QuantConfig(w_bits=4, a_bits=4, hadamard_block=64)
    plain = QuantLinear.from_linear(lin, cfg).to(device)
    shifted = QuantLinear.from_linear(lin, cfg, channel_shift=delta).to(device)
    assert shifted.bias is not None and shifted.channel_shift is not None
    want_bias = lin.weight.double() @ delta.double() + (lin.bias.double() if bias else 0)
    torch.testing.assert_close(shifted.bias.cpu().double(), want_bias, rtol=0, atol=1e-5)
    e_plain = rel_err(plain(x.to(device)).cpu(), ref)
    e_shift = rel_err(shifted(x.to(device)).cpu(), ref)
    assert e_shift < 0.5 * e_plain, (e_shift, e_plain)
    # 8 bits: close to exact
    q8 = QuantLinear.from_linear(lin, QuantConfig(w_bits=8, a_bits=8, hadamard_block=64),
                                 channel_shift=delta).to(device)
    assert rel_err(q8(x.to(device)).cpu(), ref) < ERROR_BOUNDS["w8a8"]
    # state dict round trip and validation
    again = QuantLinear(k, n, bias=True, config=cfg, has_channel_shift=True)
    again.load_state_dict(shifted.cpu().state_dict())
    assert torch.equal(again.channel_shift, delta)
    with pytest.raises(ValueError, match="channel_shift must be finite"):
        QuantLinear.from_linear(lin, cfg, channel_shift=torch.full((k,), float("nan")))
    with pytest.raises(ValueError, match="channel_shift must be finite"):
        QuantLinear.from_linear(lin, cfg, channel_shift=torch.zeros(k + 1))


@pytest.mark.parametrize("bits, group", [("w4a4", None), ("w4a4", 64), ("w4a8", 128),
                                         ("w4a8", None), ("w4a4", 256)])
def test_int8_operands_give_the_packed_result(kernel_device, bits, group, gen):
    """4-bit codes as int8 operands (the W8A8 GEMM on code · group-integer weights and [-7, 7]
    activations): the integer sums are exact either way, so the kernels' outputs are equal
    bit for bit; the PyTorch references agree to float rounding. Not saved; rebuilt on load."""
    from clq_triton import use_int8_operands
    from clq_triton.kernels._runtime import backend
    from helpers import unpack64

    k, n = 256, 80
    lin = _linear(k, n, gen)
    x = _activations(45, k, gen).to(torch.bfloat16).to(kernel_device)
    cfg = QuantConfig.from_bits(bits, group_size=group, hadamard_block=64, a_clip=0.9)
    q = QuantLinear.from_linear(lin, cfg, perm=torch.randperm(k, generator=gen),
                                channel_scale=torch.rand(k, generator=gen) + 0.5,
                                channel_shift=torch.randn(k, generator=gen)).to(kernel_device)
    with torch.no_grad():
        packed = q(x)
        with backend("torch"):
            packed_ref = q(x)
        model = nn.Sequential(q, nn.Identity())
        assert use_int8_operands(model) == 1
        w8 = q.qweight_int8
        assert w8.dtype == torch.int8 and w8.shape == (n, k) and w8.device == q.qweight.device
        z = q.wgroup.long().repeat_interleave(group, 1) if q.wgroup is not None else 1
        assert torch.equal(w8.cpu().long(), (unpack64(q.qweight.cpu()) * z.cpu() if
                                             q.wgroup is not None else unpack64(q.qweight.cpu())))
        y = q(x)
        with backend("torch"):
            y_ref = q(x)
    assert torch.equal(y, packed)
    torch.testing.assert_close(y_ref, packed_ref, rtol=1e-2, atol=1e-2)  # bf16 output rounding
    assert rel_err(y_ref.float(), packed_ref.float()) < 1e-3
    assert "qweight_int8" not in q.state_dict()
    # loading new codes into a layer in int8 mode rebuilds the copy from them
    other = QuantLinear.from_linear(_linear(k, n, gen), cfg, perm=torch.arange(k),
                                    channel_scale=torch.ones(k), channel_shift=torch.zeros(k))
    q.load_state_dict(other.to(kernel_device).state_dict())
    assert torch.equal(q.qweight_int8, other.use_int8_operands().qweight_int8)
    assert q.use_int8_operands(False).qweight_int8 is None
    w8a8 = QuantLinear.from_linear(lin, QuantConfig.from_bits("w8a8"))
    assert w8a8.use_int8_operands().qweight_int8 is None  # int8 already


def test_channel_transform_moves_to_the_weights_device():
    """Calibration statistics (and so perm, scale, shift) live on the CPU; from_linear moves
    every part to the layer's device. The placement helper, checked on the meta device (no
    GPU needed): a part it skipped would stay on the CPU."""
    from clq_triton.quant_linear import to_device  # what from_linear moves them with

    parts = (torch.randperm(64).int(), torch.rand(64) + 0.5, None, torch.randn(64))
    moved = to_device(parts, torch.device("meta"))
    assert [t is None for t in moved] == [t is None for t in parts]
    assert all(t.device.type == "meta" for t in moved if t is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_channel_transform_quantizes_a_cuda_linear(gen):
    lin = _linear(128, 48, gen).cuda()
    perm, scale, shift = torch.randperm(128), torch.rand(128) + 0.5, torch.randn(128)
    q = QuantLinear.from_linear(lin, QuantConfig(), perm, scale, shift)
    ref = QuantLinear.from_linear(lin.cpu(), QuantConfig(), perm, scale, shift)
    for name, t in q.state_dict().items():
        if torch.is_tensor(t) and not name.endswith("_extra_state"):  # (its config, as bytes)
            assert t.is_cuda, name
            torch.testing.assert_close(t.cpu(), ref.state_dict()[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_casts_keep_float32_buffers(gen, dtype):
    """model.to(bf16) after patch(): scales, shift and bias stay float32 (exactly: no round
    trip through the cast dtype), codes keep theirs; the layer's output is unchanged up to the
    input's rounding."""
    lin = _linear(128, 48, gen)
    q = QuantLinear.from_linear(lin, QuantConfig(group_size=64, hadamard_block=64),
                                torch.randperm(128, generator=gen), torch.rand(128, generator=gen)
                                + 0.5, torch.randn(128, generator=gen))
    before = {k: v.clone() for k, v in q.state_dict().items() if torch.is_tensor(v)}
    uncast = copy.deepcopy(q)
    nn.Sequential(q).to(dtype)  # through a parent, as model.to() does
    for k, v in q.state_dict().items():
        if torch.is_tensor(v):
            assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    x = torch.randn(9, 128, generator=gen).to(dtype)
    y = q(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), uncast(x.float()).to(dtype).float(), rtol=1e-2,
                               atol=1e-2)
    q.half()
    assert q.wscale.dtype == torch.float32 and q.bias.dtype == torch.float32


def test_failed_load_leaves_the_layer_as_it_was(gen):
    """A bad perm in a state dict is refused before any buffer is overwritten."""
    src = QuantLinear.from_linear(_linear(128, 48, gen), QuantConfig(),
                                  perm=torch.randperm(128, generator=gen))
    dst = QuantLinear.from_linear(_linear(128, 48, gen), QuantConfig(),
                                  perm=torch.randperm(128, generator=gen))
    before = {k: v.clone() for k, v in dst.state_dict().items() if torch.is_tensor(v)}
    x = torch.randn(5, 128, generator=gen)
    y = dst(x)
    sd = src.state_dict()
    sd["perm"] = sd["perm"].clone()
    sd["perm"][3] = sd["perm"][4]
    with pytest.raises(ValueError, match="not a permutation"):
        dst.load_state_dict(sd)
    for k, v in dst.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k]), k
    assert torch.equal(dst(x), y)


@pytest.mark.parametrize("bits, group", [("w4a4", 64), ("w4a8", None), ("w8a8", 128)])
def test_dequantized_weight_cache_for_the_reference_path(gen, bits, group, kernel_device):
    """cache_dequantized_weight: the reference path's output bit for bit, without
    dequantizing the weight per call; float32 through casts, not saved, rebuilt on load; the
    Triton path ignores it."""
    from unittest import mock

    import clq_triton
    from clq_triton.kernels import gemm

    lin = nn.Linear(128, 48)
    q = QuantLinear.from_linear(lin, QuantConfig.from_bits(bits, group_size=group))
    x = torch.randn(5, 7, 128, generator=gen)
    with clq_triton.backend("torch"):
        want = q(x)
        assert clq_triton.cache_dequantized_weights(nn.Sequential(q)) == 1
        with mock.patch.object(gemm, "dequantize_weight_ref", side_effect=AssertionError):
            assert torch.equal(q(x), want)
            # with int8 operands too: their activation codes come unpacked, 4 bits or not
            assert torch.equal(q.use_int8_operands()(x), want)
            q.use_int8_operands(False)
    assert "weight_dequantized" not in q.state_dict()
    torch.testing.assert_close(q.weight_dequantized, gemm.dequantize_weight_ref(
        gemm.unpack_codes(q.qweight, q.config.w_bits), q.wscale, q.wgroup), rtol=0, atol=0)
    fresh = QuantLinear(128, 48, config=q.config).cache_dequantized_weight()
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.weight_dequantized, q.weight_dequantized)
    with clq_triton.backend("triton"):  # on the kernels' device (a GPU, or the interpreter)
        plain = QuantLinear.from_linear(lin, q.config).to(kernel_device)
        q.to(kernel_device)
        xd = x.to(kernel_device)
        assert torch.equal(q(xd), plain(xd))
    q.to(torch.bfloat16)
    assert q.weight_dequantized.dtype == torch.float32
    q.cache_dequantized_weight(False)
    assert "weight_dequantized" not in q._buffers


@pytest.mark.parametrize("bits, group", [("w4a4", 64), ("w4a8", None), ("w8a8", 128)])
@pytest.mark.parametrize("gptq", [False, True])
def test_segment_weight_clips_equal_the_segments_quantized_alone(bits, group, gptq, gen):
    """w_clip_segments: each segment of output rows is exactly what quantizing those rows as
    a layer of their own, with that clip and the same channel transform, gives."""
    k, sizes, clips = 128, (24, 8, 16), (0.9, 1.0, 0.75)
    lin = _linear(k, sum(sizes), gen)
    perm = torch.randperm(k, generator=gen)
    scale = torch.rand(k, generator=gen) + 0.5
    shift = torch.randn(k, generator=gen) * 0.1
    hessian = None
    if gptq:
        x = _activations(256, k, gen).double()
        hessian = x.T @ x
    cfg = QuantConfig.from_bits(bits, group_size=group)
    q = QuantLinear.from_linear(lin, cfg.replace(w_clip_segments=tuple(zip(sizes, clips))),
                                perm, scale, shift, hessian)
    start = 0
    for rows, clip in zip(sizes, clips):
        part = nn.Linear(k, rows)
        with torch.no_grad():
            part.weight.copy_(lin.weight[start:start + rows])
            part.bias.copy_(lin.bias[start:start + rows])
        alone = QuantLinear.from_linear(part, cfg.replace(w_clip=clip), perm, scale, shift,
                                        hessian)
        for name in ("qweight", "wscale", "wgroup", "bias"):
            got = getattr(q, name)
            if got is not None:
                assert torch.equal(got[start:start + rows], getattr(alone, name)), name
        start += rows
    uniform = QuantLinear.from_linear(lin, cfg.replace(w_clip=0.9), perm, scale, shift, hessian)
    assert not torch.equal(uniform.wscale, q.wscale)  # the clips did act per segment


def test_segment_clips_round_trip_and_are_checked(gen):
    lin = _linear(64, 12, gen)
    cfg = QuantConfig(w_clip_segments=[[4, 0.8], [8, 1]])  # as read back from JSON
    assert cfg.w_clip_segments == ((4, 0.8), (8, 1.0)) and hash(cfg)
    assert "w_clip_segments" not in QuantConfig().to_dict()  # old checkpoints read the same
    q = QuantLinear.from_linear(lin, cfg)
    assert QuantConfig(**json.loads(json.dumps(q.config.to_dict()))) == q.config
    r = QuantLinear(64, 12, config=cfg)
    r.load_state_dict(q.state_dict())
    assert r.config == q.config and torch.equal(r.qweight, q.qweight)
    with pytest.raises(ValueError, match="cover 12 output rows; the layer has 16"):
        QuantLinear.from_linear(_linear(64, 16, gen), cfg)
    state = q.state_dict()
    bad = json.loads(bytes(state["_extra_state"].tolist()).decode())
    bad["config"]["w_clip_segments"] = [[4, 0.8], [4, 1.0]]
    state["_extra_state"] = torch.tensor(list(json.dumps(bad).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="cover 8 output rows"):
        QuantLinear(64, 12, config=cfg).load_state_dict(state)


def test_a_permutation_of_runs_reaches_the_kernel_as_such(kernel_device, gen):
    """QuantLinear finds once, where its perm is set (from_linear, load), whether the perm
    moves aligned runs of 8 (CLQ(perm_run=8)'s do) and passes that to every launch; a
    scattered perm, a fresh layer and a layer whose perm was taken away use the plain
    gather."""
    from unittest import mock

    import clq_triton
    import clq_triton.kernels.rotate_quantize as rq

    lin = nn.Linear(256, 64)
    runs = (torch.randperm(32, generator=gen)[:, None] * 8 + torch.arange(8)).flatten()
    cfg = QuantConfig(hadamard_block=64)
    q = QuantLinear.from_linear(lin, cfg, perm=runs).to(kernel_device)
    scattered = QuantLinear.from_linear(lin, cfg, perm=torch.randperm(256, generator=gen))
    fresh = QuantLinear(256, 64, config=cfg, has_perm=True)
    assert (q._perm_runs, scattered._perm_runs, fresh._perm_runs) == (8, 1, 1)
    fresh.load_state_dict(q.state_dict())
    assert fresh._perm_runs == 8
    fresh.load_state_dict(scattered.state_dict())
    assert fresh._perm_runs == 1
    seen = []
    real = rq._launch
    with mock.patch.object(rq, "_launch", lambda *a: seen.append(a[-1]) or real(*a)):
        x = torch.randn(3, 256, generator=gen).to(kernel_device)
        y = q(x)
        q.take_permuted_input()
        assert q._perm_runs == 1
        q(x[:, runs.long()])
    assert seen == [8, 1]
    with clq_triton.backend("torch"):
        torch.testing.assert_close(y, QuantLinear.from_linear(lin, cfg, perm=runs)(x.cpu()).to(
            y.device), rtol=1e-5, atol=1e-5)
