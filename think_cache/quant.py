"""Quantized storage for the compact part, KIVI-style: the math as pure tensor functions.

Keys are quantized **per channel** over a block of tokens (every kept channel has a scale and a zero point per
block: 16 tokens at 2 bits, 8 at 4, the 32-token fold block at 8; `KEY_BLOCKS`): key outliers
live in a few channels, so a per-channel range keeps them from flattening the other channels. Values are quantized
**per token** in groups of ``group_size`` channels. Quantization is asymmetric: ``x ~ code * scale + zero`` with
``zero = min`` and ``scale = (max - min) / (2**bits - 1)`` over a range that, at 2 and 4 bits, is the group's
min/max range clipped by the factor (of `CLIP_RATIOS`; `KEY_CLIP_RATIOS` for keys) with the least squared error; a
group whose values are all equal gets ``scale = 0`` and is stored exactly. Values at 4 bits are symmetric instead
(`SYMMETRIC_VALUES`): no zero point is stored, ``x ~ (code - (2**bits - 1) / 2) * scale`` over ``max |x|`` (clipped
the same way), which pays for short key blocks. No symmetric code stands for exactly 0 (the levels are odd
multiples of ``scale / 2``); only an all-zero group gets ``scale = 0`` and is stored exactly. At 4 bits every
scale is one byte (`LOG_SCALES`, `encode_scales`): a power of ``2 ** (1 / 12)`` rounded up, and a key block's zero
point centres its range in the levels that scale spans.

Layout and packing
------------------
Keys and values are both stored **token-major**, one row of packed bytes per token:
``codes (batch, kv_heads, tokens, packed_width(channels, bits))`` uint8, packed along the channel axis. So every
token's codes are self-contained: appending a block, dropping the oldest tokens, gathering the tokens a policy
keeps and reordering batch rows are row operations that never unpack or re-pack anything, and a block of any
length (the last partial block of a prompt) packs like any other.

Packing is **planar**: with ``per = 8 // bits`` codes to a byte and ``m = ceil(n / per)`` bytes, byte ``j``
holds codes ``j, j + m, ..., j + (per - 1) m`` (code ``j + i m`` in bits ``[i * bits, (i + 1) * bits)``). Unpacking
plane ``i`` is then one shift-and-mask over the contiguous packed rows that yields channels ``[i m, (i + 1) m)``
of every token, a run of ``m`` consecutive channels: the key logits write it into those columns of one
``(tokens, per * m)`` buffer (the channels' own order; one matmul), the value output into a ``(tokens, m)`` matrix
of its own (one matmul per plane). With the interleaved packing (byte ``j`` holding codes
``per j .. per j + per - 1``) a plane would be every ``per``-th channel: a write with a stride at every element
(measured about twice the planar unpack on CPU). Packing along the token axis (KIVI's choice for keys; ``per``
consecutive tokens of a channel in one byte) would make tokens share bytes: appending to a part whose length is not
a multiple of ``per``, dropping the oldest tokens and gathering tokens per head would all unpack and re-pack.

Attention without a dense copy
------------------------------
`quantized_attention_logits` and `quantized_attention_output` walk the context in chunks of ``chunk_tokens``
tokens (a multiple of the key block). The float32 buffer of one chunk's unpacked codes is the largest transient:
``batch * kv_heads * chunk_tokens * channels`` float32 (channels rounded up to a multiple of ``per``), the same
whatever the context length; see `attention_transient_bytes`. Key scales multiply the chunk's codes in place,
key zero points become a per-block bias ``q . zero`` added to the logits; value scales are folded into the
attention weights (one row of weights per channel group) and value zero points into ``weights @ zero``.

On the CPU, for the few query rows of a decoding step (at most `think_cache.cpu_kernels.MAX_ROWS`), both
functions hand the work to `think_cache.cpu_kernels`: C loops that dequantize a tile of 32 tokens into registers
and the L1 cache and use it at once (the same numbers; about 3x faster than these torch ops on a 2-core AVX2 host).
The torch code below stays the reference and serves CUDA without Triton, torch.compile and long forwards.

Shapes follow transformers: ``(batch, kv_heads, tokens, channels)``; queries of a KV head's whole group are
flattened into the query axis: ``(batch, kv_heads, group * q_len, channels)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from ._checks import check_bits, check_int

__all__ = [
    "BITS",
    "CLIP_RATIOS",
    "KEY_CLIP_RATIOS",
    "DEFAULT_BLOCK",
    "KEY_BLOCKS",
    "DEFAULT_GROUP_SIZE",
    "GROUP_SIZES",
    "SYMMETRIC_VALUES",
    "LOG_SCALES",
    "SCALE_STEPS",
    "SCALE_BIAS",
    "DEFAULT_CHUNK_TOKENS",
    "QuantKeys",
    "QuantValues",
    "codes_per_byte",
    "key_block",
    "default_group_size",
    "packed_width",
    "pack_codes",
    "unpack_codes",
    "value_groups",
    "quantize_keys",
    "quantize_values",
    "symmetric_offset",
    "encode_scales",
    "scale_values",
    "scale_table",
    "dequantize_keys",
    "dequantize_values",
    "cat_keys",
    "cat_values",
    "gather_keys",
    "gather_values",
    "narrow_keys",
    "narrow_values",
    "quantized_attention_logits",
    "quantized_attention_output",
    "attention_transient_bytes",
]

#: Supported code widths.
BITS = (2, 4, 8)
#: The fractions of a group's min/max range `_minmax_quantize` tries per code width (the range narrowed about its
#: middle; the one with the least squared error is kept). Measured on SmolLM2 (2k pass key, 12 prompts, ThinK 0.4,
#: 2-bit keys alone): 4 of 12 found with min/max ranges, 10 of 12 clipped; values alone 7 -> 9 of 12.
CLIP_RATIOS = {2: (1.0, 0.9, 0.8, 0.7, 0.6, 0.5), 4: (1.0, 0.95, 0.9, 0.85, 0.8), 8: (1.0,)}
#: The fractions tried for key blocks: keys are clipped less at 2 bits (to 0.8 of a range, as at 4), where the values'
#: 0.5 would flatten the extreme keys that make the largest logits (SmolLM2, 2k pass key, 48 prompts, 16-token key
#: blocks: 39 found, 38 with `CLIP_RATIOS`, 37 with min/max ranges; over 32-token blocks min/max ranges found 16).
KEY_CLIP_RATIOS = {2: CLIP_RATIOS[4], 4: CLIP_RATIOS[4], 8: CLIP_RATIOS[8]}
#: The most float32 elements the clipping search of `_minmax_quantize` builds at once (8 MiB), counted over the
#: ratios tried, the groups and their elements: a prompt's tokens are searched a slice of groups at a time.
CLIP_SEARCH_ELEMENTS = 2**21
#: The most elements ``batch * kv_heads * tokens * channels`` `quantize_keys` and `quantize_values` quantize at once
#: (8 MiB in float32): a longer prompt is quantized a slice of tokens at a time (whole key blocks), so the float32
#: scratch at the prompt's end stays within a few such slices however long the prompt (an 8k prompt of 8 KV heads
#: of 128 channels took 13x its layer's bfloat16 keys and values at once). Ranges are per block and per token, so
#: the slicing changes no code (but for a last-bit difference of a clipping search's float32 sums in one layout
#: no store uses, 2 bits with one-byte scales).
QUANTIZE_CHUNK_ELEMENTS = 2**21
#: The ThinK layer's fold block: a fold appends this many tokens, whole key blocks (`KEY_BLOCKS`); also the
#: default ``block`` of `quantize_keys`.
DEFAULT_BLOCK = 32
#: Tokens per key block of a `think_cache.storage.QuantizedStore`, by code width (each divides `DEFAULT_BLOCK`, so a
#: fold quantizes whole blocks). Four levels per channel over 32 tokens leave too little of a key's shape: on
#: SmolLM2 (2k pass key, 48 prompts, ThinK 0.4, 2-bit keys and values) 32-token key blocks found 33 pass keys,
#: 16-token blocks 38 (full-precision keys with 2-bit values: 44). A scale and a zero point per 16 tokens cost, in
#: bfloat16, 2 bits per key element, as much as its code. At 4 bits key-value retrieval needs every kept channel
#: precise: 16-token blocks halved the block-range share of the window's logit error and gave ThinK 0.4's answers
#: on more prompts than 32 (`eval_cpu_2k_int4_layout_probes.json`), 8-token blocks with one-byte scales
#: (`LOG_SCALES`) on more again (`eval_cpu_2k_int4_probes_v2.json`); symmetric values pay for the blocks
#: (`SYMMETRIC_VALUES`; 64-channel value groups, the other way to pay, lost 5 of 48 pass keys,
#: `eval_cpu_2k_int4_kv_sweep.json`). At 8 bits 32-token blocks suffice.
KEY_BLOCKS = {2: 16, 4: 8, 8: DEFAULT_BLOCK}
assert all(DEFAULT_BLOCK % b == 0 for b in KEY_BLOCKS.values()), "a fold must quantize whole key blocks"
#: Code widths whose stores hold every scale as one byte, a code of `encode_scales` (the scale rounded up to a
#: step of 1/12 of an octave; the zero points stay in the model's dtype): at 4 bits a bfloat16 scale per 8 tokens
#: would cost 2 bits a key element, a one-byte scale 1. The byte pays for the 8-token key blocks of `KEY_BLOCKS`,
#: which at 4 bits key-value retrieval needs (SmolLM2, 2k, 96 prompts, ThinK 0.4's greedy answers fed a token a step:
#: -1.0 points against ThinK 0.4 with these scales and 8-token blocks, -4.2 with bfloat16 scales and 16-token blocks,
#: `eval_cpu_2k_int4_probes_v2.json`). A scale is at most 6% above the one asked for (the range of a block's 16
#: levels up to 6% wider); on random-walk keys the squared error grew 2% (8-token blocks, 0.00271 -> 0.00277).
LOG_SCALES = {2: False, 4: True, 8: False}
#: One-byte scale codes: code ``c`` in 1..255 stands for ``2 ** ((c - SCALE_BIAS) / SCALE_STEPS)``, about 2.6e-4 to
#: 609, and code 0 for a scale of 0 (a constant group, stored exactly). A scale above 609 (a 4-bit key block whose
#: range passes 9,000, a symmetric 4-bit value group whose largest passes 4,500) is clipped to 609.
SCALE_STEPS = 12
SCALE_BIAS = 144
#: Value channels per scale / zero point (KIVI's default); the last group takes the remainder.
DEFAULT_GROUP_SIZE = 32
#: The default value group of a `think_cache.ThinKCache` by code width: at 2 bits the 16-token key blocks
#: (`KEY_BLOCKS`) take the bytes that 64-channel value groups save (head_dim 64, bfloat16: 36 bytes a token and KV
#: head, 0.14x of DynamicCache's 256), and 2-bit values cost little accuracy where keys cost much (SmolLM2, 2k
#: pass key, 48 prompts: full-precision values with 2-bit keys found 30, full-precision keys with 2-bit values 44).
GROUP_SIZES = {2: 64, 4: DEFAULT_GROUP_SIZE, 8: DEFAULT_GROUP_SIZE}
#: Code widths whose values a `think_cache.storage.QuantizedStore` stores symmetric (a scale per group, no zero
#: point): at 4 bits a value group's range is nearly symmetric about 0 (16 levels over ``[-max|x|, max|x|]`` lose
#: little against 16 over ``[min, max]``), and the 2 bytes of a bfloat16 zero point per 32-channel group (4 a token
#: and KV head) pay for the short key blocks of `KEY_BLOCKS`: with one-byte scales (`LOG_SCALES`) 62 bytes a token
#: and KV head at key ratio 0.5 and head_dim 64 (keys 16 + 12, values 32 + 2), about what 32-token blocks with
#: asymmetric bfloat16 values took (60).
SYMMETRIC_VALUES = {2: False, 4: True, 8: False}
#: Tokens per attention chunk. On a 2-core AVX2 CPU at 4k-8k tokens larger chunks are faster (every op has a
#: fixed cost): 4-bit logits at 8k take 1.6x as long with 1024-token chunks as with 4096. 2048 bounds one chunk's
#: float32 buffer to 256 KiB per (batch, head) for 32 channels, 512 KiB for 64, at about 1.2x the 4096 time.
DEFAULT_CHUNK_TOKENS = 2048


# -------------------------------------------------------------------------------------------- validation
def _check_float(name: str, x: torch.Tensor, dims: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")


# ------------------------------------------------------------------------------------------------ packing
def codes_per_byte(bits: int) -> int:
    """How many ``bits``-wide codes one byte holds: 4, 2 or 1."""
    return 8 // check_bits(bits, BITS)


def default_group_size(bits: int) -> int:
    """The value group size a `think_cache.ThinKCache` uses for ``bits``-wide codes when given none: `GROUP_SIZES`."""
    return GROUP_SIZES[check_bits(bits, BITS)]


def key_block(bits: int) -> int:
    """Tokens per key block (per-channel scale and zero point) for ``bits``-wide codes: see `KEY_BLOCKS`."""
    return KEY_BLOCKS[check_bits(bits, BITS)]


def packed_width(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take when packed: ``ceil(n * bits / 8)``."""
    return -(-n // codes_per_byte(bits))


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_codes` without the argument checks (codes are known to be uint8 and in range)."""
    per = 8 // bits
    if per == 1:
        return codes.contiguous()
    n = codes.shape[-1]
    m = -(-n // per)
    if per * m != n:
        codes = torch.nn.functional.pad(codes, (0, per * m - n))
    planes = codes.reshape(*codes.shape[:-1], per, m)
    out = planes[..., 0, :].clone()
    for i in range(1, per):
        out |= planes[..., i, :] << (bits * i)
    return out


def _unpack_planes(packed: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Write plane ``i`` of ``packed (..., m)`` into ``out[i]`` ``(per, ..., m)``, any dtype ``out`` may hold.

    Every plane is one or two elementwise ops over contiguous rows, then a copy that converts to ``out``'s dtype
    (CUDA's bitwise kernels write integer outputs only, so the bits are computed in uint8 first).
    """
    per = 8 // bits
    mask = (1 << bits) - 1
    if per == 1:
        out[0].copy_(packed)
        return out
    out[0].copy_(packed & mask)
    for i in range(1, per - 1):
        out[i].copy_((packed >> (bits * i)) & mask)
    out[per - 1].copy_(packed >> (bits * (per - 1)))
    return out


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``bits``-wide codes along the last axis, planar (see the module docstring).

    Parameters
    ----------
    codes:
        ``(..., n)`` uint8, every value in ``[0, 2**bits)``.
    bits:
        2, 4 or 8.

    Returns
    -------
    ``(..., ceil(n * bits / 8))`` uint8: byte ``j`` holds codes ``j + i * m`` in bits ``[i * bits, (i + 1) * bits)``
    with ``m`` the packed width; codes past ``n`` are zero.
    """
    bits = check_bits(bits, BITS)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"codes must be a uint8 tensor, got {got}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension (the axis to pack)")
    if bits < 8 and codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes must be < {1 << bits} for bits={bits}, got a code {int(codes.max())}")
    return _pack(codes, bits)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack_codes`: ``(..., ceil(n * bits / 8))`` uint8 -> ``(..., n)`` uint8."""
    bits = check_bits(bits, BITS)
    check_int("n", n, 0)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 tensor, got {got}")
    per = 8 // bits
    m = -(-n // per)
    if packed.dim() == 0 or packed.shape[-1] != m:
        raise ValueError(f"{n} codes of {bits} bits pack into {m} bytes, got packed of shape {tuple(packed.shape)}")
    out = packed.new_empty(per, *packed.shape)
    _unpack_planes(packed, bits, out)
    return out.movedim(0, -2).reshape(*packed.shape[:-1], per * m)[..., :n]


# ------------------------------------------------------------------------------------------- scale codes
def encode_scales(scale: torch.Tensor) -> torch.Tensor:
    """One-byte codes of float scales ``>= 0``: the least code whose scale (`scale_values`) is at least ``scale``
    (`SCALE_STEPS`, `SCALE_BIAS`), so a range quantized with the decoded scale stays covered; 0 for a scale of 0,
    else 1..255, clipped at both ends (a scale past the top code, about 609, does not cover its range; one below
    the lowest, about 2.6e-4, is widened to it). NaN gives code 0 (a scale of 0): the caller's numbers are broken."""
    s = scale.float()
    code = (torch.ceil(torch.log2(s) * SCALE_STEPS) + SCALE_BIAS).clamp(1, 255)
    # log2 rounds: a scale a code stands for exactly may come out one step above its code
    code = torch.where((code > 1) & (_decoded(code - 1) >= s), code - 1, code)
    return torch.where(s > 0, code, 0.0).to(torch.uint8)


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Float32 scales from stored ones: one-byte codes (uint8, `encode_scales`) decoded, else upcast."""
    if scale.dtype != torch.uint8:
        return scale.float()
    return _decoded(scale.float())


def _decoded(code: torch.Tensor) -> torch.Tensor:
    """The scales float32 ``code`` (integers in 0..255) stand for."""
    return torch.exp2((code - SCALE_BIAS) / SCALE_STEPS).masked_fill_(code == 0, 0.0)


@functools.cache
def scale_table() -> torch.Tensor:
    """The 256 float32 scales the one-byte codes stand for, on the CPU (``scale_table()[c] == scale_values(c)``)."""
    return _decoded(torch.arange(256, dtype=torch.float32, device="cpu"))


# -------------------------------------------------------------------------------------- quantized tensors
def _map_fields(obj, fn: Callable[[torch.Tensor], torch.Tensor], names: tuple[str, ...]):
    return replace(obj, **{name: fn(getattr(obj, name)) for name in names if getattr(obj, name) is not None})


class _PackedTensors:
    """What `QuantKeys` and `QuantValues` share: packed ``codes`` with ``scale``/``zero``, batch first, and the
    ``dtype`` they stand for. ``_FIELDS`` names the tensor attributes (None-valued ones are skipped)."""

    _FIELDS: tuple[str, ...] = ("codes", "scale", "zero")

    @property
    def tokens(self) -> int:
        return self.codes.shape[-2]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def log_scales(self) -> bool:
        """Whether the scales are one-byte codes (`encode_scales`) rather than values in ``dtype``."""
        return self.scale.dtype == torch.uint8

    def scales(self) -> torch.Tensor:
        """The scales in float32 (`scale_values`), the shape of ``scale``."""
        return scale_values(self.scale)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor held (codes, scale, zero, and a block index where there is one)."""
        yield from (t for t in (getattr(self, name) for name in self._FIELDS) if t is not None)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held (their sizes, not of any larger storage they might view)."""
        return sum(t.nbytes for t in self.tensors())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Apply ``fn`` to every tensor (all have the batch first): reorder rows, ``repeat_interleave``, move."""
        return _map_fields(self, fn, self._FIELDS)

    def index_select(self, index: torch.Tensor):
        """Keep batch rows ``index`` (beam reordering, ``batch_select_indices``)."""
        return self.map(lambda t: t.index_select(0, index.to(t.device)))


@dataclass(frozen=True, eq=False)
class QuantKeys(_PackedTensors):
    """Keys quantized per channel over blocks of tokens.

    Token ``t`` of head ``(b, h)`` dequantizes to ``code[b, h, t] * scale[b, h, k] + zero[b, h, k]`` with
    ``k = block_index[b, h, t]``, or ``k = t // block`` when ``block_index`` is None (the *regular* layout: blocks
    of ``block`` tokens from the first, only the last one possibly shorter).

    Attributes
    ----------
    codes:
        ``(batch, kv_heads, tokens, packed_width(channels, bits))`` uint8, packed along channels.
    scale, zero:
        ``(batch, kv_heads, n_blocks, channels)``: zero points in ``dtype``, scales in ``dtype`` or as one-byte
        codes (uint8, `encode_scales`).
    block_index:
        None (regular), or ``(batch, kv_heads, tokens)`` int32 once blocks are irregular: after appending to a
        partial block, dropping tokens that do not start a block, or gathering tokens per head.
    bits, block, channels:
        Code width, nominal tokens per block, and unpacked channels.
    dtype:
        The dtype of the keys (what `dequantize_keys` returns).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    block_index: torch.Tensor | None
    bits: int
    block: int
    channels: int
    dtype: torch.dtype

    _FIELDS = ("codes", "scale", "zero", "block_index")

    @property
    def n_blocks(self) -> int:
        return self.scale.shape[-2]

    @property
    def is_regular(self) -> bool:
        return self.block_index is None


@dataclass(frozen=True, eq=False)
class QuantValues(_PackedTensors):
    """Values quantized per token in groups of ``group_size`` channels.

    Channel ``c`` of token ``t`` dequantizes to ``code[..., t, c] * scale[..., t, c // group_size] + zero[...]``;
    symmetric values (``zero`` None) to ``(code - symmetric_offset(bits)) * scale[...]``.

    Attributes
    ----------
    codes:
        ``(batch, kv_heads, tokens, packed_width(channels, bits))`` uint8, packed along channels.
    scale, zero:
        ``(batch, kv_heads, tokens, ceil(channels / group_size))``: zero points in ``dtype``, None when the values
        are symmetric (none stored); scales in ``dtype`` or as one-byte codes (uint8, `encode_scales`).
    bits, group_size, channels:
        Code width, channels per group (the last group holds the remainder), unpacked channels.
    dtype:
        The dtype of the values (what `dequantize_values` returns).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    channels: int
    dtype: torch.dtype

    @property
    def n_groups(self) -> int:
        return self.scale.shape[-1]

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def zero_points(self) -> torch.Tensor:
        """``(batch, kv_heads, tokens, groups)`` float32 zero points: the stored ones, or ``-offset * scale`` of
        symmetric values (a tensor the size of the scales, never of the codes)."""
        if self.zero is None:
            return self.scales() * -symmetric_offset(self.bits)
        return self.zero.float()


# ------------------------------------------------------------------------------------------- quantization
def _rounded(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmax: int, dtype: torch.dtype, log_scales: bool = False
):
    """Codes of ``x (..., g)`` (float, not yet uint8) for the range ``[lo, hi] (...)``, with the scale and zero point
    rounded first as stored: ``(codes, scale, zero, float32 scale)``. The scale in ``dtype``, the zero point ``lo``
    in ``dtype``; ``log_scales``: the scale as a one-byte code (`encode_scales`, rounded up) and the zero point
    centring the range in the levels the code spans (in ``dtype``)."""
    if log_scales:
        scale = encode_scales((hi - lo) / qmax)
        s = scale_values(scale)
        zero = ((lo + hi) / 2 - s * (qmax / 2)).to(dtype)
    else:
        scale = ((hi - lo) / qmax).to(dtype)
        zero = lo.to(dtype)
        s = scale.float()
    safe = torch.where(s == 0, torch.ones_like(s), s)
    codes = ((x - zero.float()[..., None]) / safe[..., None]).round_().clamp_(0, qmax)
    return codes, scale, zero, s


def _minmax_quantize(
    x: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
    valid: torch.Tensor | None = None,
    ratios: tuple[float, ...] | None = None,
    log_scales: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Asymmetric min/max over the last axis of float32 ``x (..., g)``: ``(codes uint8, scale, zero)``.

    ``scale``/``zero`` ``(...)`` are rounded to ``dtype`` first (``log_scales``: the scale to a one-byte code, the
    zero point centring the range, see `_rounded`) and the codes computed from the rounded values, so
    dequantizing with the stored scale and zero reproduces what was quantized. A constant group gets scale 0.
    With ``valid`` (bool, broadcast to ``x``) only valid elements set the range; the others are clamped into it,
    and a group with no valid element gets scale 0 and zero point 0.

    Below 8 bits each group's range is clipped: narrowed about its middle by each factor of ``ratios`` (default
    `CLIP_RATIOS`), the one with the least squared error over the group's (valid) elements kept. Four or sixteen
    levels spread over a range set by one extreme element leave the others few levels; clipping it costs less.
    """
    qmax = (1 << bits) - 1
    if valid is None:
        lo = x.amin(dim=-1)
        hi = x.amax(dim=-1)
    else:
        lo = x.masked_fill(~valid, float("inf")).amin(dim=-1)
        hi = x.masked_fill(~valid, float("-inf")).amax(dim=-1)
        empty = lo.isinf()
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    ratios = CLIP_RATIOS[bits] if ratios is None else ratios
    if len(ratios) == 1:  # 8 bits: the min/max range
        codes, scale, zero, _ = _rounded(x, lo, hi, qmax, dtype, log_scales)
        return codes.to(torch.uint8), scale, zero
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    # float32 as the scalar (1 - ratio) / 2 would be: the margins of a loop over the ratios, bit for bit
    factors = torch.tensor([(1.0 - r) / 2 for r in ratios], dtype=torch.float32, device=x.device)[:, None]

    def candidates(rows: torch.Tensor, part: slice):
        margin = factors * (hi[part] - lo[part])  # (ratios, groups)
        c, s, z, sf = _rounded(rows, lo[part] + margin, hi[part] - margin, qmax, dtype, log_scales)
        return c, c * sf[..., None] + z.float()[..., None], (s, z)

    codes, (scale, zero) = _least_error_search(x, valid, len(ratios), candidates)
    return codes, scale, zero


def _least_error_search(
    x: torch.Tensor,
    valid: torch.Tensor | None,
    n_candidates: int,
    candidates: Callable[[torch.Tensor, slice], tuple],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per group (the last axis of float32 ``x (..., g)``), the candidate quantization with the least squared error
    over the group's (``valid``) elements: ``(codes uint8 (..., g), [each parameter (...)])``.

    ``candidates(rows, part)`` gets the groups ``rows (n, g)`` (groups ``part`` of ``x`` flattened) and returns float
    codes and their dequantized values ``(n_candidates, n, g)`` and its parameters (scales, zero points)
    ``(n_candidates, n)`` as stored. Every candidate is built at once (one launch per op instead of one per op and
    candidate: a decoding step that folds a block launched about 6 ms of small kernels a layer on an H100), a bounded
    number of groups at a time (`CLIP_SEARCH_ELEMENTS`). Of equal errors the first candidate is kept (the widest range,
    as a loop would keep)."""
    size = x.shape[-1]
    flat = x.reshape(-1, size)
    flat_valid = None if valid is None else valid.expand(x.shape).reshape(-1, size)
    codes = torch.empty(flat.shape, dtype=torch.uint8, device=x.device)
    params: list[torch.Tensor] = []
    step = max(1, CLIP_SEARCH_ELEMENTS // (n_candidates * size))
    for start in range(0, max(flat.shape[0], 1), step):  # once when empty: the parameters' dtypes
        part = slice(start, start + step)
        c, approx, found = candidates(flat[part], part)
        error = (approx - flat[part]).square_()
        if flat_valid is not None:
            error.masked_fill_(~flat_valid[part], 0.0)
        best = error.sum(dim=-1).argmin(dim=0)
        codes[part] = c.gather(0, best[None, :, None].expand(1, *c.shape[1:]))[0]
        if not params:
            params = [torch.empty(flat.shape[0], dtype=p.dtype, device=x.device) for p in found]
        for out, p in zip(params, found, strict=True):
            out[part] = p.gather(0, best[None])[0]
    return codes.view(x.shape), [p.view(x.shape[:-1]) for p in params]


def symmetric_offset(bits: int) -> float:
    """The code that stands for 0 in a symmetric group, ``(2**bits - 1) / 2``: codes ``0 .. 2**bits - 1`` stand
    for ``(code - offset) * scale``, evenly over ``[-offset * scale, offset * scale]`` (no level is exactly 0)."""
    return ((1 << check_bits(bits, BITS)) - 1) / 2


def _symmetric_quantize(
    x: torch.Tensor, bits: int, dtype: torch.dtype, valid: torch.Tensor | None = None, log_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric over the last axis of float32 ``x (..., g)``: ``(codes uint8, scale)``, ``scale`` rounded to
    ``dtype`` (``log_scales``: up, to a one-byte code, `encode_scales`) first and the codes computed from it. The
    range ``max |x|`` (over ``valid`` elements, broadcast to ``x``) is narrowed by each factor of `CLIP_RATIOS` and
    the one with the least squared error kept, as `_minmax_quantize` does; an all-zero group gets scale 0."""
    qmax, offset = (1 << bits) - 1, symmetric_offset(bits)
    peak = (x if valid is None else x.masked_fill(~valid, 0.0)).abs().amax(dim=-1).reshape(-1)
    ratios = CLIP_RATIOS[bits]
    factors = torch.tensor(ratios, dtype=torch.float32, device=x.device)[:, None] / offset

    def candidates(rows: torch.Tensor, part: slice):
        s = factors * peak[part]  # (ratios, groups)
        s = encode_scales(s) if log_scales else s.to(dtype)
        sf = scale_values(s)
        sf = torch.where(sf == 0, torch.ones_like(sf), sf)[..., None]
        c = (rows / sf + offset).round_().clamp_(0, qmax)
        return c, (c - offset) * sf, (s,)

    codes, (scale,) = _least_error_search(x, valid, len(ratios), candidates)
    return codes, scale


def _token_step(x: torch.Tensor, block: int) -> int:
    """Tokens `quantize_keys`/`quantize_values` quantize at once: whole ``block``s of at most
    `QUANTIZE_CHUNK_ELEMENTS` elements of ``x (batch, heads, tokens, channels)``, at least one block."""
    per_token = x.shape[0] * x.shape[1] * x.shape[3]
    return max(1, QUANTIZE_CHUNK_ELEMENTS // max(per_token * block, 1)) * block


def _joined(parts: list[_PackedTensors]) -> _PackedTensors:
    """Token slices of one quantization (whole key blocks but the last, regular) joined along the tokens at once."""
    first = parts[0]
    return replace(
        first,
        **{name: torch.cat([getattr(p, name) for p in parts], dim=2) for name in ("codes", "scale", "zero")
           if getattr(first, name) is not None},
    )  # fmt: skip


def quantize_keys(
    keys: torch.Tensor,
    bits: int,
    block: int = DEFAULT_BLOCK,
    real: torch.Tensor | None = None,
    log_scales: bool = False,
) -> QuantKeys:
    """Quantize keys per channel over blocks of ``block`` tokens, the last block holding the remainder.

    Parameters
    ----------
    keys:
        ``(batch, kv_heads, tokens, channels)`` floating point (the kept key channels of the tokens to fold).
    bits:
        2, 4 or 8.
    block:
        Tokens per block (a `QuantizedStore` passes `key_block` of its bits). A prompt of ``tokens`` gets
        ``ceil(tokens / block)`` blocks.
    real:
        Optional ``(batch, kv_heads or 1, tokens)`` bool: the tokens that set each block's range (padding does
        not: its keys are arbitrary and would only widen the range of the real tokens beside it). The others are
        clamped into that range; a block with no real token gets scale and zero point 0.
    log_scales:
        Store each scale as a one-byte code (`encode_scales`, rounded up; `LOG_SCALES` says which widths a store
        stores so) and centre each block's range in its levels.

    Returns
    -------
    A regular `QuantKeys`; ``scale``/``zero`` ``(batch, kv_heads, ceil(tokens / block), channels)`` in
    ``keys.dtype`` (``log_scales``: scales uint8). Every element dequantizes within ``scale / 2`` of its value (up
    to the rounding of the zero point to ``keys.dtype``; clipped ranges aside).
    """
    _check_float("keys", keys, 4)
    bits = check_bits(bits, BITS)
    block = check_int("block", block, 1)
    batch, heads, tokens, channels = keys.shape
    if real is not None and (real.dtype != torch.bool or real.dim() != 3 or real.shape[-1] != tokens):
        raise ValueError(
            f"real must be a (batch, kv_heads, {tokens}) bool tensor, got {real.dtype} {tuple(real.shape)}"
        )
    step = _token_step(keys, block)
    if tokens > step:  # a long prompt a slice of whole blocks at a time: each block's range is its own
        parts = [
            quantize_keys(keys[:, :, t : t + step], bits, block, None if real is None else real[..., t : t + step],
                          log_scales)
            for t in range(0, tokens, step)
        ]  # fmt: skip
        return _joined(parts)
    n_blocks = -(-tokens // block)
    x = keys.detach().float()  # codes carry no gradient (nor a graph kept in their scales from step to step)
    valid = None
    if real is not None:
        valid = real.expand(batch, heads, tokens)
    if n_blocks * block != tokens:  # pad the last block with copies of its last token, which count for nothing
        x = torch.cat([x, x[:, :, -1:].expand(batch, heads, n_blocks * block - tokens, channels)], dim=2)
        if valid is None:
            valid = torch.ones(batch, heads, tokens, dtype=torch.bool, device=keys.device)
        valid = torch.cat([valid, valid.new_zeros(batch, heads, n_blocks * block - tokens)], dim=2)
    x = x.view(batch, heads, n_blocks, block, channels).transpose(-1, -2)  # ranges over the block's tokens
    if valid is not None:
        valid = valid.reshape(batch, heads, n_blocks, 1, block)
    codes, scale, zero = _minmax_quantize(x, bits, keys.dtype, valid, KEY_CLIP_RATIOS[bits], log_scales)
    codes = codes.transpose(-1, -2).reshape(batch, heads, n_blocks * block, channels)[:, :, :tokens]
    return QuantKeys(_pack(codes, bits), scale, zero, None, bits, block, channels, keys.dtype)


def value_groups(channels: int, group_size: int) -> int:
    """Groups of ``group_size`` channels in a value row of ``channels``: ``ceil(channels / group_size)``.

    When value channels are pruned to a width that ``group_size`` does not divide, the last group holds the
    remainder (e.g. 45 channels, group size 32: groups of 32 and 13). Picking the largest divisor instead would
    turn a prime width (37) into 37 groups of one channel, a scale and a zero point per code.
    """
    check_int("channels", channels, 1)
    check_int("group_size", group_size, 1)
    return -(-channels // group_size)


def quantize_values(
    values: torch.Tensor,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    symmetric: bool = False,
    log_scales: bool = False,
) -> QuantValues:
    """Quantize values per token, in groups of ``group_size`` channels (see `value_groups`).

    Parameters
    ----------
    values:
        ``(batch, kv_heads, tokens, channels)`` floating point.
    bits:
        2, 4 or 8.
    group_size:
        Channels per scale and zero point; larger than ``channels`` means one group per token.
    symmetric:
        A scale per group and no zero point (`symmetric_offset`); `SYMMETRIC_VALUES` says which widths a store
        quantizes so.
    log_scales:
        Store each scale as a one-byte code (`encode_scales`, rounded up; `LOG_SCALES`).

    Returns
    -------
    `QuantValues` with ``scale``/``zero`` ``(batch, kv_heads, tokens, ceil(channels / group_size))`` in
    ``values.dtype`` (``zero`` None when symmetric; ``log_scales``: scales uint8) and ``group_size`` clipped to
    ``channels``.
    """
    _check_float("values", values, 4)
    bits = check_bits(bits, BITS)
    channels = values.shape[-1]
    if channels == 0:
        raise ValueError("values must have at least one channel")
    n_groups = value_groups(channels, group_size)
    step = _token_step(values, 1)
    if values.shape[2] > step:  # a long prompt a slice of tokens at a time: each token's groups are its own
        parts = [
            quantize_values(values[:, :, t : t + step], bits, group_size, symmetric, log_scales)
            for t in range(0, values.shape[2], step)
        ]
        return _joined(parts)
    group_size = min(group_size, channels)
    x = values.detach().float()
    valid = None
    if n_groups * group_size != channels:  # pad the last group with copies of its last channel, counting nothing
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], n_groups * group_size - channels)], dim=-1)
        valid = (torch.arange(n_groups * group_size, device=x.device) < channels).view(n_groups, group_size)
    x = x.view(*x.shape[:-1], n_groups, group_size)
    if symmetric:
        codes, scale = _symmetric_quantize(x, bits, values.dtype, valid, log_scales)
        zero = None
    else:
        codes, scale, zero = _minmax_quantize(x, bits, values.dtype, valid, log_scales=log_scales)
    codes = codes.flatten(-2)[..., :channels]
    return QuantValues(_pack(codes, bits), scale, zero, bits, group_size, channels, values.dtype)


def _key_block_index(qk: QuantKeys) -> torch.Tensor:
    """``(batch, kv_heads, tokens)`` int64: the block of every token."""
    if qk.block_index is not None:
        return qk.block_index.long()
    batch, heads = qk.codes.shape[:2]
    return (torch.arange(qk.tokens, device=qk.device) // qk.block).expand(batch, heads, qk.tokens)


def dequantize_keys(qk: QuantKeys, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(batch, kv_heads, tokens, channels)``: the keys ``qk`` stands for, in ``dtype`` (default: ``qk.dtype``).

    Materialises the whole tensor: for tests, references and bounded-chunk paths, not for attention.
    """
    codes = unpack_codes(qk.codes, qk.bits, qk.channels).float()
    index = _key_block_index(qk)[..., None].expand_as(codes)
    scale = qk.scales().gather(2, index)
    zero = qk.zero.float().gather(2, index)
    return (codes * scale + zero).to(dtype or qk.dtype)


def _group_of_channel(channels: int, group_size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(channels, device=device) // group_size


def dequantize_values(qv: QuantValues, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(batch, kv_heads, tokens, channels)``: the values ``qv`` stands for, in ``dtype`` (default: ``qv.dtype``).

    Materialises the whole tensor: for tests, references and bounded-chunk paths, not for attention.
    """
    codes = unpack_codes(qv.codes, qv.bits, qv.channels).float()
    if qv.channels % qv.group_size == 0:  # scales broadcast over each group: no per-channel copies of them
        grouped = codes.reshape(*codes.shape[:-1], qv.n_groups, qv.group_size)
        out = torch.addcmul(qv.zero_points()[..., None], grouped, qv.scales()[..., None])
        return out.flatten(-2).to(dtype or qv.dtype)
    group = _group_of_channel(qv.channels, qv.group_size, qv.device)
    scale = qv.scales()[..., group]
    zero = qv.zero_points()[..., group]
    return (codes * scale + zero).to(dtype or qv.dtype)


# ------------------------------------------------------------------------------------------ token operations
def _check_same(a, b, fields: tuple[str, ...]) -> None:
    for name in fields:
        if getattr(a, name) != getattr(b, name):
            raise ValueError(f"cannot concatenate: {name} differs ({getattr(a, name)} vs {getattr(b, name)})")
    if a.codes.shape[:2] != b.codes.shape[:2]:
        raise ValueError(
            f"cannot concatenate: (batch, kv_heads) differ ({tuple(a.codes.shape[:2])} vs {tuple(b.codes.shape[:2])})"
        )


def cat_keys(a: QuantKeys, b: QuantKeys) -> QuantKeys:
    """``a`` then ``b`` along the tokens (appending a folded block to the compact part).

    The result is regular when both are and every block of ``a`` is full; otherwise it carries a ``block_index``
    (``b``'s blocks numbered after ``a``'s). Each token keeps the scale it was quantized with.
    """
    _check_same(a, b, ("bits", "block", "channels", "dtype", "log_scales"))
    if a.tokens == 0:
        return b
    if b.tokens == 0:
        return a
    codes = torch.cat([a.codes, b.codes], dim=2)
    scale = torch.cat([a.scale, b.scale], dim=2)
    zero = torch.cat([a.zero, b.zero], dim=2)
    block_index = None
    if not (a.is_regular and b.is_regular and a.tokens % a.block == 0):
        block_index = torch.cat([_key_block_index(a), _key_block_index(b) + a.n_blocks], dim=2).to(torch.int32)
    return QuantKeys(codes, scale, zero, block_index, a.bits, a.block, a.channels, a.dtype)


def cat_values(a: QuantValues, b: QuantValues) -> QuantValues:
    """``a`` then ``b`` along the tokens."""
    _check_same(a, b, ("bits", "group_size", "channels", "dtype", "symmetric", "log_scales"))
    return replace(
        a,
        codes=torch.cat([a.codes, b.codes], dim=2),
        scale=torch.cat([a.scale, b.scale], dim=2),
        zero=None if a.symmetric else torch.cat([a.zero, b.zero], dim=2),
    )


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (B, H, T, D)``, ``index (B, H, K)`` -> ``(B, H, K, D)``."""
    return torch.gather(x, 2, index[..., None].expand(*index.shape, x.shape[-1]))


def _check_index(index: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor, got {getattr(index, 'dtype', type(index).__name__)}")
    if index.dim() != 3 or tuple(index.shape[:2]) != (batch, heads):
        raise ValueError(f"index must be (batch={batch}, kv_heads={heads}, kept), got shape {tuple(index.shape)}")
    return index.long()


def gather_keys(qk: QuantKeys, index: torch.Tensor, compact_blocks: bool = True) -> QuantKeys:
    """Keep tokens ``index`` ``(batch, kv_heads, kept)`` per head (token eviction).

    Tokens are not re-quantized: each keeps its codes and points, through the ``block_index`` the result carries,
    at the scale and zero point of the block it was quantized in. With ``compact_blocks`` the blocks no head still
    uses are dropped and the rest renumbered per head (padded to the head that keeps the most blocks), so the
    scales shrink with the tokens; that reads one integer back from the device (a sync on GPU).
    """
    batch, heads = qk.codes.shape[:2]
    index = _check_index(index, batch, heads)
    codes = _gather_rows(qk.codes, index)
    block_index = _key_block_index(qk).gather(2, index)
    scale, zero = qk.scale, qk.zero
    if compact_blocks and qk.n_blocks:
        used = torch.zeros(batch, heads, qk.n_blocks, dtype=torch.bool, device=qk.device)
        used.scatter_(2, block_index, True)
        new_id = used.long().cumsum(-1) - 1
        kept = int(used.sum(-1).max()) if index.shape[-1] else 0
        if kept < qk.n_blocks:
            dest = torch.where(used, new_id, kept)[..., None].expand_as(scale)  # unused blocks go to a dropped slot
            scale = scale.new_zeros(batch, heads, kept + 1, qk.channels).scatter_(2, dest, scale)[:, :, :kept]
            zero = zero.new_zeros(batch, heads, kept + 1, qk.channels).scatter_(2, dest, zero)[:, :, :kept]
            scale, zero = scale.clone(), zero.clone()  # do not keep the extra slot's storage alive
            block_index = new_id.gather(2, block_index)
    return replace(qk, codes=codes, scale=scale, zero=zero, block_index=block_index.to(torch.int32))


def gather_values(qv: QuantValues, index: torch.Tensor) -> QuantValues:
    """Keep tokens ``index`` ``(batch, kv_heads, kept)`` per head, with their scales and zero points."""
    index = _check_index(index, *qv.codes.shape[:2])
    return qv.map(lambda t: _gather_rows(t, index))


def _check_range(start: int, length: int, tokens: int) -> None:
    check_int("start", start, 0)
    check_int("length", length, 0)
    if start + length > tokens:
        raise ValueError(f"tokens [{start}, {start + length}) are out of range for {tokens} stored tokens")


def narrow_keys(qk: QuantKeys, start: int, length: int) -> QuantKeys:
    """Tokens ``[start, start + length)`` of every head, as new tensors (dropping the oldest, cropping).

    Stays regular when ``qk`` is and ``start`` begins a block; otherwise goes through `gather_keys`.
    """
    _check_range(start, length, qk.tokens)
    if qk.is_regular and start % qk.block == 0:
        first, stop = start // qk.block, -(-(start + length) // qk.block)
        return replace(
            qk,
            codes=qk.codes[:, :, start : start + length].clone(),
            scale=qk.scale[:, :, first:stop].clone(),
            zero=qk.zero[:, :, first:stop].clone(),
        )
    batch, heads = qk.codes.shape[:2]
    index = torch.arange(start, start + length, device=qk.device).expand(batch, heads, length)
    return gather_keys(qk, index)


def narrow_values(qv: QuantValues, start: int, length: int) -> QuantValues:
    """Tokens ``[start, start + length)`` of every head, as new tensors."""
    _check_range(start, length, qv.tokens)
    return qv.map(lambda t: t[:, :, start : start + length].clone())


# ------------------------------------------------------------------------------------------------ attention
def _chunk_tokens(chunk_tokens: int, block: int, tokens: int) -> int:
    """Tokens per attention chunk: ``chunk_tokens`` rounded up to whole blocks, at most the blocks stored."""
    check_int("chunk_tokens", chunk_tokens, 1)
    chunk = -(-chunk_tokens // block) * block
    return max(block, min(chunk, -(-tokens // block) * block))


def attention_transient_bytes(
    batch: int,
    kv_heads: int,
    channels: int,
    bits: int,
    tokens: int,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    block: int = DEFAULT_BLOCK,
) -> int:
    """Bytes of the largest transient of `quantized_attention_logits` / `quantized_attention_output`.

    That is one chunk's unpacked codes in float32: ``batch * kv_heads * chunk * per * ceil(channels / per) * 4``
    with ``chunk = min(chunk_tokens, tokens)`` rounded up to whole blocks (``block = 1`` for values) and
    ``per = 8 // bits``: bounded by ``chunk_tokens``, not by the context. The key path over irregular blocks
    (a ``block_index``) holds a second buffer of that size (the gathered scales). What else grows with the context
    is the size of the ``(batch, kv_heads, q_rows, tokens)`` result: the per-block bias, and for values the
    weights scaled per channel group (``groups`` times the weights).
    """
    per = codes_per_byte(bits)
    chunk = _chunk_tokens(chunk_tokens, block, max(tokens, 1))
    return batch * kv_heads * chunk * per * -(-channels // per) * 4


def _cpu_module():
    """`think_cache.cpu_kernels` (imported on first use: it imports this module)."""
    from . import cpu_kernels as module

    return module


def _matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out[...] = a @ b``: straight into ``out`` when it is one block of memory (the only chunk, or any chunk of a
    single row); a chunk's columns of several rows are not, and dynamo refuses a non-contiguous ``out=`` (a graph
    break under ``fullgraph``: a static quantized cache over more than one chunk failed to compile), and autograd
    refuses ``out=`` where a gradient is wanted."""
    if out.is_contiguous() and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        torch.matmul(a, b, out=out)
    else:
        out.copy_(torch.matmul(a, b))


def quantized_attention_logits(
    query: torch.Tensor, qk: QuantKeys, scaling: float, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Scaled attention logits ``scaling * query @ dequant(keys)^T`` without dequantizing the whole context.

    Per chunk of ``chunk_tokens`` tokens, each plane of packed codes is unpacked straight into its columns of a
    float32 buffer (plane ``i``, byte ``j`` -> column ``i * width + j``: the channels' own order), the buffer is
    multiplied in place by its blocks' scales, then by the query in one matmul; the zero points add
    ``scaling * query . zero`` per block to the logits. Everything is computed in float32. A decoding step on the
    CPU goes through `think_cache.cpu_kernels.keys_logits` instead (`cpu_kernels.serves`).

    Parameters
    ----------
    query:
        ``(batch, kv_heads, q_rows, channels)``: the queries gathered at the kept key channels, a KV head's whole
        group flattened into ``q_rows``; any float dtype.
    qk:
        The quantized keys, ``channels`` kept channels.
    scaling:
        The attention scale (``1 / sqrt(head_dim)`` of the full head).
    chunk_tokens:
        Tokens unpacked at a time (rounded up to whole blocks).

    Returns
    -------
    ``(batch, kv_heads, q_rows, tokens)`` float32. Largest transient: ``batch * kv_heads * chunk * channels``
    float32 (twice that over irregular blocks); see `attention_transient_bytes`.
    """
    _check_float("query", query, 4)
    batch, heads, rows, channels = query.shape
    if (batch, heads, channels) != (qk.codes.shape[0], qk.codes.shape[1], qk.channels):
        raise ValueError(
            f"query (batch, kv_heads, channels) = {(batch, heads, channels)} does not match the keys' "
            f"{(qk.codes.shape[0], qk.codes.shape[1], qk.channels)}"
        )
    check_int("chunk_tokens", chunk_tokens, 1)
    if _cpu_module().serves(query, rows, qk):
        return _cpu_module().keys_logits(query, qk, scaling)
    tokens = qk.tokens
    out = torch.empty(batch, heads, rows, tokens, dtype=torch.float32, device=query.device)
    if tokens == 0:
        return out
    per, width = 8 // qk.bits, qk.codes.shape[-1]
    padded = per * width
    q = query.float() * scaling
    bias = torch.matmul(q, qk.zero.float().transpose(-1, -2))  # (B, H, rows, n_blocks)
    scale = qk.scales()
    if padded != channels:  # codes past the channels are zero; pad query and scales to match
        q = torch.nn.functional.pad(q, (0, padded - channels))
        scale = torch.nn.functional.pad(scale, (0, padded - channels))
    block = qk.block
    chunk = _chunk_tokens(chunk_tokens, block, tokens)
    # uninitialised: a last partial block scales a few rows past the tokens, which no matmul reads
    buffer = torch.empty(batch, heads, chunk, per, width, dtype=torch.float32, device=query.device)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        _unpack_planes(qk.codes[:, :, start : start + n], qk.bits, buffer[:, :, :n].movedim(-2, 0))
        k = buffer[:, :, :n].view(batch, heads, n, padded)
        logits = out[..., start : start + n]
        if qk.block_index is None:  # regular blocks: the scales broadcast over each block's tokens
            first, blocks = start // block, -(-n // block)
            tiles = buffer[:, :, : blocks * block].view(batch, heads, blocks, block, padded)
            tiles.mul_(scale[:, :, first : first + blocks, None])
            _matmul_into(q, k.transpose(-1, -2), logits)
        else:  # each token's block through the index, its zero point's bias too
            index = qk.block_index[:, :, start : start + n].long()
            k.mul_(scale.gather(2, index[..., None].expand(batch, heads, n, padded)))
            _matmul_into(q, k.transpose(-1, -2), logits)
            logits.add_(bias.gather(-1, index[:, :, None].expand(batch, heads, rows, n)))
    if qk.block_index is None:  # the zero points' bias, block by block
        full = tokens // block * block
        if full:
            out[..., :full].view(batch, heads, rows, full // block, block).add_(bias[..., : full // block, None])
        if full < tokens:
            out[..., full:].add_(bias[..., -1:])
    return out


def quantized_attention_output(
    weights: torch.Tensor, qv: QuantValues, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """``weights @ dequant(values)`` without dequantizing the whole context.

    The value scales are folded into the weights: with ``G`` channel groups the weights become ``G`` rows per
    query, ``weights * scale[..., g]`` (a matmul costs the same for 3 or 6 rows on CPU), multiplied by each
    chunk's unpacked codes, one matmul per plane; each channel then reads the rows of its group. The zero points
    add ``weights @ zero`` (symmetric values: ``-offset * weights @ scale``). Everything is computed in float32.
    A decoding step on the CPU goes through `think_cache.cpu_kernels.values_output` instead (`cpu_kernels.serves`).

    Parameters
    ----------
    weights:
        ``(batch, kv_heads, q_rows, tokens)``: attention probabilities over the quantized tokens; any float dtype.
    qv:
        The quantized values.
    chunk_tokens:
        Tokens unpacked at a time.

    Returns
    -------
    ``(batch, kv_heads, q_rows, channels)`` float32. Largest transient: one chunk's codes in float32,
    ``batch * kv_heads * chunk * channels`` (see `attention_transient_bytes` with ``block=1``); the scaled
    weights are ``groups`` times the size of ``weights``.
    """
    _check_float("weights", weights, 4)
    batch, heads, rows, tokens = weights.shape
    if (batch, heads, tokens) != tuple(qv.codes.shape[:3]):
        raise ValueError(
            f"weights (batch, kv_heads, tokens) = {(batch, heads, tokens)} does not match the values' "
            f"{tuple(qv.codes.shape[:3])}"
        )
    check_int("chunk_tokens", chunk_tokens, 1)
    if _cpu_module().serves(weights, rows, qv):
        return _cpu_module().values_output(weights, qv)
    channels, groups = qv.channels, qv.n_groups
    w = weights.float()
    group = _group_of_channel(channels, qv.group_size, w.device)
    out = torch.matmul(w, qv.zero_points())[..., group]  # (B, H, rows, channels): the zero points' share
    if tokens == 0:
        return out
    per, width = 8 // qv.bits, qv.codes.shape[-1]
    # (B, H, G, rows, tokens): the weights times each group's scales, G rows per query. With the scales made
    # contiguous the product is laid out contiguously, so the reshape is a view (an `out=` buffer failed inductor)
    scale = qv.scales().transpose(-1, -2).contiguous()
    scaled = torch.mul(w[:, :, None], scale[:, :, :, None]).reshape(batch * heads, groups * rows, tokens)
    chunk = _chunk_tokens(chunk_tokens, 1, tokens)
    buffer = torch.empty(per, batch, heads, chunk, width, dtype=torch.float32, device=w.device)
    acc = torch.zeros(per, batch * heads, groups * rows, width, dtype=torch.float32, device=w.device)
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        v = _unpack_planes(qv.codes[:, :, start : start + n], qv.bits, buffer[:, :, :, :n])
        v = v.view(per, batch * heads, n, width)
        for i in range(per):
            acc[i].baddbmm_(scaled[..., start : start + n], v[i])
    acc = acc.view(per, batch, heads, groups, rows, width)
    if groups > 1:  # channel i * width + j reads the rows of its group
        plane_group = torch.arange(per * width, device=w.device).clamp_(max=channels - 1) // qv.group_size
        acc = acc.gather(3, plane_group.view(per, 1, 1, 1, 1, width).expand(per, batch, heads, 1, rows, width))
    values = acc[:, :, :, 0].permute(1, 2, 3, 0, 4).reshape(batch, heads, rows, per * width)
    return out.add_(values[..., :channels])
