"""Backend selection and input checks shared by the kernel launchers.

A launcher runs its Triton kernel when the tensor lives on CUDA, or on CPU when the Triton
interpreter is on (``TRITON_INTERPRET=1``, used by the test suite). Otherwise it runs the
plain-PyTorch reference beside the kernel. The backend can be forced: ``"torch"`` runs the
reference everywhere, ``"triton"`` the kernel (failing loudly where it cannot run).

The environment is read once, at import (``CLQ_BACKEND``, ``TRITON_INTERPRET``,
``CLQ_DIRECT_OPS``); change the backend later with :func:`set_backend` or the :func:`backend`
context manager. Nothing on the hot path reads the environment.

Eager calls of the package's operators skip the dispatcher (:func:`define_op`);
``CLQ_DIRECT_OPS=0`` sends every call through ``torch.ops`` instead.
"""

from __future__ import annotations

import contextlib
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "torch", "triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DIRECT_OPS = os.environ.get("CLQ_DIRECT_OPS", "1") not in ("", "0")


def _checked(choice: str) -> str:
    choice = str(choice).lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    return choice


_backend = _checked(os.environ.get("CLQ_BACKEND", "auto"))


def interpreter_on() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return INTERPRET


def get_backend() -> str:
    return _backend


def set_backend(choice: str) -> None:
    """"auto" (default), "torch" (references everywhere) or "triton" (kernels everywhere)."""
    global _backend
    _backend = _checked(choice)


@contextlib.contextmanager
def backend(choice: str):
    """``with backend("torch"): ...`` runs the block with that backend, then restores it."""
    before = _backend
    set_backend(choice)
    try:
        yield
    finally:
        set_backend(before)


def use_triton(t: torch.Tensor) -> bool:
    """Whether the launcher for tensor ``t`` should run the Triton kernel."""
    if _backend == "auto":
        return t.is_cuda or (INTERPRET and t.device.type == "cpu")
    if _backend == "triton" and not t.is_cuda and not INTERPRET:
        raise RuntimeError(f"backend('triton') runs the kernels, which need CUDA tensors (this "
                           f"one is on {t.device}) or the interpreter (TRITON_INTERPRET=1); "
                           "use backend('auto') or move the model and its inputs to the GPU")
    return _backend == "triton"


_NO_GUARD = contextlib.nullcontext()  # reentrant: one for every call


def device_guard(t: torch.Tensor):
    """The context to launch a kernel on ``t``'s data in: its CUDA device made current
    (Triton launches on the current device, whatever device the pointers belong to: on a
    model spread over GPUs that reads another GPU's memory or crashes); a no-op on the CPU
    and where that device is current already (the usual case: a few µs per launch saved)."""
    if not t.is_cuda:
        return _NO_GUARD
    index = t.get_device()
    return _NO_GUARD if index == torch.cuda.current_device() else torch.cuda.device(index)


_LIB = torch.library.Library("clq_triton", "DEF")  # the package's operators


def define_op(schema: str, impl, fake):
    """Define the operator ``torch.ops.clq_triton.<name>`` from its ``schema`` ("name(Tensor
    x, ...) -> ..."), with ``impl`` as its kernel on every backend and ``fake`` for meta and
    fake tensors (torch.compile, CUDA-graph capture). The low-level ``torch.library`` API:
    the same operator as ``@torch.library.custom_op`` makes, at about half its dispatch cost
    per call (bench/test_bench_model.py::test_host_overhead). No autograd formula
    (inference only).

    Returns the function to call it with: ``impl`` itself for a plain eager call
    (:func:`direct_call`: ~20 µs of dispatch saved), the operator otherwise."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"clq_triton::{name}", fake, lib=_LIB)
    op = getattr(torch.ops.clq_triton, name)
    label = f"clq_triton::{name}"

    def call(x, *args):
        if not direct_call(x, *args):
            return op(x, *args)
        if torch.autograd._profiler_enabled():  # the operator's name, as dispatch records it
            with torch.profiler.record_function(label):
                return impl(x, *args)
        return impl(x, *args)

    return call


def direct_call(x: torch.Tensor, *args) -> bool:
    """Whether an operator call on ``x`` (and ``args``) may run its implementation directly,
    skipping the dispatcher: outside torch.compile's tracing (checked first: dynamo folds it)
    and torch.jit.trace's, with no dispatch mode active in this thread (FakeTensorMode,
    make_fx, ...) and no functorch transform (vmap, grad), on plain tensors (no FakeTensor
    or other subclass) that need no gradient, ``x`` on the CPU or a GPU (a meta tensor takes
    the operator's fake implementation), and unless ``CLQ_DIRECT_OPS=0``. What the
    dispatcher would do then is to run the implementation (CompositeExplicitAutograd)."""
    if (torch.compiler.is_compiling() or not DIRECT_OPS or torch.jit.is_tracing()
            or torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active()):
        return False
    for t in (x, *args):
        if isinstance(t, torch.Tensor) and (type(t) is not torch.Tensor or t.requires_grad):
            return False
    return x.device.type in ("cpu", "cuda")


def check_float(name: str, t: torch.Tensor, ndim: int | None = None) -> None:
    """Raise TypeError/ValueError unless ``t`` is fp16/bf16/fp32 with ``ndim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_tensor(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype) -> None:
    """Raise TypeError on a wrong dtype, ValueError on a wrong shape."""
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the tensors when they are not all on one device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device: {where}")


def check_out(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device) -> None:
    """A preallocated output must match exactly and be contiguous."""
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be {dtype} {tuple(shape)} on {device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if not t.is_contiguous() or t.data_ptr() % 16:
        raise ValueError(f"{name} must be contiguous and 16-byte aligned")


def aligned(t: torch.Tensor | None, rows: bool = False) -> torch.Tensor | None:
    """``t`` itself when its data pointer is a multiple of 16 bytes, its last dim contiguous
    and (``rows``) its row stride a multiple of 16 — the kernels' specialization contract, which
    lets loads vectorize — else an aligned contiguous copy (None stays None)."""
    if t is None:
        return None
    strides = t.stride()
    if t.data_ptr() % 16 == 0 and strides[-1] == 1 and not (rows and strides[0] % 16):
        return t
    c = torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
    assert c.data_ptr() % 16 == 0, "torch allocations are 16-byte aligned"
    return c
