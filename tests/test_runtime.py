import pytest
import torch

import clq_triton
from clq_triton.kernels import _runtime


def test_backend_is_not_read_from_the_environment_per_call(monkeypatch):
    x = torch.zeros(2)
    before = _runtime.use_triton(x)
    monkeypatch.setenv("CLQ_BACKEND", "torch" if before else "triton")
    assert _runtime.use_triton(x) == before  # read once, at import


def test_set_backend_and_context_manager():
    x = torch.zeros(2)
    start = clq_triton.get_backend()
    with clq_triton.backend("torch"):
        assert clq_triton.get_backend() == "torch" and not _runtime.use_triton(x)
        with clq_triton.backend("triton"):
            assert _runtime.use_triton(x)
        assert clq_triton.get_backend() == "torch"
    assert clq_triton.get_backend() == start
    with pytest.raises(ValueError, match="backend must be one of"):
        clq_triton.set_backend("cuda")


def test_triton_backend_on_cpu_tensors_without_the_interpreter_says_why(monkeypatch):
    """backend('triton') with CPU tensors on a machine that compiles (a GPU machine): a clear
    error instead of Triton's "Pointer argument cannot be accessed" (seen on an H200)."""
    monkeypatch.setattr(_runtime, "INTERPRET", False)
    with clq_triton.backend("triton"):
        with pytest.raises(RuntimeError, match="need CUDA tensors .* or the interpreter"):
            _runtime.use_triton(torch.zeros(2))
    with clq_triton.backend("auto"):
        assert not _runtime.use_triton(torch.zeros(2))


def test_aligned_copies_only_odd_views():
    t = torch.zeros(8, 64, dtype=torch.uint8)
    assert _runtime.aligned(t, rows=True) is t
    odd = torch.zeros(8, 70, dtype=torch.uint8)[:, 3:67]
    fixed = _runtime.aligned(odd, rows=True)
    assert fixed is not odd and torch.equal(fixed, odd)
    assert fixed.data_ptr() % 16 == 0 and fixed.stride(0) % 16 == 0
    assert _runtime.aligned(None) is None


class _GuardProbe:
    """Stands in for a launcher's device_guard and its Triton kernel: records, at each
    kernel launch, the device of the guard that is open (None: launched unguarded)."""

    def __init__(self):
        self.open: list = []
        self.launches: list = []

    def guard(self, t):
        probe = self

        class _Ctx:
            def __enter__(self):
                probe.open.append(t.device)

            def __exit__(self, *exc):
                probe.open.pop()

        return _Ctx()

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append(self.open[-1] if self.open else None)


def test_every_kernel_launch_runs_under_its_inputs_device_guard(monkeypatch):
    """Triton launches on the current CUDA device; each launcher must make its input's device
    current first. Without a GPU: every launch of both kernels happens inside the launcher's
    device_guard, opened for the input's device (remove a guard and this fails)."""
    from clq_triton.kernels import gemm
    from clq_triton.kernels import rotate_quantize as rq

    probe = _GuardProbe()
    for mod, kernel in ((rq, "_rotate_quantize_kernel"), (gemm, "_quant_matmul_kernel")):
        monkeypatch.setattr(mod, "device_guard", probe.guard)
        monkeypatch.setattr(mod, kernel, probe)
    x = torch.randn(8, 128)
    with clq_triton.backend("triton"):
        for group in (None, 64):  # per token: two launches (phases); per group: one
            xq, xs = rq.rotate_quantize(x, None, 64, group, 4)
            wq, ws = rq.rotate_quantize(torch.randn(16, 128), None, 64, group, 4)
            wz = torch.ones(16, 2, dtype=torch.uint8) if group else None
            gemm.quant_matmul(xq, xs, wq, ws[:, 0].contiguous(), wz, None, 4, 4, group)
    assert len(probe.launches) >= 6 and set(probe.launches) == {x.device}


def test_device_guard_is_a_no_op_on_the_cpu():
    with _runtime.device_guard(torch.zeros(1)):
        pass


def test_device_guard_switches_only_to_another_gpu(monkeypatch):
    """Without a GPU: a tensor on the current device needs no switch; one on another device
    gets torch.cuda.device of its index."""

    class OnGpu:
        is_cuda = True

        def __init__(self, index):
            self.index = index

        def get_device(self):
            return self.index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _runtime.device_guard(OnGpu(1)) is _runtime.device_guard(torch.zeros(1))  # no-op
    guard = _runtime.device_guard(OnGpu(0))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_layer_on_the_second_gpu_runs_there_while_the_first_is_current():
    from clq_triton import QuantConfig, QuantLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64)
    ref = QuantLinear.from_linear(lin, QuantConfig())
    x = torch.randn(33, 128)
    with clq_triton.backend("torch"):
        want = ref(x)
    q = QuantLinear.from_linear(lin, QuantConfig()).to("cuda:1")
    torch.cuda.set_device(0)
    got = q(x.to("cuda:1"))
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)


def test_direct_calls_keep_their_operator_names_in_the_profiler():
    """Eager calls skip the dispatcher (define_op) but not the profiler: each records an event
    named as the operator (bench/profile_forward.py counts the quantized calls and their host
    time by these names)."""
    from torch.profiler import ProfilerActivity, profile

    from clq_triton import QuantConfig, QuantLinear

    q = QuantLinear.from_linear(torch.nn.Linear(128, 32), QuantConfig())
    x = torch.randn(3, 128)
    assert _runtime.DIRECT_OPS and _runtime.direct_call(x)  # the route under test
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        q(x)
        q(x)
    names = [e.name for e in prof.events()]
    assert names.count("clq_triton::rotate_quantize") == 2
    assert names.count("clq_triton::quant_matmul") == 2


def test_direct_call_only_for_plain_eager_tensors():
    """The dispatcher is skipped only where it would run the implementation itself: a meta
    tensor (its fake implementation), a gradient needed by any argument, a functorch
    transform or a dispatch mode take the operator."""
    from torch.utils._python_dispatch import TorchDispatchMode

    x = torch.zeros(2, 3)
    assert _runtime.direct_call(x, torch.zeros(3), None, 4)
    assert not _runtime.direct_call(torch.zeros(2, 3, device="meta"))
    assert not _runtime.direct_call(x, torch.zeros(3, requires_grad=True))
    assert not _runtime.direct_call(torch.zeros(2, 3, requires_grad=True))
    seen = []
    torch.vmap(lambda t: seen.append(_runtime.direct_call(t)) or t)(torch.zeros(2, 3))
    assert seen == [False]

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert not _runtime.direct_call(x)


def test_a_meta_model_runs_its_fake_implementation_under_every_backend():
    """Shape probes of an empty-weight model: a QuantLinear on the meta device returns a meta
    output of the right shape, also with backend('triton') (the direct call used to run the
    real implementation, which refused the meta tensor)."""
    from clq_triton import QuantConfig, QuantLinear

    q = QuantLinear.from_linear(torch.nn.Linear(128, 32), QuantConfig()).to("meta")
    for choice in ("auto", "triton", "torch"):
        with clq_triton.backend(choice):
            y = q(torch.zeros(5, 128, device="meta"))
        assert y.device.type == "meta" and y.shape == (5, 32)
