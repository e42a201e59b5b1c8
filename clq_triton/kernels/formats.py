"""Storage formats of quantized tensors: the one place for bit widths, group sizes, code
dtypes and the INT4 packing, used by QuantConfig, QuantLinear, the launchers and the tests.

Format version 2 (``FORMAT_VERSION``):

Codes are symmetric integers: 4 bits → [-7, 7], 8 bits → [-127, 127].

INT4 packing, "split halves": K is cut into pack tiles of ``PACK_TILE`` = 64 columns; in
each tile, byte j (0 ≤ j < 32) holds column j in its low nibble and column j + 32 in its
high nibble (two's-complement nibbles). Byte b of a row therefore holds columns
``64·(b // 32) + b % 32`` (low) and that + 32 (high). A kernel turns a loaded byte tile into
two int8 tiles with elementwise shifts only — ``(b << 4) >> 4`` and ``b >> 4`` — and feeds
the low halves of activations and weights to one dot and the high halves to another
(a dot over K does not care in which order K is summed). Weights and activations use the
same layout. 8-bit codes are stored unpacked in natural column order.

Scale modes, chosen by ``group_size``:
- ``None`` (per channel): activations one float32 scale per token, [M, 1]; weights one
  float32 scale per output channel, [N]. The GEMM accumulates all of K in int32 and rescales
  once in the epilogue (QuaRot's scheme when combined with the Hadamard rotation).
- 64 / 128 / 256 (per group): activations one float32 scale per token per group,
  [M, K / G], applied once per group in the GEMM's K loop. 4-bit weights use a two-level
  code: a float32 scale per output channel [N] times a small integer per group
  (uint8 [N, K / G], in [1, ``GROUP_INT_MAX``]), so ``code · int`` is an int8 value
  (|7 · 16| ≤ 127) computed in registers and the float rescale stays in the epilogue.
  8-bit weights keep one float scale per output channel in both modes.

Int8 operands (``QuantLinear.use_int8_operands``): GPUs from Hopper on have no int4 tensor-core
dot, so the packed kernels unpack every loaded tile. Instead, 4-bit codes can be kept one per
int8 in natural column order: activations quantized to [-7, 7] (``storage_bits(4, packed=
False)`` = 8) and weights as ``code · int`` (:func:`int8_weight_codes`). The GEMM is then the
W8A8 kernel with the same exact integer sums and the same float rescales as the packed one.
"""

from __future__ import annotations

import torch

FORMAT_VERSION = 2
PACK_TILE = 64  # columns per INT4 pack tile; K must be a multiple of it
GROUP_SIZES = (None, 64, 128, 256)  # None = per token / per output channel
BIT_PAIRS = ((4, 4), (4, 8), (8, 8))  # supported (w_bits, a_bits): W4A4, W4A8, W8A8
GROUP_INT_MAX = 16  # largest per-group integer of two-level 4-bit weights


def qmax_for(bits: int) -> int:
    """Largest code magnitude: 7 for 4 bits, 127 for 8 bits."""
    check_bits("bits", bits)
    return 7 if bits == 4 else 127


def storage_bits(bits: int, packed: bool = True) -> int:
    """Bits per stored code: 4 for packed 4-bit codes; 8 for 8-bit codes and for 4-bit codes
    kept one per int8 (``packed=False``)."""
    check_bits("bits", bits)
    return 4 if bits == 4 and packed else 8


def code_dtype(bits: int) -> torch.dtype:
    """Storage dtype of codes: uint8 (packed pairs) for 4 bits, int8 for 8 bits."""
    return torch.uint8 if bits == 4 else torch.int8


def stored_columns(bits: int, k: int) -> int:
    """Columns of the stored code tensor for K logical columns (K/2 when packed)."""
    return k // 2 if bits == 4 else k


def logical_columns(bits: int, stored: int) -> int:
    return stored * 2 if bits == 4 else stored


def n_groups(group_size: int | None, k: int) -> int:
    """Scales per row: K / group_size, or 1 per token / channel when group_size is None."""
    return 1 if group_size is None else k // group_size


def check_bits(name: str, bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"{name} must be 4 or 8, got {bits!r}")


def check_bit_pair(w_bits: int, a_bits: int) -> None:
    check_bits("w_bits", w_bits)
    check_bits("a_bits", a_bits)
    if (w_bits, a_bits) not in BIT_PAIRS:
        raise ValueError(f"w{w_bits}a{a_bits} is not supported; use one of "
                         + ", ".join(f"w{w}a{a}" for w, a in BIT_PAIRS))


def check_group_size(group_size: int | None) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be None (per channel) or one of 64, 128, 256, "
                         f"got {group_size!r}")


# Per channel the GEMM's one int32 sum runs over all of K: |code product| ≤ 128 · 128 (4-bit
# codes times 16, or 8-bit codes), so K · 2**14 ≤ 2**31 − 1 keeps it exact (the largest
# multiple of 64).
MAX_K_PER_CHANNEL = 131008


def check_k(k: int, group_size: int | None, what: str = "K") -> None:
    """K must be a positive multiple of PACK_TILE (64) and of the group size, and per channel
    at most MAX_K_PER_CHANNEL."""
    check_group_size(group_size)
    if k <= 0 or k % PACK_TILE:
        raise ValueError(f"{what}={k} is not a positive multiple of {PACK_TILE}")
    if group_size is not None and k % group_size:
        raise ValueError(f"{what}={k} is not a multiple of group_size={group_size}")
    if group_size is None and k > MAX_K_PER_CHANNEL:
        raise ValueError(f"{what}={k} > {MAX_K_PER_CHANNEL}: the per-channel int32 sum could "
                         "overflow; use a group size")


def pack_int4_ref(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [..., K] (K a multiple of 64) → uint8 [..., K/2], split halves."""
    k = codes.shape[-1]
    if k % PACK_TILE:
        raise ValueError(f"K={k} must be a multiple of {PACK_TILE} to pack int4")
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], k // PACK_TILE, 2, PACK_TILE // 2)
    packed = (c[..., 0, :] & 0xF) | ((c[..., 1, :] & 0xF) << 4)
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], k // 2)


def unpack_int4_ref(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] → int8 codes [..., K] (inverse of pack_int4_ref)."""
    k = packed.shape[-1] * 2
    if k % PACK_TILE:
        raise ValueError(f"packed rows of {packed.shape[-1]} bytes are not whole pack tiles")
    p = packed.to(torch.int32).reshape(*packed.shape[:-1], k // PACK_TILE, PACK_TILE // 2)
    halves = torch.stack([((p & 0xF) ^ 8) - 8, ((p >> 4) ^ 8) - 8], dim=-2)
    return halves.to(torch.int8).reshape(*packed.shape[:-1], k)


def unpack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored codes → int8 [..., K] in natural column order."""
    return unpack_int4_ref(q) if bits == 4 else q


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes [..., K] → stored form (packed for 4 bits)."""
    return pack_int4_ref(codes) if bits == 4 else codes


def int8_weight_codes(qweight: torch.Tensor, w_bits: int,
                      wgroup: torch.Tensor | None) -> torch.Tensor:
    """Stored weight codes as int8 [N, K] in natural column order, with two-level 4-bit
    weights' per-group integers (uint8 [N, K / G]) multiplied in (|code · int| ≤ 7 ·
    GROUP_INT_MAX = 112): the operand of the W8A8 GEMM path, which then needs only the float
    scale per channel."""
    codes = unpack_codes(qweight, w_bits)
    if wgroup is not None:
        group = codes.shape[-1] // wgroup.shape[-1]
        codes = codes * wgroup.to(torch.int8).repeat_interleave(group, dim=-1)
    return codes.contiguous()
