import pytest
import torch

from clq_triton.kernels.formats import (
    check_bit_pair,
    check_k,
    pack_int4_ref,
    stored_columns,
    unpack_int4_ref,
)
from helpers import nibble_columns, unpack64


def test_unpack_all_bytes_matches_the_written_layout():
    b = torch.arange(256, dtype=torch.uint8).reshape(2, 128)  # K = 256: 4 pack tiles
    codes = unpack_int4_ref(b)
    assert codes.dtype == torch.int8 and codes.shape == (2, 256)
    assert torch.equal(codes.long(), unpack64(b))
    assert torch.equal(pack_int4_ref(codes), b)


def test_pack_places_each_column_in_its_nibble(gen):
    codes = torch.randint(-8, 8, (3, 192), generator=gen, dtype=torch.int8)
    packed = pack_int4_ref(codes)
    assert packed.shape == (3, 96) and packed.dtype == torch.uint8
    for byte, (lo, hi) in enumerate(nibble_columns(192)):
        want = (codes[:, lo].long() % 16) + 16 * (codes[:, hi].long() % 16)
        assert torch.equal(packed[:, byte].long(), want)
    # byte 0 of a tile: column 0 low, column 32 high; codes (1, -2) → 0xE1
    c = torch.zeros(1, 64, dtype=torch.int8)
    c[0, 0], c[0, 32] = 1, -2
    assert pack_int4_ref(c)[0, 0].item() == 0xE1 and (pack_int4_ref(c)[0, 1:] == 0).all()


def test_all_code_pairs_roundtrip():
    v = torch.arange(-8, 8)
    pairs = torch.cartesian_prod(v, v)  # 256 (low, high) pairs
    codes = torch.zeros(8, 64, dtype=torch.int8)
    for i, (a, b) in enumerate(pairs.tolist()):
        codes[i // 32, i % 32], codes[i // 32, i % 32 + 32] = a, b
    assert torch.equal(unpack_int4_ref(pack_int4_ref(codes)), codes)


@pytest.mark.parametrize("k", [32, 96, 100])
def test_pack_rejects_partial_tiles(k):
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_int4_ref(torch.zeros(2, k, dtype=torch.int8))


def test_format_checks():
    check_k(1152, 64)
    check_k(192, None)
    assert stored_columns(4, 128) == 64 and stored_columns(8, 128) == 128
    with pytest.raises(ValueError, match="multiple of 64"):
        check_k(96, None)
    with pytest.raises(ValueError, match="multiple of group_size=128"):
        check_k(192, 128)
    with pytest.raises(ValueError, match="group_size must be None"):
        check_k(128, 32)
    with pytest.raises(ValueError, match="w8a4 is not supported"):
        check_bit_pair(8, 4)
    with pytest.raises(ValueError, match="a_bits must be 4 or 8"):
        check_bit_pair(4, 2)
