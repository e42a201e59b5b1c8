import pytest
import torch
import triton
import triton.language as tl

from clq_triton.kernels._runtime import backend
from clq_triton.kernels.hadamard import find_perm_runs, rotate_ref
from clq_triton.kernels.quantize import dequantize_weight_ref, quantize_ref, quantize_weight_ref
from clq_triton.kernels.rotate_quantize import _tf32_split, rotate_quantize
from helpers import dequant64, explicit_rotation, unpack64

# ---------------------------------------------------------------- quantizers (reference)


@pytest.mark.parametrize("bits, qmax", [(4, 7), (8, 127)])
@pytest.mark.parametrize("clip", [1.0, 0.8])
@pytest.mark.parametrize("group", [64, None])
def test_quantize_ref_against_per_element_formula(bits, qmax, clip, group, gen):
    x = torch.randn(4, 128, generator=gen, dtype=torch.float64) * 3
    codes, scales = quantize_ref(x, group, bits, clip)
    g = group or 128
    assert scales.shape == (4, 128 // g)
    for r in range(4):
        for gi in range(128 // g):
            grp = x[r, gi * g:(gi + 1) * g]
            s = float(torch.tensor(grp.abs().max().item(), dtype=torch.float32)
                      * torch.tensor(clip / qmax, dtype=torch.float32))
            assert scales[r, gi].item() == pytest.approx(s, rel=1e-6)
            want = [max(-qmax, min(qmax, int(abs(v) / s + 0.5) * (1 if v >= 0 else -1)))
                    for v in grp.float().tolist()]
            got = codes[r, gi * g:(gi + 1) * g].tolist()
            assert sum(abs(a - b) for a, b in zip(got, want)) <= 1  # fp32 vs python float ties
    if clip == 1.0:
        step = scales.double().repeat_interleave(g, 1)
        assert ((dequant64(codes, scales) - x).abs() <= step / 2 + 1e-6).all()


def test_quantize_ref_zero_and_nonfinite_groups():
    x = torch.randn(3, 128)
    x[0] = 0.0
    x[1, 5] = float("nan")
    x[2, 70] = float("inf")
    codes, scales = quantize_ref(x, 64, 4)
    assert torch.equal(scales[0], torch.zeros(2)) and (codes[0] == 0).all()
    assert torch.isnan(scales[1, 0]) and (codes[1, :64] == 0).all() and torch.isfinite(scales[1, 1])
    assert torch.isnan(scales[2, 1]) and torch.isfinite(scales[2, 0])
    codes, scales = quantize_ref(x, None, 8)  # per token: the whole row
    assert scales[0, 0] == 0 and torch.isnan(scales[1:, 0]).all() and (codes[1:] == 0).all()


def test_quantize_ref_scale_overflow_is_an_error():
    with pytest.raises(OverflowError):
        quantize_ref(torch.full((1, 64), 1e9), 64, 4, scale_dtype=torch.float16)


@pytest.mark.parametrize("clip", [1.0, 0.85])
@pytest.mark.parametrize("group", [64, 128])
def test_two_level_weight_code(clip, group, gen):
    n, k = 24, 512
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    w[3, : k // 2] *= 0.05  # groups of very different size
    w[5] = 0.0
    codes, s, z = quantize_weight_ref(w, group, 4, clip)
    assert codes.dtype == torch.int8 and s.dtype == torch.float32 and z.dtype == torch.uint8
    assert s.shape == (n,) and z.shape == (n, k // group)
    assert codes.abs().max() <= 7 and z.min() >= 1 and z.max() <= 16
    assert (codes.long().view(n, -1, group) * z.long()[..., None]).abs().max() <= 127  # int8
    # independent float64 arithmetic of the rule
    amax_row = w.abs().amax(1)
    amax_g = w.abs().view(n, -1, group).amax(-1)
    s64 = amax_row * clip / (7 * 16)
    assert torch.allclose(s.double(), s64, rtol=1e-6)
    ideal = amax_g * clip / 7
    live = s64 > 0
    zz = z.double()[live]
    # z is the smallest integer scale with s·z ≥ the group's ideal scale (fp32 ties: ±1)
    assert (s64[live, None] * zz >= ideal[live] * (1 - 1e-6)).all()
    assert ((zz == 1) | (s64[live, None] * (zz - 1) < ideal[live] * (1 + 1e-6))).all()
    top = (amax_g == amax_row[:, None]) & live[:, None]
    assert (z[top] == 16).all()  # the group holding the row max uses the whole range
    assert (codes[5] == 0).all() and s[5] == 0
    if clip == 1.0:  # no clipping: every element within half a step
        step = (s.double()[:, None] * z.double()).repeat_interleave(group, 1)
        assert ((dequantize_weight_ref(codes, s, z).double() - w).abs() <= step / 2 + 1e-6).all()
    # on the small groups of row 3, two-level beats one scale per channel by far
    c1, s1, _ = quantize_weight_ref(w, None, 4, clip)
    err2 = (dequantize_weight_ref(codes, s, z).double() - w)[3, : k // 2].norm()
    err1 = (dequantize_weight_ref(c1, s1, None).double() - w)[3, : k // 2].norm()
    assert err2 < 0.5 * err1


@pytest.mark.parametrize("bits, group", [(8, 64), (8, None), (4, None)])
def test_per_channel_weight_code(bits, group, gen):
    w = torch.randn(10, 128, generator=gen)
    codes, s, z = quantize_weight_ref(w, group, bits)
    qmax = 7 if bits == 4 else 127
    assert z is None and s.shape == (10,)
    torch.testing.assert_close(s, w.abs().amax(1) / qmax)
    assert ((dequantize_weight_ref(codes, s, None) - w).abs() <= s[:, None] / 2 + 1e-6).all()


# ---------------------------------------------------------------- fused kernel


def _poisoned(m, k, group, bits, device):
    q = torch.full((m, k // 2 if bits == 4 else k), 0xAB if bits == 4 else -85,
                   dtype=torch.uint8 if bits == 4 else torch.int8, device=device)
    s = torch.full((m, k // group if group else 1), float("nan"), device=device)
    return q, s


def _check_against_ref(x, perm, block, group, bits, clip, q, s, cs=None, shift=None):
    """Kernel codes equal the reference's up to ±1 on rare rounding ties; scales to fp32;
    and at clip 1 the dequantized result is within half a step of the exact rotation."""
    xd = x.cpu().double() - (shift.double() if shift is not None else 0.0)
    xd = xd * (cs.double() if cs is not None else 1.0)
    codes_ref, scales_ref = quantize_ref(rotate_ref(xd, perm, block).float(), group, bits, clip)
    codes = unpack64(q.cpu()) if bits == 4 else q.cpu().long()
    diff = (codes - codes_ref.long()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 2e-3
    torch.testing.assert_close(s.cpu(), scales_ref, rtol=1e-5, atol=1e-30, equal_nan=True)
    if clip == 1.0:
        exact = xd @ explicit_rotation(x.shape[1], perm, block)
        step = dequant64(torch.ones_like(codes), s.cpu())
        assert ((dequant64(codes, s.cpu()) - exact).abs() <= step * (0.5 + 1e-3) + 1e-6).all()


BLOCKS = [None, 16, 32, 64, 128, 256, 512]
GROUPS = [None, 64, 128, 256]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("group", GROUPS)
def test_rotate_quantize_every_block_and_group_bf16(kernel_device, bits, block, group, gen):
    m, k = 19, 512
    x = (torch.randn(m, k, generator=gen) * 2).to(torch.bfloat16)
    perm = torch.randperm(k, generator=gen)
    q, s = _poisoned(m, k, group, bits, kernel_device)
    out = rotate_quantize(x.to(kernel_device), perm.to(kernel_device), block, group, bits,
                          out=(q, s))
    assert out[0].data_ptr() == q.data_ptr() and out[1].data_ptr() == s.data_ptr()
    _check_against_ref(x, perm, block, group, bits, 1.0, q, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block, group, bits", [(None, None, 4), (16, 64, 8), (64, 128, 4),
                                                (128, None, 8), (256, 64, 4), (512, 256, 4)])
def test_rotate_quantize_fp32_fp16(kernel_device, dtype, block, group, bits, gen):
    m, k = 9, 1024
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    perm = torch.randperm(k, generator=gen) if block != 64 else None
    q, s = _poisoned(m, k, group, bits, kernel_device)
    rotate_quantize(x.to(kernel_device), perm.to(kernel_device) if perm is not None else None,
                    block, group, bits, out=(q, s))
    _check_against_ref(x, perm, block, group, bits, 1.0, q, s)


@pytest.mark.parametrize("m, k, block, group", [(1, 64, 64, 64), (3, 192, 64, None),
                                                (1000, 128, 32, 64), (70, 320, 64, None)])
@pytest.mark.parametrize("clip", [1.0, 0.7])
def test_rotate_quantize_odd_shapes_and_clip(kernel_device, m, k, block, group, clip, gen):
    x = torch.randn(m, k, generator=gen, dtype=torch.float16)
    q, s = _poisoned(m, k, group, 4, kernel_device)
    rotate_quantize(x.to(kernel_device), None, block, group, 4, clip, out=(q, s))
    _check_against_ref(x, None, block, group, 4, clip, q, s)


@pytest.mark.parametrize("group", [64, None])
def test_rotate_quantize_zero_rows_outliers_and_nonfinite(kernel_device, group, gen):
    x = torch.randn(8, 256, generator=gen, dtype=torch.bfloat16)
    x[1] = 0.0  # all-zero row: scale 0, codes 0, no NaN
    x[2, 7] = 3e4  # huge outlier
    x[3, 100] = float("nan")
    x[4, 200] = float("-inf")
    q, s = _poisoned(8, 256, group, 4, kernel_device)
    rotate_quantize(x.to(kernel_device), None, 64, group, 4, out=(q, s))
    q, s = q.cpu(), s.cpu()
    assert (q[1] == 0).all() and (s[1] == 0).all()
    clean = [0, 1, 2, 5, 6, 7]
    _check_against_ref(x[clean], None, 64, group, 4, 1.0, q[clean], s[clean])
    if group:  # a non-finite value marks its Hadamard block's group with NaN and zero codes
        assert torch.isnan(s[3, 1]) and torch.isfinite(s[3, [0, 2, 3]]).all()
        assert torch.isnan(s[4, 3]) and torch.isfinite(s[4, :3]).all()
        assert (unpack64(q[3:4])[:, 64:128] == 0).all() and (unpack64(q[3:4])[:, :64] != 0).any()
    else:  # per token: the whole row
        assert torch.isnan(s[3:5, 0]).all() and (q[3:5] == 0).all()


def test_rotate_quantize_strided_and_unaligned_rows(kernel_device, gen):
    base = torch.randn(7, 3 * 128 + 3, generator=gen).to(kernel_device)
    x = base[:, 3:3 + 128]  # rows strided, data pointer not 16-byte aligned
    perm = torch.randperm(128, generator=gen)
    q, s = rotate_quantize(x, perm.to(kernel_device), 32, 64, 4)
    _check_against_ref(x, perm, 32, 64, 4, 1.0, q, s)


def test_rotate_quantize_reference_backend_agrees(kernel_device, gen):
    x = torch.randn(5, 128, generator=gen)
    perm = torch.randperm(128, generator=gen)
    qk, sk = rotate_quantize(x.to(kernel_device), perm.to(kernel_device), 32, 64, 4)
    with backend("torch"):
        qr, sr = rotate_quantize(x, perm, 32, 64, 4)
    assert (unpack64(qk.cpu()) - unpack64(qr)).abs().max() <= 1
    torch.testing.assert_close(sk.cpu(), sr)


@pytest.mark.parametrize("dtype, block, group, bits", [
    (torch.bfloat16, None, None, 4), (torch.bfloat16, 16, None, 8), (torch.float16, 32, 256, 4),
    (torch.float32, 128, None, 4), (torch.bfloat16, 128, 256, 8), (torch.float16, 512, None, 4)])
def test_rotate_quantize_split_spans_equal_one_launch(kernel_device, monkeypatch, dtype, block,
                                                      group, bits, gen):
    """Scale spans wider than the tile (per token, or 256 on a smaller tile) as one launch per
    span or as two launches per tile (tile maxima, then codes): the same bytes and scales,
    including rows with NaN/Inf, all-zero rows, an outlier and a partial last row block."""
    import clq_triton.kernels.rotate_quantize as rq

    m, k = 37, 2560  # 40 tiles of 64: the tile-maxima loop runs over a full and a masked chunk
    x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
    x[0] = 0.0
    x[5, 300] = 3e4
    x[6, 10] = float("nan")
    x[36, 2000] = float("inf")
    perm = torch.randperm(k, generator=gen).to(kernel_device)
    shift = torch.randn(k, generator=gen).to(kernel_device) if bits == 8 else None
    got = {}
    for split in (False, True):
        monkeypatch.setattr(rq, "_split_spans", lambda programs, device, split=split: split)
        q, s = _poisoned(m, k, group, bits, kernel_device)
        rotate_quantize(x.to(kernel_device), perm, block, group, bits, out=(q, s),
                        channel_shift=shift)
        got[split] = q.cpu(), s.cpu()
    assert torch.equal(got[True][0], got[False][0])
    torch.testing.assert_close(got[True][1], got[False][1], rtol=0, atol=0, equal_nan=True)
    assert got[True][1][[6, 36]].isnan().any(dim=1).all()
    assert shift is not None or (got[True][1][0] == 0).all()
    clean = [i for i in range(m) if i not in (6, 36)]
    _check_against_ref(x[clean], perm.cpu(), block, group, bits, 1.0, got[True][0][clean],
                       got[True][1][clean], shift=shift.cpu() if shift is not None else None)


@pytest.mark.parametrize("block, group", [(None, None), (64, 64), (128, 256), (512, None)])
def test_rotate_quantize_unpacked_4bit_codes(kernel_device, block, group, gen):
    """packed=False: the same 4-bit codes, one int8 each in natural column order (the int8
    tensor-core operand), from the kernel and from the reference; 8-bit codes ignore it."""
    x = (torch.randn(21, 512, generator=gen) * 3).to(torch.float16)
    x[3, 9] = float("nan")
    perm = torch.randperm(512, generator=gen).to(kernel_device)
    xd = x.to(kernel_device)
    q4, s4 = rotate_quantize(xd, perm, block, group, 4, 0.8)
    q8 = torch.full((21, 512), -99, dtype=torch.int8, device=kernel_device)
    s8 = torch.full_like(s4, -1.0)
    rotate_quantize(xd, perm, block, group, 4, 0.8, out=(q8, s8), packed=False)
    assert torch.equal(q8.cpu().long(), unpack64(q4.cpu())) and q8.abs().max() <= 7
    torch.testing.assert_close(s8, s4, rtol=0, atol=0, equal_nan=True)
    with backend("torch"):
        qr, sr = rotate_quantize(x, perm.cpu(), block, group, 4, 0.8, packed=False)
    assert qr.dtype == torch.int8 and (qr.long() - q8.cpu().long()).abs().max() <= 1
    assert torch.equal(rotate_quantize(xd, perm, block, group, 8, packed=False)[0],
                       rotate_quantize(xd, perm, block, group, 8)[0])
    with pytest.raises(TypeError, match="packed must be a bool"):
        rotate_quantize(xd, perm, block, group, 4, packed=0)
    with pytest.raises(ValueError, match="out\\[0\\]"):
        rotate_quantize(xd, perm, block, group, 4, out=(q4, s4), packed=False)


@pytest.mark.parametrize("block", [None, 64, 512])
@pytest.mark.parametrize("group", [64, None])
@pytest.mark.parametrize("use_scale, use_shift", [(True, False), (False, True), (True, True)])
def test_rotate_quantize_channel_shift_and_scale(kernel_device, block, group, use_scale,
                                                 use_shift, gen):
    """(x − δ)·D before the rotation; x carries per-channel offsets ~δ (the adaLN shift kind), so
    a shift that is skipped, added or applied after D or the permutation shows in the codes."""
    offset = torch.randn(512, generator=gen) * 8
    x = (torch.randn(11, 512, generator=gen) + offset).to(torch.bfloat16)
    cs = torch.rand(512, generator=gen) + 0.5 if use_scale else None
    shift = offset + torch.randn(512, generator=gen) * 0.1 if use_shift else None
    perm = torch.randperm(512, generator=gen)
    q, s = _poisoned(11, 512, group, 4, kernel_device)
    rotate_quantize(x.to(kernel_device), perm.to(kernel_device), block, group, 4, out=(q, s),
                    channel_scale=cs.to(kernel_device) if use_scale else None,
                    channel_shift=shift.to(kernel_device) if use_shift else None)
    _check_against_ref(x, perm, block, group, 4, 1.0, q, s, cs, shift)


@triton.jit
def _tf32_split_kernel(x_ptr, hi_ptr, lo_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    hi, lo = _tf32_split(tl.load(x_ptr + i))
    tl.store(hi_ptr + i, hi)
    tl.store(lo_ptr + i, lo)


def test_tf32_split_parts_are_exact_and_tf32(kernel_device, gen):
    """The two tf32 parts of a float32 value, as the rotation's "tf32x2" dots use them: hi has
    no bits below tf32's 10-bit mantissa (so the tensor core takes it whole), hi + lo == x
    exactly, and with lo truncated to tf32 as the tensor core may do, the sum is within 2⁻²¹
    of x. Ties round away from zero."""
    n = 1024
    mant = torch.randint(0, 1 << 23, (n,), generator=gen, dtype=torch.int64)
    mant[:64] = (mant[:64] & ~0x1FFF) | 0x1000  # exact ties
    mant[64:96] = (1 << 23) - 1  # all-ones mantissa: rounding carries into the exponent
    # exponents that keep lo normal (a subnormal lo loses bits to tf32 truncation)
    expo = torch.randint(30, 254, (n,), generator=gen, dtype=torch.int64)
    expo[64:96] = torch.randint(30, 200, (32,), generator=gen)
    sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) << 31
    bits = (sign | (expo << 23) | mant)
    bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    x = bits.view(torch.float32)
    x[-4:] = torch.tensor([0.0, -0.0, 1.0, -3.0])
    x = x.to(kernel_device)
    hi = torch.full_like(x, float("nan"))
    lo = torch.full_like(x, float("nan"))
    _tf32_split_kernel[(1,)](x, hi, lo, N=n)
    x, hi, lo = x.cpu(), hi.cpu(), lo.cpu()
    assert (hi.view(torch.int32) & 0x1FFF).eq(0).all()
    assert torch.equal(hi.double() + lo.double(), x.double())
    assert (lo.abs() <= x.abs() * 2.0 ** -11).all()
    lo_tf32 = (lo.view(torch.int32) & -0x2000).view(torch.float32)
    assert ((hi.double() + lo_tf32.double() - x.double()).abs()
            <= x.double().abs() * 2.0 ** -21).all()
    ties = x[:64].double()
    assert (hi[:64].double().abs() > ties.abs()).all()  # away from zero


@pytest.mark.parametrize(
    "shape, dtype, group, bits, err, match",
    [
        ((4, 192), torch.float32, 128, 4, ValueError, "multiple of group_size"),
        ((4, 96), torch.float32, None, 4, ValueError, "multiple of 64"),
        ((4, 64), torch.float32, 48, 4, ValueError, "group_size must be"),
        ((4, 64), torch.float32, 64, 3, ValueError, "bits must be 4 or 8"),
        ((4, 64), torch.int8, 64, 4, TypeError, "float16, bfloat16 or float32"),
        ((2, 4, 64), torch.float32, 64, 4, ValueError, "2-D"),
    ],
)
def test_rotate_quantize_errors(shape, dtype, group, bits, err, match):
    with pytest.raises(err, match=match):
        rotate_quantize(torch.zeros(shape, dtype=dtype), None, None, group, bits)


def test_rotate_quantize_rejects_wrong_out_perm_and_channel_scale():
    x = torch.zeros(4, 128)
    with pytest.raises(ValueError, match="out\\[1\\]"):
        rotate_quantize(x, None, None, 64, 4, out=(torch.empty(4, 64, dtype=torch.uint8),
                                                    torch.empty(4, 1)))
    perm = torch.arange(128)
    perm[3] = 4
    with pytest.raises(ValueError, match="not a permutation"):
        rotate_quantize(x, perm, 16, 64, 4)
    with pytest.raises(ValueError, match="channel_scale must be float32"):
        rotate_quantize(x, None, None, 64, 4, channel_scale=torch.ones(128, dtype=torch.float64))
    with pytest.raises(ValueError, match="channel_shift must be float32"):
        rotate_quantize(x, None, None, 64, 4, channel_shift=torch.zeros(64))
    with pytest.raises(ValueError, match="multiple of the Hadamard block"):
        rotate_quantize(torch.zeros(4, 192), None, 128, None, 4)


def test_torch_backend_forward_reads_nothing_back(gen):
    """The PyTorch reference path (the "torch" backend, also on CUDA) handles NaN/Inf without
    reading a tensor back to the host: on a GPU each read-back is a sync per layer and forbids
    CUDA graphs. Checked on the CPU at the dispatcher: no scalar is read during a forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import clq_triton

    reads = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten._local_scalar_dense,
                                       torch.ops.aten.is_nonzero, torch.ops.aten.item):
                reads.append(str(func))
            return func(*args, **(kwargs or {}))

    from clq_triton.kernels.rotate_quantize import rotate_quantize

    for group in (None, 64):
        x = torch.randn(4, 128, generator=gen)
        x[1, 5] = float("nan")
        out = (torch.empty(4, 64, dtype=torch.uint8), torch.empty(4, 128 // (group or 128)))
        with clq_triton.backend("torch"), Reads():  # out=: the path itself, not the operator
            rotate_quantize(x, torch.randperm(128, generator=gen), 64, group, 4, out=out,
                            check_perm_values=False)
        assert reads == [], reads
        assert torch.isnan(out[1][1]).any() and torch.isfinite(out[1][[0, 2, 3]]).all()


# ---------------------------------------------------------------- permutations of runs of 8


def test_find_perm_runs(gen):
    k = 256
    runs = (torch.randperm(k // 8, generator=gen)[:, None] * 8 + torch.arange(8)).flatten()
    assert find_perm_runs(runs) == find_perm_runs(runs.int()) == 8
    assert find_perm_runs(torch.arange(k)) == 8 and find_perm_runs(None) == 1
    assert find_perm_runs(torch.roll(torch.arange(k), 4)) == 1  # runs of 8, not aligned
    swapped = runs.clone()
    swapped[[8, 9]] = swapped[[9, 8]]  # one run out of order
    assert find_perm_runs(swapped) == 1
    assert find_perm_runs(torch.arange(12)) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block, group, prescaled", [(64, 64, True), (128, None, False),
                                                     (32, 128, True)])
def test_rotate_quantize_with_a_permutation_of_runs(kernel_device, dtype, block, group,
                                                    prescaled, gen):
    """A permutation that moves aligned runs of 8 (CLQ(perm_run=8)'s): found from its values
    or told, the kernel's run path gives the reference's codes and scales."""
    m, k = 37, 512
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    x[5, 17] = 500.0
    perm = (torch.randperm(k // 8, generator=gen)[:, None] * 8 + torch.arange(8)).flatten()
    vec = dict(channel_shift=torch.randn(k, generator=gen), channel_scale=torch.rand(
        k, generator=gen) + 0.5) if prescaled else {}
    dev = {n: v.to(kernel_device) for n, v in vec.items()}
    for runs, check in ((None, True), (8, False)):
        q, s = _poisoned(m, k, group, 4, kernel_device)
        rotate_quantize(x.to(kernel_device), perm.int().to(kernel_device), block, group, 4,
                        out=(q, s), check_perm_values=check, perm_runs=runs, **dev)
        _check_against_ref(x, perm, block, group, 4, 1.0, q, s, vec.get("channel_scale"),
                           vec.get("channel_shift"))


def test_rotate_quantize_refuses_a_wrong_perm_runs(gen):
    x = torch.randn(4, 128, generator=gen)
    scattered = torch.randperm(128, generator=gen)
    with pytest.raises(ValueError, match="runs of 8"):
        rotate_quantize(x, scattered, 64, None, 4, perm_runs=8)
    with pytest.raises(ValueError, match="perm_runs"):
        rotate_quantize(x, None, 64, None, 4, perm_runs=8)
    with pytest.raises(ValueError, match="perm_runs"):
        rotate_quantize(x, torch.arange(128), 64, None, 4, perm_runs=4)
