"""A static, compileable ThinK layer with a quantized compact part: ``ThinKCache(bits=..., max_cache_len=N)``.

`QuantizedStaticThinKLayer` is the `StaticThinKLayer` of a `QuantizedStore`: the same schedule and the same answers
as the eager quantized `ThinKLayer` (the same tokens quantized at the same steps, in the same blocks), with static
shapes after the prompt. Its buffers, allocated at the prompt's end:

* ``compact_keys``, a regular `think_cache.quant.QuantKeys` over ``capacity`` slots: ``codes`` ``(batch, kv_heads,
  capacity, packed_width(kept_k, bits))`` uint8 and per-block ``scale``/``zero`` ``(batch, kv_heads, capacity //
  key_block, kept_k)`` in the model's dtype, the scales one byte each at 4 bits (``key_block`` 16 at 2 bits, 8 at 4,
  32 at 8); slot ``s`` is in key block ``s // key_block``. ``compact_values``, a `QuantValues`:
  ``codes`` ``(..., capacity, packed_width(kept_v, bits))``, ``scale``/``zero`` ``(..., capacity, groups)`` (no
  ``zero`` at 4 bits: symmetric values).
* ``ring_keys`` ``(batch, kv_heads, recent + 2 * FOLD_BLOCK - 1, head_dim)`` and ``ring_values`` ``(..., v_dim)``:
  the newest tokens at **full width and full precision** (entry = logical position mod its size). Unlike the
  full-precision static layer's ring, which holds only the pruned channels (the kept ones are in the slots from
  the start), this one holds every channel: a token's kept channels reach the slots only when its block is
  quantized. A query sees ``held + FOLD_BLOCK`` tokens at full width at most, where ``held`` (``fold_held``, a 0-d
  tensor) is ``recent`` plus the prompt's ``< 32`` tokens that compaction left short of a whole block (``fold_lag``):
  the ring is sized for the largest ``held``, so that its shape, and a compiled graph, do not depend on the prompt's
  length. Those ``fold_lag`` tokens, and as many after each folded block, wait with their pruned channels zeroed
  (`_thinned_lag`), as the eager layer's `ThinKLayer._thin_oldest` leaves them: thinned, not yet quantized.
* ``slot_positions`` ``(batch, 1 or kv_heads, capacity)`` int32, as in `StaticThinKLayer`.

**Slots.** The prompt's compact tokens (quantized eagerly by `QuantizedStore.append` at compaction, in key blocks
from the first, the last one possibly partial under `SnapKV`) fill the first slots; the slots up to the next
multiple of 32 stay empty, and the token at position ``p >= first`` (``first``: the oldest full-width token at the
prompt's end) takes slot ``base + p - first`` with ``base`` that multiple. So every block the layer folds lands on
whole blocks of slots and the keys stay regular: no per-token block index.

**Folding quantizes.** The eager layer folds 32 tokens at the start of a step whose fold point passed a block, and
quantizes them then (keys per channel over each key block, values per token). Each static step computes the same block,
the 32 positions before its fold point, from the ring (before the new token overwrites the oldest entry),
quantizes it (fixed shapes) and writes codes, scales and zero points with ``torch.where(folds, new, old)``: a no-op
in the 31 steps of 32 that fold nothing (an eager step quantizes only when it folds). Prompt compaction stays eager.

**Attention** (`quantized_static_attention`): one float32 softmax over the slots' logits
(`think_cache.quant.quantized_attention_logits` over the whole capacity, masked where the slot's token is not yet
folded, is free, or is padding) and the ring's full-width logits (masked before the fold point); the output is
`quantized_attention_output` over the slots (kept value channels) plus the ring's values. Neither dequantizes the
context: the largest transient is one chunk's codes in float32, ``batch * kv_heads * min(2048, capacity) *
channels * 4`` bytes (`think_cache.quant.attention_transient_bytes`), besides the ``(batch, kv_heads, rows,
capacity)`` logits; the fold's own transient is one 32-token block in float32.

**Bytes.** The codes of ``capacity`` tokens, the ring at full precision and the slot positions: 0.31x of
transformers' ``StaticCache`` at key ratio 0.5, 4 bits, head_dim 64, bfloat16 and 1k tokens (0.20x in float32): the
eager 4-bit cache's 0.25x of ``DynamicCache``, plus the ring's 63 tokens (0.06x of 1k, less for a larger
``N``) and the slot positions.

**Not supported** (refused when the cache is built): `StreamingLLM` and `H2O`, which free and reuse slots one token
at a time, so a block's tokens would scatter over slots and a slot's scale would have to be found per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from . import _compat, quant
from .compact import as_bool_mask, cap_logits, gather_channels, pruned_channels, scatter_channels
from .layer import fold_point
from .static import StaticThinKLayer

__all__ = [
    "QuantizedStaticThinKLayer",
    "quantized_static_attention",
    "masked_index_copy",
    "ring_positions",
    "zero_keys",
    "zero_values",
]


def ring_positions(t: torch.Tensor, size: int) -> torch.Tensor:
    """``(size,)``: the logical position each ring entry holds when the newest written is ``t`` (a 0-d tensor);
    entry ``i`` holds the newest position ``<= t`` that is ``i`` mod ``size`` (negative: never written)."""
    return t - torch.remainder(t - torch.arange(size, device=t.device), size)


def masked_index_copy(buffer: torch.Tensor, dim: int, index: torch.Tensor, rows: torch.Tensor, write: torch.Tensor):
    """``buffer.index_copy_(dim, index, rows)`` where the 0-d bool ``write`` is True, else nothing: the rows at
    ``index`` are written back unchanged. Static shapes: a step that may or may not fold compiles to one graph."""
    old = buffer.index_select(dim, index)
    buffer.index_copy_(dim, index, torch.where(write, rows, old))


def zero_keys(like: torch.Tensor, tokens: int, channels: int, bits: int, block: int) -> quant.QuantKeys:
    """Regular `QuantKeys` of ``tokens`` (a multiple of ``block``) all-zero tokens, batch and heads, dtype and device
    those of ``like`` ``(batch, kv_heads, ...)``: the buffers of a static layer, written in place."""
    batch, heads = like.shape[:2]
    codes = torch.zeros(batch, heads, tokens, quant.packed_width(channels, bits), dtype=torch.uint8, device=like.device)
    zero = like.new_zeros(batch, heads, tokens // block, channels)
    scale = _zero_scales(zero, bits)
    return quant.QuantKeys(codes, scale, zero, None, bits, block, channels, like.dtype)


def zero_values(like: torch.Tensor, tokens: int, channels: int, bits: int, group_size: int) -> quant.QuantValues:
    """`QuantValues` of ``tokens`` all-zero tokens, as `zero_keys` (``group_size`` clipped to ``channels``, as
    `think_cache.quant.quantize_values` clips it; no zero points where ``bits`` stores values symmetric)."""
    batch, heads = like.shape[:2]
    codes = torch.zeros(batch, heads, tokens, quant.packed_width(channels, bits), dtype=torch.uint8, device=like.device)
    zero = like.new_zeros(batch, heads, tokens, quant.value_groups(channels, group_size))
    scale = _zero_scales(zero, bits)
    zero = None if quant.SYMMETRIC_VALUES[bits] else zero
    return quant.QuantValues(codes, scale, zero, bits, min(group_size, channels), channels, like.dtype)


def _zero_scales(like: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero scales shaped as ``like``, as a store of ``bits`` holds them: one-byte codes (`quant.LOG_SCALES`) or
    ``like``'s dtype."""
    return torch.zeros_like(like, dtype=torch.uint8) if quant.LOG_SCALES[bits] else torch.zeros_like(like)


class QuantizedStaticThinKLayer(StaticThinKLayer):
    """A static ThinK layer whose compact part is quantized (its store is a `QuantizedStore`); see the module
    docstring. Before the end of the prompt it is a quantized `ThinKLayer`; after it, every step has static shapes."""

    _static_tensors = ("ring_keys", "ring_values", "slot_positions")
    #: 0-d tensors besides the base class's (its ``fold_held`` is an int: here it depends on the prompt's length)
    _scalars = ("fold_held", "fold_lag")
    #: The packed buffers (a `QuantKeys` and a `QuantValues`), written in place.
    _packed = ("compact_keys", "compact_values")

    def reset(self) -> None:
        for name in self._packed + self._scalars:
            setattr(self, name, None)
        self.slot_base: int | None = None
        super().reset()

    def _packed_tensors(self) -> Iterator[torch.Tensor]:
        for name in self._packed:
            part = getattr(self, name, None)
            if part is not None:
                yield from part.tensors()

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from super().tensors()
        yield from self._packed_tensors()
        yield from (t for t in (getattr(self, name, None) for name in self._scalars) if t is not None)

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super()._map_tensors(fn)
        for name in self._packed:
            part = getattr(self, name)
            if part is not None:
                setattr(self, name, part.map(fn))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # in place, as the base class's buffers
        for t in self._packed_tensors():
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    @property
    def compact_tokens(self) -> int:
        if not self.is_static:
            return super().compact_tokens
        return int((self.slot_positions < self.length).sum(-1).max())

    def free_slot(self) -> torch.Tensor:
        """``(batch, 1 or kv_heads)``: the slot of the token at position ``length``, ``base + length - first``."""
        slot = self.length - self.first_full + self.slot_base
        return slot.to(torch.int64).expand(*self.slot_positions.shape[:2])

    # --------------------------------------------------------------------------------------- compaction
    def _allocate(self) -> None:
        """Allocate the packed buffers and the ring, and move the compacted prompt into them."""
        keys, values = self.keys, self.values  # full width: the prompt's tokens the compaction left (and any later)
        batch, kv_heads, n_full, head_dim = keys.shape
        v_dim = values.shape[-1]
        store = self.store
        block, bits = store.block, store.bits
        first = self.full_from
        n_prompt = store.tokens
        base = -(-n_prompt // block) * block
        capacity = -(-(base + self.max_cache_len - first) // block) * block
        kept_k = self.key_channels.shape[-1]
        kept_v = v_dim if self.value_channels is None else self.value_channels.shape[-1]
        device = keys.device

        self.compact_keys = zero_keys(keys, capacity, kept_k, bits, store.key_block)
        self.compact_values = zero_values(values, capacity, kept_v, bits, store.group_size)
        if n_prompt:
            prompt_keys, prompt_values = store.keys, store.values
            if not prompt_keys.is_regular:
                raise RuntimeError(
                    "think_cache: a prompt's quantized keys are irregular; this is a bug, please report it"
                )
            self.compact_keys.codes[:, :, :n_prompt] = prompt_keys.codes
            self.compact_keys.scale[:, :, : prompt_keys.n_blocks] = prompt_keys.scale
            self.compact_keys.zero[:, :, : prompt_keys.n_blocks] = prompt_keys.zero
            for slot, prompt in zip(self.compact_values.tensors(), prompt_values.tensors(), strict=True):
                slot[:, :, :n_prompt] = prompt

        origin = self.origin
        # tensors and a ring of a size that do not depend on the prompt's length: no recompile per prompt
        held = self.static_held(origin, first)
        self.fold_held = torch.tensor(held, device=device)
        self.fold_lag = torch.tensor(held - self.held_tokens(origin), device=device)
        self.pruned_key_channels = pruned_channels(self.key_channels, head_dim)
        if self.value_channels is not None:
            self.pruned_value_channels = pruned_channels(self.value_channels, v_dim)
        ring = self.held_tokens(origin) + 2 * self.fold_block - 1  # the most a query sees at full width, at most
        self.ring_keys = keys.new_zeros(batch, kv_heads, ring, head_dim)
        self.ring_values = values.new_zeros(batch, kv_heads, ring, v_dim)
        self.slot_positions = self._prompt_slot_positions(batch, kv_heads, capacity, n_prompt, first)
        self.slot_base = base
        self._enter_static(keys, values, first)

    # ------------------------------------------------------------------------------------------ decoding
    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold (quantize) the block the token at ``length`` no longer sees at full width, if its step folds one;
        then store the token in the ring and mark its slot, and advance ``length``. Returns the ring (the ThinK
        attention reads the layer)."""
        position = self.length.view(1)
        self._fold_block(self.length)  # before the new token takes the ring entry of the block's oldest
        ring_index = torch.remainder(position, self.ring_keys.shape[2])
        self.ring_keys.index_copy_(2, ring_index, key_states)
        self.ring_values.index_copy_(2, ring_index, value_states)
        slot = self.free_slot()
        self.slot_positions.scatter_(-1, slot[..., None], position.to(torch.int32).expand_as(slot)[..., None])
        self.length.add_(1)
        return self.ring_keys, self.ring_values

    def _fold_block(self, t: torch.Tensor) -> None:
        """In the step of the query at ``t``: quantize the ``fold_block`` positions before its fold point from the
        ring into their slots, when this step folds them (`_folds_at`), as the eager layer's `_fold` does.

        A compiled step has one graph for both cases: it quantizes the block in every step and writes it with
        `masked_index_copy` (in the steps that fold nothing, the slots' own rows back). That costs: on the CPU
        (inductor, a 2-layer Llama with 2 KV heads of 64, 300 tokens, steps interleaved) a compiled 4-bit step took
        3.1 ms, 2.6 ms without the fold, against 2.0 ms for the full-precision static layer. ``torch.cond`` would
        skip the quantization in the steps that fold nothing; tried, the compiled forward then lost the cache's
        hand-off to the attention (not pursued further). Eagerly only a folding step quantizes (one read of the
        flag, as `_check_free_slot`'s): quantizing a block eagerly costs about twice the attention over 1k
        tokens."""
        block = self.fold_block
        fold = fold_point(t, self.fold_origin, self.fold_held, block)
        folds = self._folds_at(t, fold)
        compiling = _compat.is_compiling()
        if not compiling and not bool(folds):
            return
        capacity = self.slot_positions.shape[-1]
        start = (fold - block - self.first_full + self.slot_base).clamp(0, capacity - block)  # a valid index always
        slots = start + torch.arange(block, device=t.device)
        targets = list(zip(self._fold_targets(slots), self._quantized_rows(fold), strict=True))
        for (buffer, index), rows in targets + self._thinned_lag(fold):
            if compiling:
                masked_index_copy(buffer, 2, index, rows, folds)
            else:
                buffer.index_copy_(2, index, rows)

    def _thinned_lag(self, fold: torch.Tensor) -> list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """What the eager layer's `_thin_oldest` does when it folds: the ``fold_lag`` positions from ``fold`` on (the
        tokens the schedule thins, short of a block) with their pruned key (and value) channels zeroed in the ring.
        As ``((ring, entries), rows)``, the entries of the ``fold_block`` positions from ``fold`` on, the rows past
        the lag unchanged."""
        block = self.fold_block
        offsets = torch.arange(block, device=fold.device)
        entries = torch.remainder(fold + offsets, self.ring_keys.shape[2])
        lag = (offsets < self.fold_lag)[:, None]
        writes = []
        parts = ((self.ring_keys, self.pruned_key_channels), (self.ring_values, self.pruned_value_channels))
        for ring, pruned in parts:
            if pruned is None or pruned.shape[-1] == 0:
                continue
            rows = ring.index_select(2, entries)
            thinned = rows.scatter(-1, pruned.long()[:, :, None, :].expand(*rows.shape[:3], -1), 0)
            writes.append(((ring, entries), torch.where(lag, thinned, rows)))
        return writes

    def _fold_targets(self, slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What a fold writes, as ``(buffer, index along the tokens)``: key codes at the block's ``slots``, key scale
        and zero point at its block, value codes, scales and zero points at its slots."""
        key_block = self.compact_keys.block  # a fold writes fold_block // key_block key blocks
        block_index = slots[::key_block] // key_block
        keys, values = self.compact_keys, self.compact_values
        return [(keys.codes, slots), (keys.scale, block_index), (keys.zero, block_index)] + [
            (t, slots) for t in values.tensors()
        ]

    def _quantized_rows(self, fold: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The block of the ``fold_block`` positions before ``fold``, read from the ring and quantized as the eager
        layer's fold quantizes it: keys (kept channels) per channel over the block, values (kept channels) per
        token. Returns the rows of `_fold_targets`, in its order."""
        block = self.fold_block
        entries = torch.remainder(fold - block + torch.arange(block, device=fold.device), self.ring_keys.shape[2])
        keys = gather_channels(self.ring_keys.index_select(2, entries), self.key_channels)
        values = self.ring_values.index_select(2, entries)
        if self.value_channels is not None:
            values = gather_channels(values, self.value_channels)
        qk = self.compact_keys
        qk = quant.quantize_keys(keys, qk.bits, qk.block, log_scales=qk.log_scales)
        qv = self.compact_values
        qv = quant.quantize_values(values, qv.bits, qv.group_size, symmetric=qv.symmetric, log_scales=qv.log_scales)
        return qk.codes, qk.scale, qk.zero, *qv.tensors()

    def attend(
        self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None = None
    ) -> torch.Tensor:
        return quantized_static_attention(self, query, mask, scaling, softcap)


def quantized_static_attention(
    layer: QuantizedStaticThinKLayer,
    query: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of one new token over a quantized static layer, ``(batch, 1, q_heads, v_dim)``; see the module
    docstring. Arguments as in `think_cache.static.static_attention`.

    The slots' logits come from their codes in chunks (`think_cache.quant.quantized_attention_logits`), the ring's
    from its full-precision keys; one float32 softmax spans both, each masked by positions (a slot before the fold
    point, a ring entry from it on) and padding. No dequantized copy of the context is made: the largest transient
    is one chunk's codes in float32 (`think_cache.quant.attention_transient_bytes`).
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = layer.ring_keys.shape[1]
    rows = q_heads // kv_heads * q_len
    q = query.reshape(batch, kv_heads, rows, head_dim)
    t = layer.length - 1  # the query's logical position
    fold = fold_point(t, layer.fold_origin, layer.fold_held, layer.fold_block)
    capacity = layer.slot_positions.shape[-1]

    compact = quant.quantized_attention_logits(gather_channels(q, layer.key_channels), layer.compact_keys, scaling)
    recent = torch.matmul(q, layer.ring_keys.transpose(-1, -2)).float().mul_(scaling)
    logits = cap_logits(torch.cat([compact, recent], dim=-1), softcap)

    positions = layer.slot_positions.long()  # (batch, 1 | kv_heads, capacity)
    ring = ring_positions(t, layer.ring_keys.shape[2])
    visible = torch.cat(
        [
            (positions < fold).expand(batch, kv_heads, capacity),  # folded (quantized) tokens; free slots are FREE
            (ring >= torch.maximum(fold, layer.first_full)).expand(batch, kv_heads, ring.shape[0]),
        ],
        dim=-1,
    )[:, :, None, :]
    mask = as_bool_mask(mask)
    if mask is not None:  # padding, gathered at each column's position
        width = mask.shape[-1]
        index = torch.cat([positions.expand(batch, kv_heads, capacity), ring.expand(batch, kv_heads, -1)], dim=-1)
        index = index.clamp(0, width - 1)[:, :, None, :]
        mask = mask[:, :1].expand(batch, kv_heads, q_len, width)
        visible = visible & mask.gather(-1, index.expand(-1, -1, q_len, -1))
    # a finite minimum, not -inf: a fully masked (padded) row then gives a uniform softmax instead of NaN
    probs = torch.softmax(logits.masked_fill(~visible, torch.finfo(logits.dtype).min), dim=-1)
    layer.after_attention(mask, None)

    values = layer.ring_values
    kept = quant.quantized_attention_output(probs[..., :capacity], layer.compact_values).to(values.dtype)
    if layer.value_channels is not None:
        kept = scatter_channels(kept, layer.value_channels, values.shape[-1])
    out = kept + torch.matmul(probs[..., capacity:].to(values.dtype), values)
    return out.view(batch, q_heads, q_len, out.shape[-1]).transpose(1, 2)
