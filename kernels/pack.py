"""Pack signed integer codes into int32 words in the compressed-tensors `pack-quantized` layout, and back.

Layout (compressed-tensors `pack_to_int32(value, num_bits, packed_dim=1)`, every release 0.13-0.20):
stored value `u = q + 2**(bits-1)`; element j of a row sits in word `j * bits // 32` at bit
`(j * bits) % 32`, least significant bits first; a row is zero-padded to whole words. Widths that divide
32 (2, 4, 8: whole codes per word) run in the Triton kernels; the others (3 bits: 32 codes in 3 words, a
code may straddle two words, as compressed-tensors 0.20 packs them) in torch.

Worked example, 2 bits, one row of codes q = [-2, -1, 0, 1, 1] -> u = [0, 1, 2, 3, 3]:
word 0 = 0 | 1 << 2 | 2 << 4 | 3 << 6 | 3 << 8 = 0b11_11_10_01_00 = 996; a row of 5 codes uses
1 word, the other 11 slots are 0 (which would decode as q = -2 and are trimmed by the shape).
"""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _check_bits(bits):
    if bits not in range(1, 9):
        raise ValueError(f"bits must be 1 to 8, got {bits}")


def _slots(bits: int, device):
    """Where each of 32 codes sits in its `bits` words: word, bit offset, and the bits spilling into the next."""
    start = bits * torch.arange(32, device=device)
    return start // 32, start % 32, (start % 32 + bits - 32).clamp(min=0)


def pack_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes `[..., n]` in [-2**(bits-1), 2**(bits-1)) -> int32 words `[..., ceil(n * bits / 32)]`."""
    _check_bits(bits)
    n = codes.shape[-1]
    u = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    u = torch.nn.functional.pad(u, (0, -n % 32)).unflatten(-1, (-1, 32))  # 32 codes fill `bits` words
    word, offset, spill = _slots(bits, codes.device)
    words = torch.zeros(*u.shape[:-1], bits + 1, dtype=torch.int64, device=codes.device)
    words.index_add_(-1, word, (u << offset) & 0xFFFFFFFF)  # disjoint bits: sum == or
    words.index_add_(-1, word + 1, torch.where(spill > 0, u >> (bits - spill), 0))
    words = words[..., :bits].flatten(-2)[..., : -(-n * bits // 32)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_ref(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 words `[..., w]` -> int8 codes `[..., n]` (the padding trimmed)."""
    _check_bits(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, -w.shape[-1] % bits)).unflatten(-1, (-1, bits))  # 32 codes per `bits` words
    w = torch.cat([w, torch.zeros_like(w[..., :1])], -1)  # a spill past the last word reads 0
    word, offset, spill = _slots(bits, words.device)
    u = (w[..., word] >> offset) | ((w[..., word + 1] << (bits - spill)) * (spill > 0))
    u = u & ((1 << bits) - 1)
    return (u.flatten(-2)[..., :n] - (1 << (bits - 1))).to(torch.int8)


@triton.jit
def _pack_kernel(codes_ptr, words_ptr, R, N, W, BITS: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, PER: tl.constexpr):
    pid_r, pid_w = tl.program_id(0), tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_j = tl.arange(0, PER)
    offs_n = offs_w[:, None] * PER + offs_j[None, :]  # [BLOCK_W, PER] code column of each slot
    mask = (offs_r < R)[:, None, None] & (offs_n < N)[None, :, :]
    q = tl.load(codes_ptr + offs_r.to(tl.int64)[:, None, None] * N + offs_n[None, :, :], mask=mask, other=0)
    u = ((q.to(tl.int32) + (1 << (BITS - 1))) & ((1 << BITS) - 1)).to(tl.uint32)
    u = tl.where(mask, u, 0)  # padding slots stay 0
    word = tl.sum(u << (offs_j * BITS).to(tl.uint32)[None, None, :], axis=2)  # disjoint bits: sum == or
    mask_out = (offs_r < R)[:, None] & (offs_w < W)[None, :]
    tl.store(words_ptr + offs_r.to(tl.int64)[:, None] * W + offs_w[None, :], word.to(tl.int32, bitcast=True),
             mask=mask_out)


@triton.jit
def _unpack_kernel(words_ptr, codes_ptr, R, N, W, BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_r, pid_n = tl.program_id(0), tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_r < R)[:, None] & (offs_n < N)[None, :]
    per = 32 // BITS
    word = tl.load(words_ptr + offs_r.to(tl.int64)[:, None] * W + (offs_n // per)[None, :], mask=mask, other=0)
    u = (word.to(tl.uint32, bitcast=True) >> ((offs_n % per) * BITS).to(tl.uint32)[None, :]) & ((1 << BITS) - 1)
    q = u.to(tl.int32) - (1 << (BITS - 1))
    tl.store(codes_ptr + offs_r.to(tl.int64)[:, None] * N + offs_n[None, :], q.to(tl.int8), mask=mask)


def _use_triton(t, bits):
    return (t.is_cuda or INTERPRET) and 32 % bits == 0


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8 codes `[..., n]` (2-D weight or 3-D `[E, out, in]`) along the last dim into int32 words."""
    _check_bits(bits)
    if codes.dtype != torch.int8:
        raise ValueError(f"codes must be int8, got {codes.dtype}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"codes outside [{lo}, {hi}] do not fit {bits} bits")
    if not _use_triton(codes, bits):
        return pack_ref(codes, bits)
    per, n = 32 // bits, codes.shape[-1]
    rows = codes.reshape(-1, n).contiguous()
    R, W = rows.shape[0], triton.cdiv(n, per)
    words = torch.full((R, W), -1, dtype=torch.int32, device=codes.device)
    block_w = 64 if codes.is_cuda else 4
    block_r = 16 if codes.is_cuda else 4
    _pack_kernel[(triton.cdiv(R, block_r), triton.cdiv(W, block_w))](
        rows, words, R, n, W, BITS=bits, BLOCK_R=block_r, BLOCK_W=block_w, PER=per)
    return words.reshape(*codes.shape[:-1], W)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: int32 words `[..., w]` -> int8 codes `[..., n]`."""
    _check_bits(bits)
    if words.dtype != torch.int32 or words.shape[-1] != -(-n * bits // 32):
        raise ValueError(f"need int32 words [..., {-(-n * bits // 32)}] for {n} {bits}-bit codes, "
                         f"got {words.dtype} {tuple(words.shape)}")
    if not _use_triton(words, bits):
        return unpack_ref(words, bits, n)
    flat = words.reshape(-1, words.shape[-1]).contiguous()
    R, W = flat.shape
    codes = torch.full((R, n), -128, dtype=torch.int8, device=words.device)
    block_r, block_n = (16, 512) if words.is_cuda else (4, 64)
    _unpack_kernel[(triton.cdiv(R, block_r), triton.cdiv(n, block_n))](
        flat, codes, R, n, W, BITS=bits, BLOCK_R=block_r, BLOCK_N=block_n)
    return codes.reshape(*words.shape[:-1], n)


# NVFP4 (compressed-tensors `nvfp4-pack-quantized`): each code is an E2M1 nibble, sign in bit 3 and the
# magnitude's index into {0, 0.5, 1, 1.5, 2, 3, 4, 6} in bits 0-2; two per byte along the row, the even
# element in the low nibble. gsq holds E2M1 values doubled, as integers: -12..12.
E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12)


def fp4_pack_ref(codes: torch.Tensor) -> torch.Tensor:
    """int8 doubled E2M1 values `[..., n]` (n even) -> uint8 `[..., n / 2]`."""
    a = codes.to(torch.int64).abs()
    mag = torch.searchsorted(torch.tensor(E2M1_DOUBLED, device=codes.device), a)
    nibble = mag | ((codes < 0).long() << 3)
    return (nibble[..., 0::2] | (nibble[..., 1::2] << 4)).to(torch.uint8)


def fp4_unpack_ref(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., n / 2]` -> int8 doubled E2M1 values `[..., n]` (negative zero reads 0)."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2).long()
    value = torch.tensor(E2M1_DOUBLED, device=packed.device)[nibbles & 7]
    return torch.where(nibbles >= 8, -value, value).to(torch.int8)


@triton.jit
def _fp4_pack_kernel(codes_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # output bytes
    mask = offs < numel
    lo = tl.load(codes_ptr + 2 * offs.to(tl.int64), mask=mask, other=0).to(tl.int32)
    hi = tl.load(codes_ptr + 2 * offs.to(tl.int64) + 1, mask=mask, other=0).to(tl.int32)
    out = _nibble(lo) | (_nibble(hi) << 4)
    tl.store(out_ptr + offs, out.to(tl.uint8), mask=mask)


@triton.jit
def _nibble(q):
    a = tl.abs(q)
    mag = tl.where(a <= 4, a, tl.where(a == 6, 5, tl.where(a == 8, 6, 7)))
    return mag | tl.where(q < 0, 8, 0)


def fp4_pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 doubled E2M1 values `[..., n]` (n even) into uint8 `[..., n / 2]`, as compressed-tensors
    stores `weight_packed` of NVFP4."""
    if codes.dtype != torch.int8 or codes.shape[-1] % 2:
        raise ValueError(f"need int8 codes with an even row length, got {codes.dtype} {tuple(codes.shape)}")
    bad = ~torch.isin(codes.abs(), torch.tensor(E2M1_DOUBLED, dtype=torch.int8, device=codes.device))
    if bad.any():
        raise ValueError(f"codes {sorted(set(codes[bad].tolist()))[:5]} are not doubled E2M1 values")
    if not (codes.is_cuda or INTERPRET):
        return fp4_pack_ref(codes)
    flat = codes.contiguous().reshape(-1)
    out = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=codes.device)
    block = 1024 if codes.is_cuda else 256
    _fp4_pack_kernel[(triton.cdiv(out.numel(), block),)](flat, out, out.numel(), BLOCK=block)
    return out.reshape(*codes.shape[:-1], codes.shape[-1] // 2)


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `fp4_pack`."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"need uint8 bytes, got {packed.dtype}")
    return fp4_unpack_ref(packed)
