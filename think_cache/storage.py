"""How a ThinK layer stores its compact part: one interface, two kinds.

The compact part holds the layer's older tokens at the kept key channels (and the kept value channels when values
are pruned). A `ThinKLayer` decides *which* tokens go there and when (the schedule, token policies, masks); a
`CompactStore` decides *how* they are held and attended:

* `FullStore`: in the model's dtype, ``keys (batch, kv_heads, tokens, kept_k)`` and ``values (..., kept_v)``.
* `QuantizedStore`: KIVI-style codes of 2, 4 or 8 bits (see `think_cache.quant`): keys per channel over blocks of
  16 tokens (8 at 4 bits, 32 at 8), values per token in groups of ``group_size`` channels (symmetric at 4 bits: a
  scale, no zero point), zero points in the model's dtype, scales too or (4 bits) one byte each. Tokens are
  quantized once, when they are appended, and attended without a dense copy of the context.

Every store also holds the kept channels, ``key_channels`` ``(batch, kv_heads, kept_k)`` and ``value_channels``
(or None when values keep every channel), set by `start` when the layer is compacted.

Interface (all shapes ``(batch, kv_heads, ...)``, batch first):

=====================================  ======================================================================
``start(key_channels, value_channels)``  the channels chosen at the end of the prompt; the store is empty
``append(keys, values, real=None)``      full-width tokens: the store gathers the kept channels (and quantizes)
``gather(index)``                       keep tokens ``index (batch, kv_heads, kept)`` per head (eviction)
``drop_oldest(n)``                      forget the oldest ``n`` tokens of every head (sliding windows)
``map(fn)``                             apply ``fn`` to every tensor (beam reorder, batch select, offload)
``tensors()``                           every tensor held (for the bytes)
``logits(q_kept, scaling)``             ``(batch, kv_heads, rows, tokens)`` float32 attention logits
``output(weights)``                     ``(batch, kv_heads, rows, kept_v)``: ``weights @ values``
``preview(keys, values)``               a new store of the same kind holding only these tokens
``preview_exact(keys, values)``         the same in full precision (a `FullStore`)
``block``                               the layer folds whole multiples of this many tokens (1: any count)
=====================================  ======================================================================

`WaitingPrompt` is not a compact part: it holds the earlier chunks of a prompt fed in chunks, every channel, as
8-bit codes, until the prompt ends and the layer chooses its tokens and channels (`ThinKLayer.wait_coded`).
`SpareKeys` holds the pruned key channels of the recent prompts' questions (`ThinKLayer.restored`): exact beside a
`FullStore`, as 8-bit codes beside a `QuantizedStore` (``codes_spare``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from . import quant
from .compact import gather_channels, gather_tokens

__all__ = ["CompactStore", "FullStore", "QuantizedStore", "WaitingPrompt", "SpareKeys"]


class CompactStore:
    """The compact part of one layer. Subclasses say how tokens are held; see the module docstring."""

    #: The layer appends multiples of ``block`` tokens when it folds (1: any count).
    block: int = 1
    #: Code width of the stored tokens (None: the model's dtype).
    bits: int | None = None
    #: Whether the layer keeps its questions' pruned key channels as 8-bit codes (`SpareKeys`).
    codes_spare: bool = False

    def __init__(self) -> None:
        self.clear()

    # -------------------------------------------------------------------------------------------- state
    def clear(self) -> None:
        """Forget the channels and every token (the layer is reset)."""
        self.key_channels: torch.Tensor | None = None
        self.value_channels: torch.Tensor | None = None
        self._clear_tokens()

    def start(self, key_channels: torch.Tensor, value_channels: torch.Tensor | None) -> None:
        """Channels chosen at the end of the prompt: ``(batch, kv_heads, kept)`` indices; the store is empty."""
        self.key_channels = key_channels
        self.value_channels = value_channels
        self._clear_tokens()

    def fresh(self) -> CompactStore:
        """An empty store of the same kind and settings, without channels."""
        raise NotImplementedError

    def preview(self, keys: torch.Tensor, values: torch.Tensor) -> CompactStore:
        """A new store with these channels holding only ``keys``/``values`` (full width), as `append` would hold
        them: what a query sees of tokens that one-at-a-time decoding would already have folded."""
        return self._holding(self.fresh(), keys, values)

    def preview_exact(self, keys: torch.Tensor, values: torch.Tensor) -> FullStore:
        """A `FullStore` with these channels holding only ``keys``/``values`` (full width): the tokens thinned in full
        precision, as a layer holds those the schedule thinned before their block folds (`whole_blocks`)."""
        return self._holding(FullStore(), keys, values)

    def _holding(self, store: CompactStore, keys: torch.Tensor, values: torch.Tensor) -> CompactStore:
        """``store``, empty, given these channels and then ``keys``/``values``."""
        store.start(self.key_channels, self.value_channels)
        store.append(keys, values)
        return store

    def whole_blocks(self, n: int) -> int:
        """The largest multiple of `block` not above ``n``: how many of ``n`` tokens may be appended by a fold
        (elementwise for a tensor of counts)."""
        return n - n % self.block

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every tensor ``t`` held by ``fn(t)`` (all have the batch first)."""
        if self.key_channels is not None:
            self.key_channels = fn(self.key_channels)
        if self.value_channels is not None:
            self.value_channels = fn(self.value_channels)
        self._map_tokens(fn)

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor held: channels and tokens."""
        yield from (t for t in (self.key_channels, self.value_channels) if t is not None)
        yield from self._token_tensors()

    def _kept_values(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` at the kept value channels (all of them when values are not pruned)."""
        return values if self.value_channels is None else gather_channels(values, self.value_channels)

    # ---------------------------------------------------------------------------------- the kind's part
    @property
    def tokens(self) -> int:
        raise NotImplementedError

    def _clear_tokens(self) -> None:
        raise NotImplementedError

    def append(self, keys: torch.Tensor, values: torch.Tensor, real: torch.Tensor | None = None) -> None:
        """Append full-width tokens ``keys``/``values`` ``(batch, kv_heads, n, head_dim)`` after the stored ones.

        ``real`` (``(batch, kv_heads or 1, n)`` bool, optional) tells padding from real tokens; a kind may use it
        (quantization ranges ignore padding), attention masks padding anyway.
        """
        raise NotImplementedError

    def gather(self, index: torch.Tensor) -> None:
        """Keep the tokens ``index`` ``(batch, kv_heads, kept)`` of each head, in that order."""
        raise NotImplementedError

    def drop_oldest(self, n: int) -> None:
        """Forget the oldest ``n`` tokens of every head."""
        raise NotImplementedError

    def _map_tokens(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError

    def _token_tensors(self) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def logits(self, q_kept: torch.Tensor, scaling: float) -> torch.Tensor:
        """``scaling * q_kept @ keys^T``: ``q_kept`` ``(batch, kv_heads, rows, kept_k)``, the queries at the kept
        key channels (a KV head's whole group in ``rows``) -> ``(batch, kv_heads, rows, tokens)`` float32."""
        raise NotImplementedError

    def output(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights @ values``: ``weights`` ``(batch, kv_heads, rows, tokens)`` float32 attention probabilities
        -> ``(batch, kv_heads, rows, kept_v)`` in the values' dtype."""
        raise NotImplementedError


class FullStore(CompactStore):
    """The compact part in the model's dtype: ``keys (batch, kv_heads, tokens, kept_k)``, ``values (..., kept_v)``."""

    def __repr__(self) -> str:
        return f"FullStore(tokens={self.tokens})"

    def fresh(self) -> FullStore:
        return FullStore()

    @property
    def tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def _clear_tokens(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor, real: torch.Tensor | None = None) -> None:
        k = gather_channels(keys, self.key_channels)
        v = values.clone() if self.value_channels is None else gather_channels(values, self.value_channels)
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys, k], dim=-2)
            self.values = torch.cat([self.values, v], dim=-2)

    def gather(self, index: torch.Tensor) -> None:
        self.keys = gather_tokens(self.keys, index)
        self.values = gather_tokens(self.values, index)

    def drop_oldest(self, n: int) -> None:
        # clone: a slice would keep the whole old buffer alive
        self.keys = self.keys[:, :, n:].clone()
        self.values = self.values[:, :, n:].clone()

    def _map_tokens(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)

    def _token_tensors(self) -> Iterator[torch.Tensor]:
        if self.keys is not None:
            yield from (self.keys, self.values)

    def logits(self, q_kept: torch.Tensor, scaling: float) -> torch.Tensor:
        return torch.matmul(q_kept, self.keys.transpose(-1, -2)).float().mul_(scaling)

    def output(self, weights: torch.Tensor) -> torch.Tensor:
        return torch.matmul(weights.to(self.values.dtype), self.values)


class QuantizedStore(CompactStore):
    """The compact part as KIVI-style codes (`think_cache.quant`): ``keys`` a `QuantKeys` (per channel, over
    blocks of ``key_block`` tokens: 16 at 2 bits, 8 at 4, 32 at 8, `think_cache.quant.KEY_BLOCKS`), ``values`` a
    `QuantValues` (per token, in groups of ``group_size`` channels; symmetric, without zero points, at 4 bits:
    `think_cache.quant.SYMMETRIC_VALUES`). At 4 bits every scale is one byte (`think_cache.quant.LOG_SCALES`).

    The layer appends whole 32-token blocks where it can (folds; a prompt without a token policy), so the keys
    stay *regular*: a token's block is its index // ``key_block``, no per-token block index is stored. A policy's prompt
    tokens end with a partial block, eviction gathers tokens per head and a sliding window drops tokens that do not
    start a block: the keys then carry a ``block_index`` (int32 per token), and every token keeps the scale and
    zero point it was quantized with.

    Attention reads the codes in chunks of `think_cache.quant.DEFAULT_CHUNK_TOKENS` tokens: the largest temporary
    is one chunk's codes in float32, ``batch * kv_heads * 2048 * channels * 4`` bytes whatever the context
    (`think_cache.quant.attention_transient_bytes`), besides the ``(batch, kv_heads, rows, tokens)`` logits.

    Parameters
    ----------
    bits:
        2, 4 or 8.
    group_size:
        Value channels per scale and zero point (the last group holds the remainder).
    """

    block = quant.DEFAULT_BLOCK
    #: Beside 62 bytes a token and KV head (4 bits, key ratio 0.5, head_dim 64), the questions' pruned key channels
    #: in bfloat16 (32 tokens of 32 channels, 8 prompts at most) would add 2 bytes a token at a 1k prompt; as 8-bit
    #: codes they add 1.1. (With 3 or fewer pruned channels the codes' scale and zero point cost more than they
    #: save; such a layer saves next to nothing either way.)
    codes_spare = True

    def __init__(self, bits: int, group_size: int | None = None):
        self.bits = bits
        self.group_size = quant.default_group_size(bits) if group_size is None else group_size
        super().__init__()

    @property
    def key_block(self) -> int:
        """Tokens per key scale and zero point (`think_cache.quant.KEY_BLOCKS`); divides `block`, so every fold
        quantizes whole key blocks."""
        return quant.key_block(self.bits)

    def __repr__(self) -> str:
        return f"QuantizedStore(bits={self.bits}, group_size={self.group_size}, tokens={self.tokens})"

    def fresh(self) -> QuantizedStore:
        return QuantizedStore(self.bits, self.group_size)

    @property
    def tokens(self) -> int:
        return 0 if self.keys is None else self.keys.tokens

    def _clear_tokens(self) -> None:
        self.keys: quant.QuantKeys | None = None
        self.values: quant.QuantValues | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor, real: torch.Tensor | None = None) -> None:
        log_scales = quant.LOG_SCALES[self.bits]
        k = quant.quantize_keys(
            gather_channels(keys, self.key_channels), self.bits, self.key_block, real=real, log_scales=log_scales
        )
        v = quant.quantize_values(
            self._kept_values(values),
            self.bits,
            self.group_size,
            symmetric=quant.SYMMETRIC_VALUES[self.bits],
            log_scales=log_scales,
        )
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = quant.cat_keys(self.keys, k)
            self.values = quant.cat_values(self.values, v)

    def gather(self, index: torch.Tensor) -> None:
        self.keys = quant.gather_keys(self.keys, index)
        self.values = quant.gather_values(self.values, index)

    def drop_oldest(self, n: int) -> None:
        self.keys = quant.narrow_keys(self.keys, n, self.tokens - n)
        self.values = quant.narrow_values(self.values, n, self.values.tokens - n)

    def _map_tokens(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys.map(fn), self.values.map(fn)

    def _token_tensors(self) -> Iterator[torch.Tensor]:
        if self.keys is not None:
            yield from self.keys.tensors()
            yield from self.values.tensors()

    def logits(self, q_kept: torch.Tensor, scaling: float) -> torch.Tensor:
        return quant.quantized_attention_logits(q_kept, self.keys, scaling)

    def output(self, weights: torch.Tensor) -> torch.Tensor:
        return quant.quantized_attention_output(weights, self.values).to(self.values.dtype)


def code_rows(x: torch.Tensor) -> quant.QuantValues:
    """``x`` ``(batch, kv_heads, tokens, channels)`` held as 8-bit codes per token in groups of 32 channels (plus a
    scale and zero point per group): how tokens that wait outside the compact part are kept (`WaitingPrompt`,
    `SpareKeys`), close to exact at a quarter of float32's bytes."""
    return quant.quantize_values(x, 8, 32)


class WaitingPrompt:
    """The earlier chunks of a prompt that arrives in chunks, waiting for its end as 8-bit codes of every channel.

    A policy with a budget chooses a prompt's tokens only at its end, from every token; held at full width until
    then, a long prompt fed in chunks would take more memory than in one prefill, which stores only what the
    policy keeps. Here each token's keys and values are held by `code_rows` (8 bits: a quarter of float32's bytes,
    half of bfloat16's); the later chunks attend to them dequantized, one layer at a time, and the end of the prompt
    chooses from them dequantized.
    """

    def __init__(self) -> None:
        self.keys: quant.QuantValues | None = None
        self.values: quant.QuantValues | None = None

    @property
    def tokens(self) -> int:
        return 0 if self.keys is None else self.keys.tokens

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize full-width ``keys``/``values`` ``(batch, kv_heads, n, dim)`` after the tokens held."""
        k, v = code_rows(keys), code_rows(values)
        if self.keys is not None:
            k, v = quant.cat_values(self.keys, k), quant.cat_values(self.values, v)
        self.keys, self.values = k, v

    def dequantized(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens held, ``(batch, kv_heads, tokens, dim)`` keys and values in ``dtype``."""
        return quant.dequantize_values(self.keys, dtype), quant.dequantize_values(self.values, dtype)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys.map(fn), self.values.map(fn)

    def tensors(self) -> Iterator[torch.Tensor]:
        for part in (self.keys, self.values):
            if part is not None:
                yield from part.tensors()


class SpareKeys:
    """The pruned key channels of the newest prompts' questions, ``(batch, kv_heads, tokens, pruned)`` (kept aside
    by `ThinKLayer._keep_spare`, seen whole by a later prompt's rows: `ThinKLayer.restored`): exact, or, ``coded``,
    by `code_rows` (a little over half of bfloat16's bytes), so that they do not undo a quantized compact part's
    saving.
    """

    def __init__(self, keys: torch.Tensor, coded: bool) -> None:
        self.coded = coded
        self.rows: torch.Tensor | quant.QuantValues = self._held(keys)

    def _held(self, keys: torch.Tensor) -> torch.Tensor | quant.QuantValues:
        return code_rows(keys) if self.coded else keys.contiguous()

    def __repr__(self) -> str:
        return f"SpareKeys(tokens={self.tokens}, coded={self.coded})"

    @property
    def tokens(self) -> int:
        return self.rows.tokens if self.coded else self.rows.shape[-2]

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def append(self, keys: torch.Tensor, bound: int) -> None:
        """Add ``keys`` ``(batch, kv_heads, n, pruned)`` after the tokens held, then keep the newest ``bound``."""
        new = self._held(keys)
        if self.coded:
            rows = quant.cat_values(self.rows, new)
            self.rows = quant.narrow_values(rows, max(rows.tokens - bound, 0), min(rows.tokens, bound))
        else:
            self.rows = torch.cat([self.rows, new], dim=-2)[:, :, -bound:].contiguous()

    def select(self, keep: list[bool]) -> None:
        """Keep the tokens whose flag in ``keep`` (one per token held) is set."""
        device = next(self.tensors()).device
        index = torch.tensor(keep, device=device).nonzero().flatten()
        self.map(lambda t: t.index_select(2, index))

    def keys(self, dtype: torch.dtype) -> torch.Tensor:
        """The tokens held, ``(batch, kv_heads, tokens, pruned)`` in ``dtype``."""
        return quant.dequantize_values(self.rows, dtype) if self.coded else self.rows.to(dtype)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.rows = self.rows.map(fn) if self.coded else fn(self.rows)

    def tensors(self) -> Iterator[torch.Tensor]:
        if self.coded:
            yield from self.rows.tensors()
        else:
            yield self.rows
