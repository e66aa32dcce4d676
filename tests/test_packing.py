"""Exact pack / unpack round trips and the on-disk bit layout of GPTQ packing."""

import numpy as np
import pytest
import torch

from compress.quant.packing import pack_dim0, pack_dim1, packed_length, unpack_dim0, unpack_dim1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 96, 100, 385])
def test_round_trip_dim0_is_exact(bits, n):
    codes = torch.randint(0, 2**bits, (n, 7), generator=torch.Generator().manual_seed(n))
    packed = pack_dim0(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_length(n, bits), 7)
    assert torch.equal(unpack_dim0(packed, bits, n), codes.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [3, 40, 80])
def test_round_trip_dim1_is_exact(bits, n):
    codes = torch.randint(0, 2**bits, (6, n), generator=torch.Generator().manual_seed(bits))
    packed = pack_dim1(codes, bits)
    assert packed.shape == (6, packed_length(n, bits))
    assert torch.equal(unpack_dim1(packed, bits, n), codes.to(torch.int32))


def test_extreme_codes_survive_the_sign_bit():
    # all-ones codes set bit 31 of every word, which int32 stores as a negative number
    for bits in (2, 3, 4, 8):
        codes = torch.full((64, 3), 2**bits - 1)
        packed = pack_dim0(codes, bits)
        assert (packed < 0).any()
        assert torch.equal(unpack_dim0(packed, bits, 64), codes.int())


def test_4bit_layout_low_bits_first():
    codes = torch.arange(8).view(8, 1)  # one word: nibble j holds code j
    word = int(pack_dim0(codes, 4)[0, 0]) & 0xFFFFFFFF
    assert word == 0x76543210


def _reference_pack3(values: np.ndarray) -> np.ndarray:
    """3-bit packing written from the format description: one little-endian bit stream of 3-bit codes."""
    rows = values.shape[0] // 32 * 3
    out = np.zeros((rows, values.shape[1]), dtype=np.uint64)
    for j in range(values.shape[0]):
        bit = 3 * j
        word, off = bit // 32, bit % 32
        out[word] |= (values[j].astype(np.uint64) << np.uint64(off)) & np.uint64(0xFFFFFFFF)
        if off > 29:
            out[word + 1] |= values[j].astype(np.uint64) >> np.uint64(32 - off)
    return out.astype(np.uint32).view(np.int32)


def test_3bit_layout_straddles_words():
    codes = torch.randint(0, 8, (64, 5), generator=torch.Generator().manual_seed(3))
    assert np.array_equal(pack_dim0(codes, 3).numpy(), _reference_pack3(codes.numpy()))


def test_padding_rows_are_zero_codes():
    codes = torch.full((33, 2), 7)
    unpacked = unpack_dim0(pack_dim0(codes, 3), 3, 64)
    assert (unpacked[33:] == 0).all()


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError):
        pack_dim0(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError):
        pack_dim0(torch.tensor([[1]]), 5)
