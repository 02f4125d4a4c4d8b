"""A static, compileable ThinK layer: ``ThinKCache(key_ratio=..., max_cache_len=N)``.

`StaticThinKLayer` is a `ThinKLayer` whose decoding steps have static shapes, so that ``torch.compile(model.forward,
fullgraph=True, mode="reduce-overhead")`` and transformers' automatic compile in ``generate`` capture them whole.

**Prefill** runs eagerly and exactly as in `ThinKLayer`: the prompt's tokens at full width, the channels (and a
policy's tokens) chosen at the prompt's end by `ThinKLayer.observe`/`ThinKLayer.compact`. Right after compaction the
layer moves into pre-allocated buffers, and never changes their shapes again:

* ``compact_keys`` ``(batch, kv_heads, capacity, kept_k)`` and ``compact_values`` ``(..., kept_v)``: every held
  token at the kept channels, one slot each.
* ``slot_positions`` ``(batch, 1 or kv_heads, capacity)`` int32: each slot's logical position (per head under a
  policy), `FREE` for a slot that holds no token (never written, or its token evicted).
* ``ring_keys`` ``(batch, kv_heads, recent + FOLD_BLOCK, head_dim - kept_k)``: the *pruned* key channels of the
  newest tokens, in a ring (entry = logical position mod its size), and ``ring_slots`` the slot of each entry's
  token; ``ring_values`` likewise for pruned value channels (None when values keep every channel:
  ``compact_values`` then holds them whole).
* ``token_scores`` ``(batch, kv_heads, capacity)`` float32 under `H2O`: each slot's accumulated attention.
* ``length``: tokens seen, a 0-d tensor written in place; the prompt's end (``fold_origin``) and the oldest
  full-width token after it (``first_full``) are 0-d tensors too.

**Decoding** writes each new token into the first free slot of each batch row and head (kept channels) and into its
ring entry (pruned channels), in place. A query at position ``t`` sees a token thinned iff it lies before
``fold_point(t)`` (the schedule of `think_cache.layer`), else at full width. Here "folding" is mask arithmetic, not
a copy: the logits are the kept channels' ``q_kept @ compact_keys^T`` over every slot, plus, for the ring's tokens
at or after the fold point, the pruned channels' ``q_pruned @ ring_keys^T`` added at their slots; one float32
softmax over the slots, masked where a slot holds no token, a later one (position > ``t``) or padding. The answers
equal the eager `ThinKLayer`'s (the same tokens thinned at the same steps; only the float summation order differs).

**Eviction while decoding** (`StreamingLLM`, `H2O`) is mask arithmetic too. The eager layer evicts in the forward
that folds a block, after its attention: it drops the compact tokens the policy scores lowest (`top_tokens`: sinks
and the newest ``recent`` stay, padding goes first), back to the budget. The static layer computes the same count
and the same ranking (`keep_priority`, one sort of the slots) in every step, applies it in the folding steps only,
and marks the dropped slots `FREE`; the next tokens reuse them. Under `H2O` every step adds each slot's attention,
summed over its query group, to ``token_scores``, as the eager layer adds it to its tokens'. The same tokens are
evicted at the same steps (tested over 110 steps and three evictions: logits within 1e-5 eager, 1e-4 compiled);
only the float summation order differs, so an `H2O` score tie within rounding could break the other way.

Holding the kept channels of every token once and the pruned channels of only the ring's tokens keeps the bytes
at ``(kept_k + kept_v) / (2 * head_dim)`` of transformers' ``StaticCache`` plus the ring: 0.76x at key ratio 0.5,
head_dim 64 and 1k tokens.

**Capacity.** ``max_cache_len`` bounds the logical length (prompt + generated tokens), as in ``StaticCache``: the
masks span it. The slots, allocated at the prompt's end, are what the layer can hold at once: one per token kept
from the prompt plus one per later token, so ``N`` without a policy and ``min(budget, prompt) + (N - prompt)`` under
`SnapKV`; under `StreamingLLM` and `H2O` at most ``budget + FOLD_BLOCK + 1`` (the budget, the block decoded
between two evictions, and the step after the prompt; plus ``recent + 1 - policy.recent`` when the full-width
``recent`` exceeds the policy's protected newest tokens), whatever ``N``: StreamingLLM(4 + 60) in a cache of 1024
tokens holds 0.08x the bytes of a ``StaticCache`` of 1024. A prompt longer than ``N`` raises at the prefill, and the
patched ``generate`` refuses ``prompt + max_new_tokens > N``; nothing is ever truncated silently.

**Quantized storage** (``bits``) is a subclass, `think_cache.static_quant.QuantizedStaticThinKLayer`: packed codes
in the slots, the newest tokens at full precision in the ring, each block quantized in the step that folds it;
without a policy or with `SnapKV`. It refuses `StreamingLLM` and `H2O` (their freed slots would scatter a block).

**Not supported yet** (refused with a clear error): quantized storage under `StreamingLLM` or `H2O`, sliding-window
layers, a second prompt on a filled cache (a chat's next turn, assisted decoding) and `crop`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from . import _compat
from .compact import as_bool_mask, cap_logits, gather_channels, key_padding, pruned_channels, scatter_channels
from .layer import ThinKLayer, fold_point
from .policies import checked_scores, keep_priority

__all__ = ["StaticThinKLayer", "static_attention"]

# Tensors of a static layer whose first dimension is the batch (the 0-d lengths are not).
_STATIC_TENSORS = ("compact_keys", "compact_values", "ring_keys", "ring_values", "slot_positions", "ring_slots")
_STATIC_CHANNELS = ("pruned_key_channels", "pruned_value_channels")
# 0-d tensors: the length and the fold schedule's constants
_STATIC_SCALARS = ("length", "fold_origin", "first_full")

#: ``slot_positions`` of a slot that holds no token (never written, or its token evicted): after every position.
FREE = torch.iinfo(torch.int32).max


def second_prompt_error(n: int) -> NotImplementedError:
    """What a static cache says to a forward of ``n`` > 1 tokens after its prompt."""
    return NotImplementedError(
        f"A static ThinKCache decodes one token per forward after its prompt, got a forward of {n} tokens (a "
        "second prompt on a filled cache, or assisted decoding). Use a new cache (or `cache.reset()`) per "
        "prompt, or a ThinKCache without max_cache_len."
    )


#: What a static cache says to a model with attention sinks (GPT-OSS): its softmax over slots has no sink.
STATIC_SINKS = (
    "A static ThinKCache (max_cache_len) has no attention sinks (GPT-OSS): use a ThinKCache without max_cache_len "
    "for this model."
)


class StaticThinKLayer(ThinKLayer):
    """A full-attention ThinK layer with pre-allocated buffers for what it can hold at once (``max_cache_len``
    tokens, fewer under a policy's budget); see the module docstring. Before the end of the prompt it is a
    `ThinKLayer`; after it, every step has static shapes."""

    is_compileable = True
    is_croppable = False
    keeps_spare = False  # no later prompt: a static cache refuses a chat's next turn
    #: The layer's own buffers whose first dimension is the batch (a storage kind's subclass names its own).
    _static_tensors: tuple[str, ...] = _STATIC_TENSORS

    def __init__(self, max_cache_len: int, **kwargs) -> None:
        self.max_cache_len = max_cache_len
        super().__init__(**kwargs)

    def static_tokens(self) -> int:
        return self.max_cache_len

    def __repr__(self) -> str:
        state = "static" if self.is_static else "prefill"
        return f"{type(self).__name__}(max_cache_len={self.max_cache_len}, tokens={self.seen_tokens}, {state})"

    def reset(self) -> None:
        # `length` is set at compaction: from then on the layer is static
        for name in self._static_tensors + _STATIC_CHANNELS + _STATIC_SCALARS:
            setattr(self, name, None)
        super().reset()

    @property
    def seen_tokens(self) -> int:
        """Tokens seen, as a Python int (read from ``length`` once static: eager code only)."""
        return self._seen_tokens if self.length is None else int(self.length)

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        if self.length is None:
            self._seen_tokens = value
        else:
            self.length.fill_(value)

    @property
    def is_static(self) -> bool:
        """Whether the layer lives in its pre-allocated buffers (after the end of the prompt)."""
        return self.length is not None

    @property
    def prunes(self) -> bool:
        return True  # the end of the prompt is where the buffers are allocated, even when nothing is pruned

    @property
    def compact_tokens(self) -> int:
        """Tokens held; once static, the most any batch row and head holds (its slots with a token)."""
        if not self.is_static:
            return super().compact_tokens
        return int((self.slot_positions != FREE).sum(-1).max())

    @property
    def stored_tokens(self) -> int:
        return self.compact_tokens if self.is_static else super().stored_tokens

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from super().tensors()
        for name in self._static_tensors + _STATIC_CHANNELS + _STATIC_SCALARS:
            t = getattr(self, name, None)
            if t is not None:
                yield t

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super()._map_tensors(fn)
        for name in self._static_tensors + _STATIC_CHANNELS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # in place, so that the buffers keep the addresses a compiled graph (or a CUDA graph) captured
        scores = self.token_scores  # H2O's accumulated scores: a buffer a compiled graph captured, too
        super()._map_tensors(lambda t: t.index_select(0, beam_idx.to(t.device)))
        if scores is not None and self.token_scores is not scores:
            scores.copy_(self.token_scores)
            self.token_scores = scores
        for name in self._static_tensors + _STATIC_CHANNELS:
            t = getattr(self, name)
            if t is not None:
                t.copy_(t.index_select(0, beam_idx.to(t.device)))

    # ---------------------------------------------------------------------------------------- cache API
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill: as `ThinKLayer.update`. Decoding: write the token into its compact and ring slots, in place."""
        n = key_states.shape[-2]
        if not self.is_static:
            if _compat.is_compiling():
                raise RuntimeError(
                    "A static ThinKCache must see the end of its prompt before a compiled step: run the prefill "
                    "eagerly and call `cache.mark_prompt_end(prompt_length)` before it, or `cache.compact()` after "
                    "it (the patched `generate` does this)."
                )
            self._check_capacity(n)
            if self.prompt_end is not None and self.seen_tokens < self.prompt_end < self.seen_tokens + n:
                raise NotImplementedError(
                    "A static ThinKCache compacts at the end of a forward: this forward holds the prompt's end and "
                    f"{self.seen_tokens + n - self.prompt_end} tokens after it (assisted decoding's first forward). "
                    "Use a ThinKCache without max_cache_len for that."
                )
            if self.is_initialized and not self.is_compacted:
                end = self._ended_prompt(self.seen_tokens, n)
                if end is not None:
                    self.compact(end)
            if not self.is_static:
                return super().update(key_states, value_states)
        if n != 1:
            raise second_prompt_error(n)
        if not _compat.is_compiling():
            self._check_capacity(n)
            self._check_free_slot()
        return self._write(key_states, value_states)

    def _check_capacity(self, n: int) -> None:
        if self.seen_tokens + n > self.max_cache_len:
            raise ValueError(
                f"This static ThinKCache holds max_cache_len={self.max_cache_len} tokens, and a forward of {n} "
                f"tokens after {self.seen_tokens} would exceed it. Pass a larger max_cache_len (at least the prompt "
                "plus the new tokens)."
            )

    def _check_free_slot(self) -> None:
        """Eager steps only: every batch row and head has a slot for the next token (`evicting_capacity` bounds
        what an evicting policy holds; a full buffer would overwrite a token silently, so say it loudly)."""
        if not bool((self.slot_positions == FREE).any(dim=-1).all()):
            raise RuntimeError(
                f"think_cache: a static layer has no free slot for its next token (capacity "
                f"{self.compact_keys.shape[2]}, policy {self.policy!r}); this is a bug, please report it"
            )

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token at the position ``length`` in a free slot (the first, per batch row and head) and in its
        ring slot, and advance ``length``; returns the compact buffers (the ThinK attention reads the layer)."""
        position = self.length.view(1)
        slot = self.free_slot()
        ring_index = torch.remainder(position, self.ring_keys.shape[2])
        _write_slot(self.compact_keys, slot, gather_channels(key_states, self.key_channels))
        self.ring_keys.index_copy_(2, ring_index, gather_channels(key_states, self.pruned_key_channels))
        if self.ring_values is None:  # values keep every channel
            _write_slot(self.compact_values, slot, value_states)
        else:
            _write_slot(self.compact_values, slot, gather_channels(value_states, self.value_channels))
            self.ring_values.index_copy_(2, ring_index, gather_channels(value_states, self.pruned_value_channels))
        self.slot_positions.scatter_(-1, slot[..., None], position.to(torch.int32).expand_as(slot)[..., None])
        self.ring_slots.index_copy_(2, ring_index, slot[..., None])
        self.length.add_(1)
        return self.compact_keys, self.compact_values

    def free_slot(self) -> torch.Tensor:
        """``(batch, 1 or kv_heads)``: the first slot holding no token."""
        return (self.slot_positions == FREE).to(torch.int32).argmax(dim=-1)

    def attend(
        self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None = None
    ) -> torch.Tensor:
        """Attention of one new token over the static buffers (`static_attention`): what the ThinK attention
        calls once the layer is static. A storage kind's subclass brings its own."""
        return static_attention(self, query, mask, scaling, softcap)

    def get_seq_length(self) -> int | torch.Tensor:
        """Tokens seen: an int before the end of the prompt, then a 0-d tensor (as transformers' ``StaticLayer``,
        so that a compiled step reads it without a graph break)."""
        return self.length if self.is_static else self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # static: the mask spans every logical position the buffers can hold, as StaticLayer's does
        return (self.max_cache_len, 0) if self.is_static else super().get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return self.max_cache_len

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self.is_initialized:
            raise ValueError(
                "A static ThinKCache cannot crop (assisted decoding, prompt lookup): use a ThinKCache without "
                "max_cache_len for them."
            )

    # --------------------------------------------------------------------------------------- compaction
    def compact(self, end: int | None = None) -> None:
        """`ThinKLayer.compact`, then the move into the static buffers."""
        if self.is_compacted:
            return
        super().compact(end)
        self._allocate()

    def _capacity(self, n_prompt: int, first: int) -> int:
        """Slots needed for ``n_prompt`` compact prompt tokens and every later position from ``first`` (the oldest
        full-width token) to ``max_cache_len``; under a policy that evicts while decoding, at most what the layer
        holds at once (`evicting_capacity`)."""
        slots = n_prompt + self.max_cache_len - first
        if self.evicts_while_decoding:
            slots = min(slots, self.evicting_capacity())
        return slots

    def evicting_capacity(self) -> int:
        """The most tokens a layer under an evicting policy holds at once: the budget, plus the full-width tokens
        beyond the policy's protected newest ones (``recent + 1`` of them stay through an eviction, which cannot
        drop a protected token to make room), plus the ``fold_block + 1`` tokens decoded from one eviction to the
        next (``fold_block`` in steady state, one more after the prompt)."""
        beyond = max(0, self.recent + 1 - self.policy.protected_recent)
        return self.policy.budget + beyond + self.fold_block + 1

    def _allocate(self) -> None:
        """Allocate the buffers and move the compacted prompt into them."""
        keys, values = self.keys, self.values  # full width: the prompt's newest `recent` tokens (and any later)
        batch, kv_heads, n_full, head_dim = keys.shape
        v_dim = values.shape[-1]
        first = self.full_from  # logical position of the first full-width token
        n_prompt = self.store.tokens
        capacity = self._capacity(n_prompt, first)
        kept_k = self.key_channels.shape[-1]
        device = keys.device

        kept_v = v_dim if self.value_channels is None else self.value_channels.shape[-1]
        self.compact_keys = keys.new_zeros(batch, kv_heads, capacity, kept_k)
        self.compact_values = values.new_zeros(batch, kv_heads, capacity, kept_v)
        if n_prompt:
            self.compact_keys[:, :, :n_prompt] = self.store.keys
            self.compact_values[:, :, :n_prompt] = self.store.values
        ring = self.recent + self.fold_block  # what a query sees at full width: at most held + fold_block - 1 older
        self.pruned_key_channels = pruned_channels(self.key_channels, head_dim)
        self.ring_keys = keys.new_zeros(batch, kv_heads, ring, head_dim - kept_k)
        if self.value_channels is not None:
            self.pruned_value_channels = pruned_channels(self.value_channels, v_dim)
            self.ring_values = values.new_zeros(batch, kv_heads, ring, v_dim - self.value_channels.shape[-1])
        self.slot_positions = self._prompt_slot_positions(batch, kv_heads, capacity, n_prompt, first)
        self.ring_slots = torch.zeros(*self.slot_positions.shape[:2], ring, dtype=torch.long, device=device)
        if self.token_scores is not None:  # H2O: its prompt tokens' accumulated attention, then 0 per slot
            self.token_scores = torch.nn.functional.pad(self.token_scores, (0, capacity - n_prompt - n_full))

        self.fold_held = self.static_held(self.origin, first)
        self._enter_static(keys, values, first)

    def _enter_static(self, keys: torch.Tensor, values: torch.Tensor, first: int) -> None:
        """The end of `_allocate`, once the buffers hold the compact prompt: the schedule's constants as 0-d
        tensors, the store emptied (the buffers hold its tokens now), the full-width ``keys``/``values`` (logical
        positions from ``first``) written as if decoded one at a time, and every buffer's address fixed."""
        device = keys.device
        self.fold_origin = torch.tensor(self.origin, device=device)
        self.first_full = torch.tensor(first, device=device)
        self.length = torch.tensor(first, device=device)
        self.store.start(self.key_channels, self.value_channels)
        self.compact_positions = None
        self.keys, self.values = keys[:, :, :0].clone(), values[:, :, :0].clone()
        for i in range(keys.shape[-2]):
            self._write(keys[:, :, i : i + 1], values[:, :, i : i + 1])
        if not _compat.is_compiling():  # fixed addresses: no graph break or CUDA-graph re-record on in-place writes
            for t in self.tensors():
                torch._dynamo.mark_static_address(t)

    def static_held(self, origin: int, first: int) -> int:
        """How many of the prompt's last tokens wait at full width with the generated ones (`fold_point`'s
        ``held``) once static: `held_tokens`, plus, for a store that folds whole blocks (`QuantizedStore`), the
        prompt's tokens short of a whole block that compaction left in the full-width part, thinned (``first`` is
        the oldest full-width token): its folds then take ``fold_block`` tokens from ``first`` on, as the eager
        layer's do."""
        held = self.held_tokens(origin)
        return held + (origin - held - first) % self.store.block

    def _prompt_slot_positions(self, batch: int, kv_heads: int, capacity: int, n_prompt: int, first: int):
        """``(batch, 1 or kv_heads, capacity)`` int32: the compact prompt tokens' positions in the first slots (a
        policy's, per head), `FREE` after them."""
        if self.compact_positions is not None:  # a policy's tokens, per head
            prompt = self.compact_positions
        else:
            prompt = torch.arange(first - n_prompt, first, device=self.keys.device, dtype=torch.int32)
            prompt = prompt.expand(batch, 1, n_prompt)
        free = prompt.new_full((*prompt.shape[:2], capacity - n_prompt), FREE)
        return torch.cat([prompt, free], dim=-1).contiguous()

    # ----------------------------------------------------------------------------------------- eviction
    def _evict(self, mask: torch.Tensor | None) -> None:
        """`ThinKLayer._evict` by masks, for the forward that just attended: in a step that folds a block, free the
        slots of the compact tokens the policy scores lowest, back to the budget, as the eager layer drops them (the
        same counts, the same tokens); a no-op in the other steps. Static shapes: one sort of the slots per step."""
        t = self.length - 1  # the query's position
        positions = self.slot_positions.long()
        fold = fold_point(t, self.fold_origin, self.fold_held, self.fold_block)
        compact = positions < fold  # `FREE` is after every fold point
        width = self.max_cache_len
        mask = as_bool_mask(mask)
        if mask is not None and mask.shape[-1] < width:  # the forward that made the layer static: a mask over the
            # positions so far (a hand-written loop's first single-token forward marks the prompt's end)
            mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], width - mask.shape[-1])], dim=-1)
        real_logical = key_padding(mask, positions.shape[0], width, positions.device)
        real_at, always, prefer = self._forced(real_logical, positions.clamp(max=width - 1), t + 1)
        n_drop = self._drop_count(positions, compact, always | prefer, t) * self._folds_at(t, fold)
        scores = checked_scores(
            self.policy, "decode_scores", self.policy.decode_scores(positions, self.token_scores), positions.shape
        )
        priority = keep_priority(scores, always, ~real_at, prefer).masked_fill(~compact, float("inf"))
        self._free(_lowest(priority, n_drop))

    def _drop_count(
        self, positions: torch.Tensor, compact: torch.Tensor, protected: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """``(batch, heads)``: how many compact tokens `ThinKLayer._evict` drops for the query at ``t``: those
        beyond the budget, fewer when the protected ones (the most any row and head has) need their slots."""
        n_compact = compact.sum(-1)
        excess = (positions <= t).sum(-1) - self.policy.budget
        n_protected = (protected & compact).sum(-1).amax()
        return (n_compact - torch.maximum(n_compact - excess, n_protected)).clamp(min=0)

    def _free(self, slots: torch.Tensor) -> None:
        """Forget the tokens of ``slots`` ``(batch, heads, capacity)`` bool: later tokens take their slots."""
        self.slot_positions.masked_fill_(slots, FREE)
        if self.token_scores is not None:
            self.token_scores.masked_fill_(slots, 0.0)

    def _folds_at(self, t: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
        """Whether the step of the query at ``t`` (fold point ``fold``) folds tokens: its fold point passed both the
        previous step's and the oldest full-width token after the prompt (where `ThinKLayer._fold` moves any)."""
        before = fold_point(t - 1, self.fold_origin, self.fold_held, self.fold_block)
        return fold > torch.maximum(before, self.first_full)


def _write_slot(buffer: torch.Tensor, slot: torch.Tensor, x: torch.Tensor) -> None:
    """Write one token ``x`` ``(batch, kv_heads, 1, dim)`` into ``buffer`` ``(batch, kv_heads, slots, dim)`` at
    ``slot`` ``(batch, 1 or kv_heads)``, in place."""
    index = slot[:, :, None, None].expand(*x.shape)
    buffer.scatter_(2, index, x)


def _lowest(priority: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` bool: the ``count`` ``(...)`` entries of lowest ``priority`` ``(..., n)`` along the last dimension
    (a sort, not a data-dependent top-k, so that shapes stay static)."""
    order = priority.argsort(dim=-1, stable=True)
    first = torch.arange(priority.shape[-1], device=priority.device) < count[..., None]
    return torch.zeros_like(first.expand_as(priority)).scatter(-1, order, first.expand_as(priority))


def static_attention(
    layer: StaticThinKLayer,
    query: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of one new token over a static layer, ``(batch, 1, q_heads, v_dim)``; see the module docstring.

    ``query`` ``(batch, q_heads, 1, head_dim)``; ``mask`` ``(batch | 1, 1, 1, width)`` over logical positions (True or
    0.0 where the query may attend), or None; ``softcap``: the model's attention logit cap (`cap_logits`), or None.
    Static shapes only: lengths and positions are tensors, and which
    tokens are seen thinned is decided by masks built from them.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = layer.compact_keys.shape[1]
    rows = q_heads // kv_heads * q_len
    q = query.reshape(batch, kv_heads, rows, head_dim)
    t = layer.length - 1  # the query's logical position
    fold = fold_point(t, layer.fold_origin, layer.fold_held, layer.fold_block)

    # kept channels of every slot
    logits = torch.matmul(gather_channels(q, layer.key_channels), layer.compact_keys.transpose(-1, -2)).float()
    # the pruned channels of the tokens seen at full width (the ring's, from the fold point on), added at their slots
    ring = layer.ring_keys.shape[2]
    ring_positions = t - torch.remainder(t - torch.arange(ring, device=query.device), ring)
    at_full_width = ring_positions >= fold
    ring_slots = layer.ring_slots[:, :, None, :].expand(batch, kv_heads, rows, ring)
    extra = torch.matmul(gather_channels(q, layer.pruned_key_channels), layer.ring_keys.transpose(-1, -2)).float()
    logits = cap_logits(logits.scatter_add(-1, ring_slots, extra * at_full_width).mul_(scaling), softcap)

    positions = layer.slot_positions.long()  # (batch, 1 | kv_heads, capacity)
    visible = (positions <= t)[:, :, None, :]
    mask = as_bool_mask(mask)
    if mask is not None:  # padding, gathered at each slot's position
        width = mask.shape[-1]
        index = positions.clamp(max=width - 1)[:, :, None, :]
        mask = mask[:, :1].expand(batch, positions.shape[1], q_len, width)
        visible = visible & mask.gather(-1, index.expand(-1, -1, q_len, -1))
    # a finite minimum, not -inf: a fully masked (padded) row then gives a uniform softmax instead of NaN
    probs = torch.softmax(logits.masked_fill(~visible, torch.finfo(logits.dtype).min), dim=-1)
    # a policy that accumulates attention (H2O) gets each slot's weight, summed over its group's queries
    layer.after_attention(mask, probs.sum(dim=2) if layer.token_scores is not None else None)

    values = layer.compact_values
    out = torch.matmul(probs.to(values.dtype), values)
    if layer.ring_values is not None:  # pruned value channels: kept ones from every slot, pruned from the ring's
        ring_probs = probs.gather(-1, ring_slots) * at_full_width
        pruned = torch.matmul(ring_probs.to(values.dtype), layer.ring_values)
        out = scatter_channels(out, layer.value_channels, values.shape[-1] + pruned.shape[-1])
        index = layer.pruned_value_channels.long()[:, :, None, :].expand_as(pruned)
        out = out.scatter(-1, index, pruned)
    return out.view(batch, q_heads, q_len, out.shape[-1]).transpose(1, 2)
