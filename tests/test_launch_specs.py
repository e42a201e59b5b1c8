"""The launchers launch only what tests/test_compile.py compiles: the pointer types of every
launch equal the kernel's declared signature, its compile-time arguments are among the
enumerated specializations, and its ALIGNED arguments are multiples of 16. (Kept apart from
test_compile.py, which CI also runs under the oldest triton, whose interpreter cannot run the
kernels.)"""

import pytest
import torch

from clq_triton.kernels.formats import BIT_PAIRS

_TRITON_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
                 torch.int8: "*i8", torch.uint8: "*u8", torch.int32: "*i32"}


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _launch_types(kernel, args, aligned_names):
    """The pointer types of a recorded launch, as the signature names them; and a check that
    the arguments named ALIGNED are multiples of 16 (bytes for pointers), as compiled."""
    names = kernel.arg_names
    for n, a in zip(names, args):
        if n in aligned_names:
            assert (a.data_ptr() if torch.is_tensor(a) else a) % 16 == 0, n
    return {n: _TRITON_TYPES[a.dtype] for n, a in zip(names, args) if torch.is_tensor(a)}


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.float32])
def test_gemm_launches_only_signatures_the_check_compiles(kernel_device, monkeypatch, out_dtype,
                                                          bias_dtype, gen):
    import clq_triton.kernels.gemm as gemm
    from clq_triton.kernels.formats import pack_codes
    from clq_triton.kernels.quantize import quantize_ref, quantize_weight_ref

    rec = _Recorder(gemm._quant_matmul_kernel)
    monkeypatch.setattr(gemm, "_quant_matmul_kernel", rec)
    for w_bits, a_bits in BIT_PAIRS:
        for group in (None, 64):
            xc, xs = quantize_ref(torch.randn(5, 128, generator=gen), group, a_bits)
            wc, ws, wz = quantize_weight_ref(torch.randn(16, 128, generator=gen), group, w_bits)
            bias = torch.randn(16, generator=gen).to(bias_dtype) if bias_dtype else None
            args = [t.to(kernel_device) if t is not None else None for t in
                    (pack_codes(xc, a_bits), xs, pack_codes(wc, w_bits), ws, wz, bias)]
            gemm.quant_matmul(*args, a_bits, w_bits, group, out_dtype)
            (launch_args, kwargs), = rec.calls[-1:]
            sig = gemm.signature(a_bits, w_bits, out_dtype)
            assert _launch_types(rec.kernel, launch_args, gemm.ALIGNED) == {
                k: v for k, v in sig.items() if k.endswith("_ptr")}
            assert (kwargs["A_BITS"], kwargs["W_BITS"], kwargs["GROUP"]) == (
                a_bits, w_bits, group or 0)
    assert len(rec.calls) == 2 * len(BIT_PAIRS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rotate_launches_only_specs_the_check_compiles(kernel_device, monkeypatch, dtype, gen):
    import clq_triton.kernels.rotate_quantize as rq

    rec = _Recorder(rq._rotate_quantize_kernel)
    monkeypatch.setattr(rq, "_rotate_quantize_kernel", rec)
    x = torch.randn(5, 1024, generator=gen).to(dtype).to(kernel_device)
    perm = torch.randperm(1024, generator=gen).to(kernel_device)  # int64: converted
    specs = {(p["dtype"], tuple(sorted((k, v) for k, v in p["constexprs"].items()
                                      if k != "BM"))) for p in rq.kernel_specs()}
    for block in (None, 16, 64, 256, 512):
        for group in (None, 64, 256):
            for bits, packed in ((4, True), (4, False), (8, True)):
                before = len(rec.calls)
                rq.rotate_quantize(x, perm, block, group, bits, packed=packed)
                for args, kwargs in rec.calls[before:]:  # two launches for split spans
                    launched = (args[0].dtype, tuple(sorted((k, v) for k, v in kwargs.items()
                                                            if k not in ("BM", "num_warps"))))
                    assert launched in specs
                    assert _launch_types(rec.kernel, args, rq.ALIGNED) == {
                        k: v for k, v in rq.signature(args[0].dtype).items()
                        if k.endswith("_ptr")}
                    # the code format and the butterfly are runtime arguments: one spec for all
                    arg = dict(zip(rec.kernel.arg_names, args))
                    assert arg["qmax"] == (7.0 if bits == 4 else 127.0)
                    assert arg["packed"] is (bits == 4 and packed)
                    assert arg["butterfly"] is ((block or 0) >= 64)  # blocks 16-64: one spec
    # 5 rows are one row block: per-token scales and groups of 256 on 64-wide tiles go split
    assert {kwargs["PHASE"] for _, kwargs in rec.calls} == {0, 1, 2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotate_uses_exact_dots_for_shifted_or_scaled_inputs(kernel_device, monkeypatch, dtype,
                                                              gen):
    """fp16/bf16 values are exact in tf32, so their Hadamard dots run in plain tf32; after a
    float32 channel shift or multiplier they are not (plain tf32 cost 5e-4 relative error on
    an H100, which the interpreter's float32 dots do not show): those launches split the
    values into two tf32 parts ("tf32x2"), also at block 256, in the kernel."""
    import clq_triton.kernels.rotate_quantize as rq

    rec = _Recorder(rq._rotate_quantize_kernel)
    monkeypatch.setattr(rq, "_rotate_quantize_kernel", rec)
    x = torch.randn(5, 256, generator=gen).to(dtype).to(kernel_device)
    vec = (torch.rand(256, generator=gen) + 0.5).to(kernel_device)
    for shift, scale, prec in ((None, None, "tf32"), (vec, None, "tf32x2"),
                               (None, vec, "tf32x2"), (vec, vec, "tf32x2")):
        rq.rotate_quantize(x, None, 64, 64, 4, channel_shift=shift, channel_scale=scale)
        assert rec.calls[-1][1]["PREC"] == prec
    # block 256 stays in the kernel (81920 B of shared memory, like plain tf32: compile check)
    rq.rotate_quantize(x, None, 256, 64, 4, channel_shift=vec)
    args, kwargs = rec.calls[-1]
    assert args[0].dtype == dtype and kwargs["T"] == 256 and kwargs["PREC"] == "tf32x2"
    # blocks above 256: the launcher applies the shift and the outer Hadamard factor in
    # PyTorch (float32) and the kernel the inner 256
    rq.rotate_quantize(x[:, :256].repeat(1, 2), None, 512, 64, 4,
                       channel_shift=torch.cat([vec, vec]))
    args, kwargs = rec.calls[-1]
    assert args[0].dtype == torch.float32 and kwargs["T"] == 256 and kwargs["PREC"] == "tf32x2"
    specs = {tuple(sorted((k, v) for k, v in p["constexprs"].items() if k != "BM"))
             for p in rq.kernel_specs() if p["dtype"] == dtype}
    for _, kwargs in rec.calls:  # and the compile tests compile both precisions
        assert tuple(sorted((k, v) for k, v in kwargs.items()
                            if k not in ("BM", "num_warps"))) in specs


def test_layers_without_a_rotation_share_one_precision(kernel_device, monkeypatch, gen):
    """PREC only chooses how the Hadamard dots run: without a rotation (block None) every
    input (fp32, or shifted and scaled) takes the same specialization, so neither a GPU nor
    the compile checks compile a second copy of the same kernel."""
    import clq_triton.kernels.rotate_quantize as rq

    rec = _Recorder(rq._rotate_quantize_kernel)
    monkeypatch.setattr(rq, "_rotate_quantize_kernel", rec)
    vec = (torch.rand(128, generator=gen) + 0.5).to(kernel_device)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(3, 128, generator=gen).to(dtype).to(kernel_device)
        for shift in (None, vec):
            rq.rotate_quantize(x, None, None, 64, 4, channel_shift=shift)
            assert rec.calls[-1][1]["ROT"] == 0 and rec.calls[-1][1]["PREC"] == "tf32"
    assert {p["constexprs"]["PREC"] for p in rq.kernel_specs()
            if p["constexprs"]["ROT"] == 0} == {"tf32"}
