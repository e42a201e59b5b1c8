"""Backend selection and input checks shared by the kernel launchers.

A launcher runs its Triton kernel when the tensor lives on CUDA, or on CPU when the Triton
interpreter is on (``TRITON_INTERPRET=1``, used by the test suite). Otherwise it runs the
plain-PyTorch reference beside the kernel. ``CLQ_BACKEND=torch`` forces the reference
everywhere; ``CLQ_BACKEND=triton`` forces the kernel (and fails loudly where it cannot run).
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_on() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """Whether the launcher for tensor ``t`` should run the Triton kernel."""
    choice = os.environ.get("CLQ_BACKEND", "auto").lower()
    if choice == "torch":
        return False
    if choice == "triton":
        return True
    if choice != "auto":
        raise ValueError(f"CLQ_BACKEND must be 'auto', 'torch' or 'triton', got {choice!r}")
    return t.is_cuda or (t.device.type == "cpu" and interpreter_on())


def check_float(name: str, t: torch.Tensor, ndim: int | None = None) -> None:
    """Raise TypeError/ValueError unless ``t`` is fp16/bf16/fp32 with ``ndim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the tensors when they are not all on one device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device: {where}")


def check_bits(name: str, bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"{name} must be 4 or 8, got {bits!r}")


def check_group(group_size: int, k: int, what: str = "K") -> None:
    """Group sizes are powers of two in [32, 256]; ``k`` must be a multiple of the group."""
    if group_size not in (32, 64, 128, 256):
        raise ValueError(f"group_size must be one of 32, 64, 128, 256, got {group_size!r}")
    if k % group_size != 0:
        raise ValueError(f"{what}={k} is not a multiple of group_size={group_size}")
