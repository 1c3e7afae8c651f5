"""Pack / unpack: bit-exact against compressed-tensors' own packer, hand-computed golden words, round trips."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from gsq.kernels import pack as P


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # GPU: the compiled kernels are tested


def random_codes(shape, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(5, 16), (3, 17), (7, 100), (13, 384), (1, 1), (2, 3, 45)])
def test_pack_is_bit_exact_against_compressed_tensors(bits, shape):
    codes = random_codes(shape, bits, seed=sum(shape) + bits)
    ours = P.pack(codes.to(DEV), bits).cpu()  # the Triton kernel (interpreter on CPU)
    theirs = pack_to_int32(codes, bits)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    assert torch.equal(P.pack_ref(codes, bits), theirs)
    assert torch.equal(P.unpack(ours.to(DEV), bits, shape[-1]).cpu(), codes)
    assert torch.equal(P.unpack_ref(ours, bits, shape[-1]), codes)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape)), codes)


def test_golden_words():
    # Docstring example: 2-bit q [-2, -1, 0, 1, 1] -> u [0, 1, 2, 3, 3] -> 0 | 1<<2 | 2<<4 | 3<<6 | 3<<8 = 996.
    assert P.pack(torch.tensor([[-2, -1, 0, 1, 1]], dtype=torch.int8), 2).tolist() == [[996]]
    # 16 codes of +1 (u = 3) fill a 2-bit word with ones: 0xFFFFFFFF = -1 as int32.
    assert P.pack(torch.ones(1, 16, dtype=torch.int8), 2).tolist() == [[-1]]
    # 4-bit: q = [-8, 7] -> u = [0, 15] -> 15 << 4 = 240; a 17th 2-bit code starts a second word.
    assert P.pack(torch.tensor([[-8, 7]], dtype=torch.int8), 4).tolist() == [[240]]
    assert P.pack(torch.full((1, 17), -2, dtype=torch.int8), 2).tolist() == [[0, 0]]
    # 2-bit code 1 in the top slot sets the sign bit: u=3 << 30 = 0xC0000000 = -1073741824.
    codes = torch.full((1, 16), -2, dtype=torch.int8)
    codes[0, 15] = 1
    assert P.pack(codes, 2).tolist() == [[-1073741824]]


def test_two_bit_codes_in_a_four_bit_container_round_trip():
    codes = random_codes((9, 130), 2, seed=3)  # {-2..1} is a subset of int4
    words = P.pack(codes, 4)
    assert words.shape == (9, 17) and torch.equal(words, pack_to_int32(codes, 4))
    assert torch.equal(P.unpack(words, 4, 130), codes)


def test_three_bit_codes_straddle_words():
    # 3 bits: 32 codes in 3 words, code 10 takes bits 30-31 of word 0 and bit 0 of word 1 (compressed-tensors'
    # dense packing); q = 3 (u = 7) there and -4 (u = 0) elsewhere sets exactly those three bits
    codes = torch.full((1, 32), -4, dtype=torch.int8)
    codes[0, 10] = 3
    assert P.pack(codes, 3).tolist() == [[-2**31 + 2**30, 1, 0]]
    assert torch.equal(P.unpack(P.pack(codes, 3), 3, 32), codes)


def test_bad_input():
    with pytest.raises(ValueError, match="bits must be 1 to 8"):
        P.pack(torch.zeros(1, 4, dtype=torch.int8), 9)
    with pytest.raises(ValueError, match="do not fit 2 bits"):
        P.pack(torch.tensor([[2]], dtype=torch.int8), 2)
    with pytest.raises(ValueError, match="int8"):
        P.pack(torch.zeros(1, 4, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="int32 words"):
        P.unpack(torch.zeros(1, 3, dtype=torch.int32), 2, 16)


def test_cpu_fallback_is_the_reference(monkeypatch):
    monkeypatch.setattr(P, "INTERPRET", False)
    codes = random_codes((4, 33), 2, seed=1)
    assert torch.equal(P.pack(codes, 2), pack_to_int32(codes, 2))
