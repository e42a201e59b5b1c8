import pytest
import torch

from clq_triton.kernels.hadamard import rotate_ref
from clq_triton.kernels.quantize import pack_int4_ref, quantize_ref, unpack_int4_ref
from clq_triton.kernels.rotate_quantize import rotate_quantize
from helpers import dequant64, explicit_rotation, unpack64

# ---------------------------------------------------------------- packing (reference)


def test_unpack_pack_all_bytes_roundtrip():
    b = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    codes = unpack_int4_ref(b)
    assert codes.dtype == torch.int8 and codes.shape == (4, 128)
    assert torch.equal(codes.long(), unpack64(b))
    assert torch.equal(pack_int4_ref(codes), b)


def test_pack_all_code_pairs_and_nibble_order():
    v = torch.arange(-8, 8)
    pairs = torch.cartesian_prod(v, v).to(torch.int8).reshape(1, -1)  # (even, odd) columns
    packed = pack_int4_ref(pairs)
    assert torch.equal(unpack_int4_ref(packed), pairs)
    # low nibble = even column: codes (1, -2) → 0xE1
    assert pack_int4_ref(torch.tensor([[1, -2]], dtype=torch.int8)).item() == 0xE1


def test_pack_rejects_odd_k():
    with pytest.raises(ValueError, match="even"):
        pack_int4_ref(torch.zeros(2, 3, dtype=torch.int8))


# ---------------------------------------------------------------- quantizer (reference)


@pytest.mark.parametrize("bits, qmax", [(4, 7), (8, 127)])
@pytest.mark.parametrize("clip", [1.0, 0.8])
def test_quantize_ref_against_per_element_formula(bits, qmax, clip, gen):
    x = torch.randn(6, 128, generator=gen, dtype=torch.float64) * 3
    codes, scales = quantize_ref(x, 32, bits, clip)
    for r in range(6):
        for gi in range(4):
            grp = x[r, gi * 32:(gi + 1) * 32]
            s = float(torch.tensor(grp.abs().max().item(), dtype=torch.float32)
                      * torch.tensor(clip / qmax, dtype=torch.float32))
            assert scales[r, gi].item() == pytest.approx(s, rel=1e-6)
            want = [max(-qmax, min(qmax, int(abs(v) / s + 0.5) * (1 if v >= 0 else -1)))
                    for v in grp.float().tolist()]
            got = codes[r, gi * 32:(gi + 1) * 32].tolist()
            assert sum(abs(a - b) for a, b in zip(got, want)) <= 1  # fp32 vs python float ties
    err = (dequant64(codes, scales, 32) - x).abs()
    if clip == 1.0:
        assert (err <= scales.double().repeat_interleave(32, 1) / 2 + 1e-6).all()


def test_quantize_ref_zero_and_nonfinite_groups():
    x = torch.randn(3, 64)
    x[0] = 0.0
    x[1, 5] = float("nan")
    x[2, 40] = float("inf")
    codes, scales = quantize_ref(x, 32, 4)
    assert torch.equal(scales[0], torch.zeros(2)) and (codes[0] == 0).all()
    assert torch.isnan(scales[1, 0]) and (codes[1, :32] == 0).all() and torch.isfinite(scales[1, 1])
    assert torch.isnan(scales[2, 1]) and torch.isfinite(scales[2, 0])


def test_quantize_ref_scale_overflow_is_an_error():
    with pytest.raises(OverflowError):
        quantize_ref(torch.full((1, 32), 1e9), 32, 4, scale_dtype=torch.float16)


# ---------------------------------------------------------------- fused kernel


def _poisoned(m, k, group, bits, device):
    q = torch.full((m, k // 2 if bits == 4 else k), 0xAB if bits == 4 else -85,
                   dtype=torch.uint8 if bits == 4 else torch.int8, device=device)
    s = torch.full((m, k // group), float("nan"), device=device)
    return q, s


def _check_against_ref(x, perm, block, group, bits, clip, q, s):
    """Kernel codes equal the reference's up to ±1 on rare rounding ties; scales to fp32."""
    codes_ref, scales_ref = quantize_ref(rotate_ref(x.cpu().double(), perm, block).float(),
                                         group, bits, clip)
    codes = unpack64(q.cpu()) if bits == 4 else q.cpu().long()
    diff = (codes - codes_ref.long()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3
    torch.testing.assert_close(s.cpu(), scales_ref, rtol=1e-5, atol=1e-30, equal_nan=True)
    # and the dequantized result is within half a step of the exact float64 rotation
    if clip == 1.0:
        exact = x.cpu().double() @ explicit_rotation(x.shape[1], perm, block)
        step = s.cpu().double().repeat_interleave(group, 1)
        assert ((dequant64(codes, s.cpu(), group) - exact).abs() <= step * 0.5 + step * 1e-3
                + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block, group", [(None, 64), (16, 64), (64, 64), (128, 32), (256, 128),
                                          (512, 256)])
def test_rotate_quantize_kernel_matches_reference(kernel_device, dtype, bits, block, group, gen):
    m, k = 17, 512
    x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
    perm = torch.randperm(k, generator=gen)
    q, s = _poisoned(m, k, group, bits, kernel_device)
    out = rotate_quantize(x.to(kernel_device), perm.to(kernel_device), block, group, bits,
                          out=(q, s))
    assert out[0].data_ptr() == q.data_ptr() and out[1].data_ptr() == s.data_ptr()
    _check_against_ref(x, perm, block, group, bits, 1.0, q, s)


@pytest.mark.parametrize("m, k", [(1, 64), (3, 192), (1000, 128)])
@pytest.mark.parametrize("clip", [1.0, 0.7])
def test_rotate_quantize_odd_shapes_and_clip(kernel_device, m, k, clip, gen):
    x = torch.randn(m, k, generator=gen, dtype=torch.float16)
    q, s = _poisoned(m, k, 64, 4, kernel_device)
    rotate_quantize(x.to(kernel_device), None, 64, 64, 4, clip, out=(q, s))
    _check_against_ref(x, None, 64, 64, 4, clip, q, s)


def test_rotate_quantize_zero_rows_outliers_and_nonfinite(kernel_device, gen):
    x = torch.randn(8, 256, generator=gen, dtype=torch.bfloat16)
    x[1] = 0.0  # all-zero row: scale 0, codes 0, no NaN
    x[2, 7] = 3e4  # huge outlier
    x[3, 100] = float("nan")
    x[4, 200] = float("-inf")
    q, s = _poisoned(8, 256, 64, 4, kernel_device)
    rotate_quantize(x.to(kernel_device), None, 64, 64, 4, out=(q, s))
    q, s = q.cpu(), s.cpu()
    assert (q[1] == 0).all() and torch.equal(s[1], torch.zeros(4))
    clean = [0, 1, 2, 5, 6, 7]
    _check_against_ref(x[clean], None, 64, 64, 4, 1.0, q[clean], s[clean])
    # a non-finite value marks its Hadamard block's group(s) with a NaN scale and zero codes
    assert torch.isnan(s[3, 1]) and torch.isfinite(s[3, [0, 2, 3]]).all()
    assert torch.isnan(s[4, 3]) and torch.isfinite(s[4, :3]).all()
    assert (unpack64(q[3:4])[:, 64:128] == 0).all()


def test_rotate_quantize_reference_backend_agrees(kernel_device, monkeypatch, gen):
    x = torch.randn(5, 128, generator=gen)
    perm = torch.randperm(128, generator=gen)
    qk, sk = rotate_quantize(x.to(kernel_device), perm.to(kernel_device), 32, 32, 4)
    monkeypatch.setenv("CLQ_BACKEND", "torch")
    qr, sr = rotate_quantize(x, perm, 32, 32, 4)
    assert (unpack64(qk.cpu()) - unpack64(qr)).abs().max() <= 1
    torch.testing.assert_close(sk.cpu(), sr)


@pytest.mark.parametrize(
    "shape, dtype, group, bits, err, match",
    [
        ((4, 96), torch.float32, 64, 4, ValueError, "multiple of group_size"),
        ((4, 64), torch.float32, 48, 4, ValueError, "group_size must be"),
        ((4, 64), torch.float32, 64, 3, ValueError, "bits must be 4 or 8"),
        ((4, 64), torch.int8, 64, 4, TypeError, "float16, bfloat16 or float32"),
        ((2, 4, 64), torch.float32, 64, 4, ValueError, "2-D"),
    ],
)
def test_rotate_quantize_errors(shape, dtype, group, bits, err, match):
    with pytest.raises(err, match=match):
        rotate_quantize(torch.zeros(shape, dtype=dtype), None, None, group, bits)


def test_rotate_quantize_rejects_wrong_out():
    x = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="out\\[1\\]"):
        rotate_quantize(x, None, None, 64, 4, out=(torch.empty(4, 32, dtype=torch.uint8),
                                                    torch.empty(4, 2)))


def test_rotate_quantize_channel_scale_matches_reference(kernel_device, gen):
    x = torch.randn(11, 256, generator=gen, dtype=torch.bfloat16)
    cs = torch.rand(256, generator=gen) + 0.5
    perm = torch.randperm(256, generator=gen)
    for block in (64, 512 // 2):
        q, s = _poisoned(11, 256, 64, 4, kernel_device)
        rotate_quantize(x.to(kernel_device), perm.to(kernel_device), block, 64, 4,
                        out=(q, s), channel_scale=cs.to(kernel_device))
        _check_against_ref(x.float() * cs, perm, block, 64, 4, 1.0, q, s)
    with pytest.raises(ValueError, match="channel_scale must be float32"):
        rotate_quantize(x, None, None, 64, 4, channel_scale=cs.double())
