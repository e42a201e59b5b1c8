"""Quantization settings shared by QuantLinear, patch() and calibration."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from .kernels.formats import check_bit_pair, check_group_size
from .kernels.hadamard import is_power_of_two


def check_count(name: str, value, minimum: int) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class QuantConfig:
    """How a Linear is quantized.

    w_bits / a_bits: W4A4, W4A8 or W8A8.
    group_size: 64, 128 or 256 elements per activation scale along K (per token), and per
        integer group scale of 4-bit weights; None = one scale per token and per output
        channel, the fastest mode (see kernels.formats).
    hadamard_block: block size B of the block-diagonal Hadamard rotation (power of two >= 16),
        or None for no rotation (plain RTN).
    w_clip / a_clip: clipping ratios in (0, 1] applied to each group's max before scaling.
    lowrank: rank r of a full-precision low-rank branch (SVDQuant): the weight, after the
        channel transform, is split into its best rank-r part L (from its SVD), kept in the
        model's dtype and applied to the unquantized input, and a residual quantized like
        any weight; 0 = no branch. Clamped to min(N, K) per layer.
    w_clip_segments: ((rows, w_clip), ...) from the first output row down, summing to N: a
        weight clip per output segment of a fused layer (q, k and v of one ``to_qkv``), which
        overrides ``w_clip``; weights are scaled per output row, so it costs nothing at run
        time. () = ``w_clip`` for every row.
    """

    w_bits: int = 4
    a_bits: int = 4
    group_size: int | None = 64
    hadamard_block: int | None = 64
    w_clip: float = 1.0
    a_clip: float = 1.0
    lowrank: int = 0
    w_clip_segments: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        check_bit_pair(self.w_bits, self.a_bits)
        check_group_size(self.group_size)
        b = self.hadamard_block
        if b is not None and (not isinstance(b, int) or not is_power_of_two(b) or b < 16):
            raise ValueError(f"hadamard_block must be None or a power of two >= 16, got {b!r}")
        for name in ("w_clip", "a_clip"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        check_count("lowrank", self.lowrank, 0)
        try:  # lists (from JSON) become tuples: the config stays hashable
            segments = tuple((rows, float(clip)) for rows, clip in self.w_clip_segments)
        except (TypeError, ValueError):
            raise ValueError("w_clip_segments must be (rows, w_clip) pairs, got "
                             f"{self.w_clip_segments!r}") from None
        for rows, clip in segments:
            check_count("w_clip_segments rows", rows, 1)
            if not 0.0 < clip <= 1.0:
                raise ValueError(f"w_clip_segments clips must be in (0, 1], got {clip!r}")
        object.__setattr__(self, "w_clip_segments", segments)

    def check_rows(self, n: int) -> None:
        """Raise ValueError unless ``w_clip_segments`` (when set) covers exactly N rows."""
        covered = sum(rows for rows, _ in self.w_clip_segments)
        if self.w_clip_segments and covered != n:
            raise ValueError(f"w_clip_segments cover {covered} output rows; the layer has {n}")

    @classmethod
    def from_bits(cls, bits: str, **overrides) -> "QuantConfig":
        """``QuantConfig.from_bits("w4a8", group_size=128)``."""
        m = re.fullmatch(r"w(\d+)a(\d+)", bits.strip().lower())
        if not m:
            raise ValueError(f"bits must look like 'w4a4', 'w4a8' or 'w8a8', got {bits!r}")
        return cls(w_bits=int(m.group(1)), a_bits=int(m.group(2)), **overrides)

    @property
    def name(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    def replace(self, **changes) -> "QuantConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields as a dict; ``w_clip_segments`` only when set (checkpoints of layers
        without it read as before)."""
        d = asdict(self)
        if not d["w_clip_segments"]:
            del d["w_clip_segments"]
        return d
