import pytest
import torch

from clq_triton.kernels._runtime import backend
from clq_triton.kernels.formats import pack_int4_ref
from clq_triton.kernels.gemm import quant_matmul
from helpers import TOL, dequant64

PAIRS = [(4, 4), (4, 8), (8, 8)]  # (w_bits, a_bits)
GROUPS = [None, 64, 128, 256]


def _operands(m, n, k, w_bits, a_bits, group, gen):
    """Random codes (natural order, int8), their stored forms and integer group scales."""
    qa, qw = (7 if a_bits == 4 else 127), (7 if w_bits == 4 else 127)
    a = torch.randint(-qa, qa + 1, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-qw, qw + 1, (n, k), generator=gen, dtype=torch.int8)
    xq = pack_int4_ref(a) if a_bits == 4 else a
    wq = pack_int4_ref(b) if w_bits == 4 else b
    wz = None
    if w_bits == 4 and group is not None:
        wz = torch.randint(1, 17, (n, k // group), generator=gen, dtype=torch.uint8)
    return a, b, xq, wq, wz


def _weights64(b, wz, ws):
    """float64 dequantized weights: codes · z (per group) · ws (per channel)."""
    w = b.double()
    if wz is not None:
        w = dequant64(b, wz.double())
    return w * ws.double()[:, None]


def _on(dev, *ts):
    return [t.to(dev) if t is not None else None for t in ts]


@pytest.mark.parametrize("w_bits, a_bits", PAIRS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("m, n, k", [(1, 48, 256), (17, 64, 512), (3, 33, 256), (100, 96, 768)])
def test_gemm_integer_sums_exact(kernel_device, w_bits, a_bits, group, m, n, k, gen):
    """With unit / power-of-two scales the fp32 result must equal the exact integer product."""
    if group and k % group:
        pytest.skip("K not a multiple of the group")
    a, b, xq, wq, wz = _operands(m, n, k, w_bits, a_bits, group, gen)
    xs = torch.ones(m, k // group if group else 1)
    ws = torch.full((n,), 0.25)
    out = torch.full((m, n), float("nan"), device=kernel_device)
    y = quant_matmul(*_on(kernel_device, xq, xs, wq, ws, wz), None, a_bits, w_bits, group,
                     torch.float32, out=out)
    assert y.data_ptr() == out.data_ptr()
    exact = a.long() @ (_weights64(b, wz, torch.ones(n)).long()).T
    assert torch.equal(y.cpu().double(), exact.double() * 0.25)


@pytest.mark.parametrize("w_bits, a_bits", PAIRS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", GROUPS)
def test_gemm_scaled_matches_float64(kernel_device, w_bits, a_bits, out_dtype, group, gen):
    m, n, k = 37, 40, 512
    a, b, xq, wq, wz = _operands(m, n, k, w_bits, a_bits, group, gen)
    xs = torch.rand(m, k // group if group else 1, generator=gen) + 0.01
    ws = torch.rand(n, generator=gen) * 0.1
    bias = torch.randn(n, generator=gen).to(out_dtype)
    y = quant_matmul(*_on(kernel_device, xq, xs, wq, ws, wz, bias), a_bits, w_bits, group,
                     out_dtype)
    assert y.dtype == out_dtype and y.shape == (m, n)
    expect = dequant64(a, xs) @ _weights64(b, wz, ws).T + bias.double()
    scale = expect.abs().max().item()
    torch.testing.assert_close(y.cpu().double(), expect, rtol=TOL[out_dtype],
                               atol=TOL[out_dtype] * scale)


@pytest.mark.parametrize("group", [None, 64])
def test_gemm_nan_scale_poisons_only_its_row(kernel_device, group, gen):
    a, b, xq, wq, wz = _operands(4, 32, 128, 4, 4, group, gen)
    xs = torch.ones(4, 2 if group else 1)
    xs[2, -1] = float("nan")
    y = quant_matmul(*_on(kernel_device, xq, xs, wq, torch.ones(32), wz), None, 4, 4, group,
                     torch.float32).cpu()
    assert torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3]]).all()


@pytest.mark.parametrize("group", [None, 128])
def test_gemm_reference_backend_agrees(kernel_device, group, gen):
    a, b, xq, wq, wz = _operands(9, 24, 256, 4, 4, group, gen)
    xs, ws = torch.rand(9, 2 if group else 1, generator=gen), torch.rand(24, generator=gen)
    yk = quant_matmul(*_on(kernel_device, xq, xs, wq, ws, wz), None, 4, 4, group, torch.float32)
    with backend("torch"):
        yr = quant_matmul(xq, xs, wq, ws, wz, None, 4, 4, group, torch.float32)
    # the reference is one fp32 matmul of dequantized operands: fp32 rounding apart
    torch.testing.assert_close(yk.cpu(), yr, rtol=1e-5, atol=1e-5 * yr.abs().max().item())


def test_gemm_unaligned_views(kernel_device, gen):
    """Odd views (unaligned data pointers, strided rows) give the same result (the launcher
    copies them to keep the kernel's alignment contract)."""
    a, b, xq, wq, wz = _operands(6, 40, 256, 4, 4, 64, gen)
    xs, ws = torch.rand(6, 4, generator=gen), torch.rand(40, generator=gen)
    big = torch.zeros(6, 128 + 3, dtype=torch.uint8)
    big[:, 3:] = xq
    bias = torch.randn(41, generator=gen)[1:]
    args = _on(kernel_device, big[:, 3:], xs, wq, ws, wz, bias)
    y = quant_matmul(*args, 4, 4, 64, torch.float32)
    expect = dequant64(a, xs) @ _weights64(b, wz, ws).T + bias.double()
    torch.testing.assert_close(y.cpu().double(), expect, rtol=1e-5, atol=1e-4)


def test_gemm_empty_m(kernel_device):
    xq = torch.empty(0, 32, dtype=torch.uint8, device=kernel_device)
    wq = torch.zeros(8, 32, dtype=torch.uint8, device=kernel_device)
    y = quant_matmul(xq, torch.empty(0, 1, device=kernel_device), wq,
                     torch.ones(8, device=kernel_device), None, None, 4, 4, None)
    assert y.shape == (0, 8)


def _args(**over):
    args = dict(xq=torch.zeros(4, 32, dtype=torch.uint8), xs=torch.ones(4, 1),
                wq=torch.zeros(8, 32, dtype=torch.uint8), ws=torch.ones(8), wz=None,
                bias=None, a_bits=4, w_bits=4, group_size=None)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, err, match",
    [
        (dict(xq=torch.zeros(4, 32, dtype=torch.int8)), TypeError, "xq must be torch.uint8"),
        (dict(wq=torch.zeros(8, 64, dtype=torch.uint8)), ValueError, "K=64 but weights have K=128"),
        (dict(xs=torch.ones(4, 2)), ValueError, "xs must have shape"),
        (dict(xs=torch.ones(4, 1, dtype=torch.float16)), TypeError, "xs must be torch.float32"),
        (dict(ws=torch.ones(8, 1)), ValueError, "ws must have shape"),
        (dict(group_size=48), ValueError, "group_size must be"),
        (dict(group_size=64, xs=torch.ones(4, 1)), ValueError, "need wz"),
        (dict(wz=torch.ones(8, 1, dtype=torch.uint8)), ValueError, "wz exists only"),
        (dict(a_bits=2), ValueError, "a_bits must be 4 or 8"),
        (dict(a_bits=4, w_bits=8, wq=torch.zeros(8, 64, dtype=torch.int8)), ValueError,
         "w8a4 is not supported"),
        (dict(bias=torch.zeros(7)), ValueError, "bias must have 8"),
        (dict(bias=torch.zeros(8, device="meta")), ValueError, "one device"),
    ],
)
def test_gemm_errors(over, err, match):
    with pytest.raises(err, match=match):
        quant_matmul(**_args(**over))


def test_gemm_refuses_a_per_channel_k_whose_int32_sum_could_overflow():
    from clq_triton import QuantConfig, QuantLinear
    from clq_triton.kernels.formats import MAX_K_PER_CHANNEL

    k = MAX_K_PER_CHANNEL + 64  # 131072: every code −8 would sum to exactly 2**31
    args = dict(xq=torch.zeros(1, k // 2, dtype=torch.uint8), xs=torch.ones(1, 1),
                wq=torch.zeros(1, k // 2, dtype=torch.uint8), ws=torch.ones(1), wz=None,
                bias=None, a_bits=4, w_bits=4, group_size=None)
    with pytest.raises(ValueError, match="overflow; use a group size"):
        quant_matmul(**args)
    with pytest.raises(ValueError, match="overflow; use a group size"):  # the layer too
        QuantLinear(k, 8, config=QuantConfig(group_size=None))
    QuantLinear(k, 8, config=QuantConfig(group_size=64))  # per group: accepted


def _run_ptx(asm: str, word: int) -> int:
    """A tiny emulator of the b32 PTX that _nibbles_x16 inlines: shl / and, $1 in, $0 out."""
    regs = {"$1": word}
    for ins in asm.strip("{} ").split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        dst, a, b = (t.strip() for t in rest.split(","))
        x, y = regs[a], (int(b, 0) if b[0].isdigit() else regs[b])
        ops = {"shl.b32": lambda: x << y, "and.b32": lambda: x & y}
        if op not in ops:
            raise AssertionError(f"the emulator does not know {op}: extend it with the kernel")
        regs[dst] = ops[op]() & 0xFFFFFFFF
    return regs["$0"]


def test_nibble_unpack_ptx_gives_16_times_each_signed_nibble(gen):
    """The inline PTX of the GEMM's 4-bit unpack (run by every compiled launch, never by the
    interpreter), emulated on random 32-bit words: each byte h·16 + l becomes 16·l and 16·h
    (signed nibbles), as the interpreter's int8 path computes and as the split-halves packing
    (pack_int4_ref) put them."""
    import inspect
    import re

    from clq_triton.kernels import gemm

    src = inspect.getsource(gemm).split("def _nibbles_x16")[1].split("@triton.jit")[0]
    lo_asm, hi_asm = re.findall(r'"(\{?[^"]*\.b32[^"]*)"', src)
    codes = torch.randint(-8, 8, (4, 64), generator=gen, dtype=torch.int8)
    packed = pack_int4_ref(codes)  # uint8 [4, 32]: byte j = lo code j, hi code j + 32
    words = packed.contiguous().view(torch.int32).view(-1).tolist()
    lo = torch.tensor([_run_ptx(lo_asm, w & 0xFFFFFFFF) for w in words], dtype=torch.int64)
    hi = torch.tensor([_run_ptx(hi_asm, w & 0xFFFFFFFF) for w in words], dtype=torch.int64)
    as_bytes = lambda t: t.to(torch.int32).view(torch.int8).view(4, 32)  # noqa: E731
    assert torch.equal(as_bytes(lo).to(torch.int32), codes[:, :32].to(torch.int32) * 16)
    assert torch.equal(as_bytes(hi).to(torch.int32), codes[:, 32:].to(torch.int32) * 16)
    raw = packed.view(torch.int8)  # the interpreter's path, in int8 like the kernel
    assert torch.equal(raw << 4, as_bytes(lo)) and torch.equal((raw >> 4) << 4, as_bytes(hi))


@pytest.mark.parametrize("w_bits, a_bits", PAIRS)
@pytest.mark.parametrize("group", GROUPS)
def test_gemm_weight_left_product_is_the_same(kernel_device, w_bits, a_bits, group, gen,
                                              monkeypatch):
    """GemmConfig(W_LEFT=True), the transposed product (the weight as the left dot operand):
    exact integer sums and the scaled result as the plain product's, bit for bit."""
    from clq_triton.kernels import gemm
    from clq_triton.kernels.tuning import GemmConfig

    m, n, k = 19, 40, 512
    a, b, xq, wq, wz = _operands(m, n, k, w_bits, a_bits, group, gen)
    xs = torch.rand(m, k // group if group else 1, generator=gen) + 0.01
    ws = torch.rand(n, generator=gen) * 0.1
    args = (*_on(kernel_device, xq, xs, wq, ws, wz), None, a_bits, w_bits, group,
            torch.float32)
    plain = quant_matmul(*args)
    base = GemmConfig(64, 64, 64, 4, 2) if kernel_device == "cuda" else GemmConfig(16, 32, 64,
                                                                                   4, 1)
    chosen = []

    def config(xq, m, n, k, a_bits, w_bits, group_size, launch):
        cfg = GemmConfig(**{**base.__dict__, "W_LEFT": True}).fitted(k, group_size, a_bits,
                                                                   w_bits)
        chosen.append(cfg)
        return cfg

    monkeypatch.setattr(gemm, "_config", config)
    left = quant_matmul(*args)
    assert chosen[-1].W_LEFT == (w_bits == 4)  # nothing to unpack on 8-bit weights
    ones = quant_matmul(*_on(kernel_device, xq, torch.ones_like(xs), wq, torch.ones(n), wz),
                        None, a_bits, w_bits, group, torch.float32)
    exact = a.long() @ (_weights64(b, wz, torch.ones(n)).long()).T
    assert torch.equal(ones.cpu().double(), exact.double())
    assert torch.equal(left, plain)
