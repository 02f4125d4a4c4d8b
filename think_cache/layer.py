"""Per-layer storage of a ThinK cache, in the style of transformers' ``DynamicLayer``.

A `ThinKLayer` stores one attention layer's keys and values in two parts:

* the **recent** part, ``keys``/``values`` ``(batch, kv_heads, n_recent, head_dim)``: the newest tokens at full
  width. Before the layer is compacted it holds every token.
* the **compact** part, ``compact_keys`` ``(batch, kv_heads, n_compact, kept_k)`` with ``key_channels``
  ``(batch, kv_heads, kept_k)`` (int16) saying which channels are kept, per batch row and KV head; and
  ``compact_values``, full width unless value channels are pruned too (``value_channels``).

With a token `Policy`, the compact part also holds ``compact_positions`` ``(batch, kv_heads, n_compact)`` int32:
the logical position of each kept token, which may differ per head (eviction is per head); masks are gathered at
those positions. Policies that accumulate attention (H2O) keep ``token_scores`` for every stored token.

Tokens are in logical order: compact part first, then the recent part, whose tokens are always the newest
``n_recent`` logical positions. The layer is *compacted* at the end of the first forward that leaves it with
more than ``recent`` tokens (or more than a policy's budget): the attention, which alone sees the queries, hands
it the forward's queries; the policy picks the tokens, the channels are chosen once on those tokens, and from
then on the tokens that leave the recent part are moved into the compact part with those channels, a block of
`FOLD_BLOCK` at a time (a token at a time under a policy that evicts while decoding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from .compact import as_bool_mask, causal_mask, gather_channels, key_padding
from .policies import Policy, top_tokens
from .scoring import (
    channel_index_dtype,
    kept_channel_count,
    key_channel_scores,
    select_channels,
    value_channel_scores,
)

__all__ = ["ThinKLayer", "ThinKSlidingLayer", "LayerStats", "gather_tokens", "storage_bytes"]

# Every tensor a layer holds whose first dimension is the batch.
_ROW_TENSORS = (
    "keys",
    "values",
    "compact_keys",
    "compact_values",
    "key_channels",
    "value_channels",
    "compact_positions",
    "token_scores",
    "window_queries",
)

#: Once compacted, the recent part folds into the compact part when it reaches ``recent + FOLD_BLOCK`` tokens,
#: all but the newest ``recent`` at once. Appending to the compact part copies it, so folding a block at a time
#: instead of a token a step keeps that copy off most decoding steps (transformers' DynamicCache copies its whole
#: cache every step). The full-width part holds between ``recent`` and ``recent + FOLD_BLOCK - 1`` tokens.
FOLD_BLOCK = 32


@dataclass(frozen=True)
class LayerStats:
    """What one layer holds. Bytes are those of the tensors' storages, measured, not computed from shapes."""

    layer_idx: int
    tokens: int
    stored_tokens: int
    compact_tokens: int
    head_dim: int
    key_channels: int
    value_channels: int
    stored_bytes: int
    dense_bytes: int

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0


def storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view holding a larger buffer counts it whole)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keep tokens per (batch, head): ``x (B, H, T, D)``, ``index (B, H, K)`` -> ``(B, H, K, D)``."""
    return torch.gather(x, 2, index.long()[..., None].expand(*index.shape, x.shape[-1]))


class ThinKLayer(CacheLayerMixin):
    """One full-attention layer of a `ThinKCache`. See the module docstring for the layout."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, key_ratio: float, value_ratio: float, window: int, recent: int, policy: Policy | None):
        # the settings come from ThinKCache, which validates them and holds their defaults
        super().__init__()
        self.key_ratio = key_ratio
        self.value_ratio = value_ratio
        self.window = window
        self.recent = recent
        self.policy = policy
        # a policy that evicts every step gathers the compact part every step anyway: fold as it goes
        self.fold_block = 1 if policy is not None and policy.evicts_while_decoding else FOLD_BLOCK
        self.reset()

    def __repr__(self) -> str:
        state = "compacted" if self.is_compacted else "full"
        return f"{type(self).__name__}(tokens={self.seen_tokens}, stored={self.stored_tokens}, {state})"

    # ----------------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Drop everything; the layer starts again from its first `update`."""
        for name in _ROW_TENSORS:
            setattr(self, name, None)
        self.seen_tokens = 0
        self.is_initialized = False

    @property
    def prunes(self) -> bool:
        """Whether this layer ever compacts (a ratio above zero, or a token policy)."""
        return self.key_ratio > 0 or self.value_ratio > 0 or self.policy is not None

    @property
    def is_compacted(self) -> bool:
        """Whether the channels were chosen and older tokens live in the compact part."""
        return self.key_channels is not None

    @property
    def stored_tokens(self) -> int:
        compact = 0 if self.compact_keys is None else self.compact_keys.shape[-2]
        recent = 0 if self.keys is None else self.keys.shape[-2]
        return compact + recent

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the layer holds."""
        for name in _ROW_TENSORS:
            t = getattr(self, name)
            if t is not None:
                yield t

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in _ROW_TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    # ---------------------------------------------------------------------------------------- cache API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, head_dim = key_states.shape
        self.head_dim = head_dim
        self.keys = key_states.new_empty(batch, heads, 0, head_dim)
        v = key_states if value_states is None else value_states
        self.values = v.new_empty(batch, heads, 0, v.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens to the recent part; once compacted, fold the overflow into the compact part.

        Returns the recent part's keys and values: the ThinK attention reads the compact part from the layer.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen_tokens += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.token_scores is not None:
            new = self.token_scores.new_zeros(*key_states.shape[:3])
            self.token_scores = torch.cat([self.token_scores, new], dim=-1)
        if self.is_compacted and self.keys.shape[-2] >= self.recent + self.fold_block:
            self._fold(self.keys.shape[-2] - self.recent)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens seen (the logical length), which is what position ids and masks are built from."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # masks span logical positions; after eviction `attention_mask` gathers the kept ones
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5
        return self.get_max_length()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest ``-tokens_to_remove`` tokens (a non-positive count, as in transformers 5.x).

        Only the full-width recent part can be cut: pruned channels and evicted tokens cannot be restored.
        """
        count = -tokens_to_remove
        if count <= 0 or not self.is_initialized:
            return
        if self.is_compacted and count > self.keys.shape[-2]:
            raise ValueError(
                f"ThinKCache cannot crop {count} tokens: only the newest {self.keys.shape[-2]} tokens are stored at "
                f"full width and older ones were pruned to {self.key_channels.shape[-1]} of {self.head_dim} key "
                "channels. Crop fewer tokens, or build the cache with a larger `recent`."
            )
        self.keys = self.keys[:, :, :-count].clone()
        self.values = self.values[:, :, :-count].clone()
        if self.token_scores is not None:
            self.token_scores = self.token_scores[..., :-count].clone()
        self.seen_tokens -= count

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_tensors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_tensors(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_tensors(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        if self.is_initialized:
            self._map_tensors(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            self._map_tensors(lambda t: t.to(self.device, non_blocking=True))

    # ------------------------------------------------------------------------------------ ThinK proper
    def after_attention(
        self,
        query: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        token_weights: torch.Tensor | None = None,
    ) -> None:
        """Called by the ThinK attention at the end of every forward through this layer.

        Before compaction it remembers the window's queries and compacts when due (`observe`); ``mask`` is that
        forward's attention mask, which tells padded keys apart. Once compacted, a policy that evicts while
        decoding gets the step's attention weights (``token_weights``, ``(batch, kv_heads, stored)``) and the
        layer is brought back within the policy's budget.
        """
        if not self.prunes:
            return
        if not self.is_compacted:
            real_keys = key_padding(mask, query.shape[0], self.keys.shape[-2], query.device)
            self.observe(query, real_keys, scaling)
            return
        if self.token_scores is not None and token_weights is not None:
            self.token_scores += token_weights
        if self.policy is not None and self.policy.evicts_while_decoding:
            self._evict(mask)

    def observe(self, query: torch.Tensor, real_keys: torch.Tensor, scaling: float) -> None:
        """Remember the observation window's queries; compact once the layer holds more than ``recent`` tokens
        (or more than a policy's budget).

        Parameters
        ----------
        query:
            ``(batch, q_heads, q_len, head_dim)``, this forward's queries (the last ``q_len`` stored tokens).
        real_keys:
            ``(batch, stored_tokens)`` bool, False at padded positions.
        scaling:
            The attention scale, for value-channel and token scores.
        """
        batch, q_heads, q_len, head_dim = query.shape
        kv_heads = self.keys.shape[1]
        stored = self.keys.shape[-2]
        w = min(self.window, q_len)
        real_queries = real_keys[:, stored - w :]  # query i is stored token stored - q_len + i
        q = query[:, :, q_len - w :] * real_queries[:, None, :, None].to(query.dtype)
        q = q.reshape(batch, kv_heads, q_heads // kv_heads, w, head_dim)
        if self.window_queries is not None:
            q = torch.cat([self.window_queries, q], dim=3)[:, :, :, -self.window :]
        self.window_queries = q.contiguous()
        budget = None if self.policy is None else self.policy.budget
        if stored > self.recent or (budget is not None and stored > budget):
            self.compact(real_keys, scaling, query)

    def compact(self, real_keys: torch.Tensor, scaling: float, query: torch.Tensor | None = None) -> None:
        """Pick the tokens (with a policy), choose the kept channels from the remembered window on those tokens,
        and move all but the recent tokens into the compact part.

        ``query`` is the current forward's queries; a policy scores the prompt's tokens with them.
        """
        keys, values, real = self.keys, self.values, real_keys
        positions = None
        if self.policy is not None:
            keys, values, real, positions = self._select_prompt_tokens(query, real_keys, scaling)

        batch, kv_heads, group, w, head_dim = self.window_queries.shape
        queries = self.window_queries.reshape(batch, kv_heads, group * w, head_dim)
        index_dtype = channel_index_dtype(head_dim)
        scores = key_channel_scores(queries, keys, real)
        self.key_channels = select_channels(scores, kept_channel_count(head_dim, self.key_ratio)).to(index_dtype)
        if self.value_ratio > 0:
            window_mask = self._window_mask(real, positions, group, w)
            scores = value_channel_scores(queries, keys, values, scaling, window_mask)
            kept = kept_channel_count(values.shape[-1], self.value_ratio)
            self.value_channels = select_channels(scores, kept).to(index_dtype)
        self.window_queries = None

        n = max(keys.shape[-2] - self.recent, 0)
        self.compact_keys = gather_channels(keys[:, :, :n], self.key_channels)
        self.compact_values = self._compact_values(values[:, :, :n])
        if positions is not None:
            self.compact_positions = positions[:, :, :n].to(torch.int32)
        # clone: a slice would keep the whole old buffer alive
        self.keys = keys[:, :, n:].clone()
        self.values = values[:, :, n:].clone()

    def _select_prompt_tokens(self, query: torch.Tensor, real_keys: torch.Tensor, scaling: float):
        """Apply the policy to the stored tokens: returns kept keys, values, realness and positions per head."""
        stored = self.keys.shape[-2]
        n_keep = stored if self.policy.budget is None else min(self.policy.budget, stored)
        scores = self.policy.prompt_scores(query, self.keys, real_keys, scaling)
        positions = torch.arange(stored, device=self.keys.device).expand(*self.keys.shape[:2], stored)
        real_at, always, prefer = self._forced(real_keys, positions, stored)
        index = top_tokens(scores, n_keep, always, ~real_at, prefer)
        if self.policy.accumulates_attention:
            self.token_scores = scores.gather(-1, index).contiguous()
        return gather_tokens(self.keys, index), gather_tokens(self.values, index), real_at.gather(-1, index), index

    def _forced(
        self, real_logical: torch.Tensor, positions: torch.Tensor, seen: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens at logical ``positions`` ``(B, H, T)``: whether each is real, whether it must be kept (the
        full-width recent part, whose tokens are the newest ``recent`` by construction), and whether the policy
        prefers it (its sinks and newest tokens). ``real_logical`` is ``(B, seen)``."""
        flags = real_logical[:, None, :].expand(*positions.shape[:2], -1)
        real_at = flags.gather(-1, positions)
        always = positions >= seen - self.recent
        prefer = positions >= seen - self.policy.protected_recent
        if self.policy.sink:
            rank = real_logical.cumsum(-1) - 1
            sinks = real_logical & (rank < self.policy.sink)
            prefer = prefer | sinks[:, None, :].expand_as(flags).gather(-1, positions)
        return real_at, always, prefer & real_at

    def _evict(self, mask: torch.Tensor | None) -> None:
        """Drop the compact tokens the policy scores lowest until the layer is within the policy's budget."""
        excess = self.stored_tokens - self.policy.budget
        n_compact = self.compact_keys.shape[-2]
        if excess <= 0 or n_compact == 0:
            return
        positions = self.compact_positions.long()
        real_logical = key_padding(mask, positions.shape[0], self.seen_tokens, positions.device)
        real_at, always, prefer = self._forced(real_logical, positions, self.seen_tokens)
        accumulated = None if self.token_scores is None else self.token_scores[..., :n_compact]
        scores = self.policy.decode_scores(positions, accumulated)
        keep = top_tokens(scores, max(n_compact - excess, 0), always, ~real_at, prefer)
        self.compact_keys = gather_tokens(self.compact_keys, keep)
        self.compact_values = gather_tokens(self.compact_values, keep)
        self.compact_positions = self.compact_positions.gather(-1, keep)
        if self.token_scores is not None:
            self.token_scores = torch.cat([accumulated.gather(-1, keep), self.token_scores[..., n_compact:]], -1)

    def attention_mask(self, mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
        """The forward's mask over the stored tokens, compact then recent: ``(B, 1 or kv_heads, q_len, stored)``.

        Without eviction the stored tokens are the logical ones and the mask is returned as is; with eviction
        its columns are gathered at each head's kept positions.
        """
        if self.compact_positions is None:
            return mask
        mask = as_bool_mask(mask)
        if mask is None:
            if q_len == 1:
                return None  # a single new token sees every stored token
            mask = causal_mask(q_len, self.seen_tokens, self.keys.device)
        batch, heads, n_compact = self.compact_positions.shape
        full = mask.expand(batch, heads, q_len, mask.shape[-1])
        index = self.compact_positions.long()[:, :, None, :].expand(batch, heads, q_len, n_compact)
        return torch.cat([full.gather(-1, index), full[..., mask.shape[-1] - self.keys.shape[-2] :]], dim=-1)

    def _window_mask(self, real: torch.Tensor, positions: torch.Tensor | None, group: int, w: int) -> torch.Tensor:
        """``(batch, 1 or heads, group * w, tokens)``: which tokens each remembered window query may attend.

        ``real`` is ``(B, T)`` or per head ``(B, H, T)``; ``positions`` the tokens' logical positions per head, or
        None when they are ``0..T-1``.
        """
        seen = self.seen_tokens
        if positions is None:
            positions = torch.arange(real.shape[-1], device=real.device)[None, None]
        if real.dim() == 2:
            real = real[:, None]
        q_pos = torch.arange(seen - w, seen, device=real.device)
        causal = positions[..., None, :] <= q_pos[:, None]  # (B|1, H|1, w, T)
        mask = (causal & real[..., None, :])[:, :, None]  # (B, H, 1, w, T)
        mask = mask.expand(-1, -1, group, -1, -1)
        return mask.reshape(mask.shape[0], mask.shape[1], group * w, mask.shape[-1])

    def _compact_values(self, values: torch.Tensor) -> torch.Tensor:
        return values.clone() if self.value_channels is None else gather_channels(values, self.value_channels)

    def _fold(self, n: int) -> None:
        """Move the oldest ``n`` tokens of the recent part into the compact part."""
        if n <= 0:
            return
        self.compact_keys = torch.cat(
            [self.compact_keys, gather_channels(self.keys[:, :, :n], self.key_channels)], dim=-2
        )
        self.compact_values = torch.cat([self.compact_values, self._compact_values(self.values[:, :, :n])], dim=-2)
        if self.compact_positions is not None:
            first = self.seen_tokens - self.keys.shape[-2]  # logical position of the oldest recent token
            new = torch.arange(first, first + n, dtype=torch.int32, device=self.keys.device)
            self.compact_positions = torch.cat([self.compact_positions, new.expand(*self.keys.shape[:2], n)], -1)
        # clone: a slice would keep the whole old buffer alive
        self.keys = self.keys[:, :, n:].clone()
        self.values = self.values[:, :, n:].clone()

    def _drop_oldest(self, n: int) -> None:
        """Forget the oldest ``n`` stored tokens (compact part first); only without eviction (same for all heads)."""
        if n <= 0:
            return
        if self.compact_keys is not None:
            from_compact = min(n, self.compact_keys.shape[-2])
            self.compact_keys = self.compact_keys[:, :, from_compact:].clone()
            self.compact_values = self.compact_values[:, :, from_compact:].clone()
            n -= from_compact
        if n > 0:
            self.keys = self.keys[:, :, n:].clone()
            self.values = self.values[:, :, n:].clone()

    # ---------------------------------------------------------------------------------------------- stats
    def dense_tokens(self) -> int:
        """Tokens a transformers ``DynamicCache`` layer would hold after the same inputs."""
        return self.seen_tokens

    def stats(self, layer_idx: int) -> LayerStats:
        """Tokens, channels and bytes held, against a ``DynamicCache`` layer on the same inputs."""
        if not self.is_initialized:
            return LayerStats(layer_idx, 0, 0, 0, 0, 0, 0, 0, 0)
        batch, heads, _, head_dim = self.keys.shape
        v_dim = self.values.shape[-1]
        token_bytes = head_dim * self.keys.element_size() + v_dim * self.values.element_size()
        return LayerStats(
            layer_idx=layer_idx,
            tokens=self.seen_tokens,
            stored_tokens=self.stored_tokens,
            compact_tokens=self.stored_tokens - self.keys.shape[-2],
            head_dim=head_dim,
            key_channels=head_dim if self.key_channels is None else self.key_channels.shape[-1],
            value_channels=v_dim if self.value_channels is None else self.value_channels.shape[-1],
            stored_bytes=storage_bytes(self.tensors()),
            dense_bytes=batch * heads * self.dense_tokens() * token_bytes,
        )


class ThinKSlidingLayer(ThinKLayer):
    """A ThinK layer for sliding-window attention.

    Without a policy it keeps at most ``sliding_window - 1`` past tokens, with the masks and lengths of
    transformers' ``DynamicSlidingWindowLayer``: tokens that leave the window are dropped from the compact part.
    With a policy (eviction is per head, so tokens cannot be dropped by count) it stores like a full layer, the
    sliding mask hides the tokens out of the window, and the policy's budget bounds it.
    """

    is_sliding = True

    def __init__(self, sliding_window: int, **kwargs):
        self.sliding_window = sliding_window
        super().__init__(**kwargs)

    def after_attention(self, query, mask, scaling, token_weights=None) -> None:
        super().after_attention(query, mask, scaling, token_weights)
        if self.policy is None:
            self._drop_oldest(self.stored_tokens - (self.sliding_window - 1))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.policy is not None:
            return super().get_mask_sizes(query_length)
        kv_offset = max(self.seen_tokens - self.sliding_window + 1, 0)
        return min(self.seen_tokens, self.sliding_window - 1) + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        if -tokens_to_remove > 0 and self.seen_tokens >= self.sliding_window:
            raise ValueError(
                "ThinKCache cannot crop a sliding-window layer once its window is full: the older tokens are gone."
            )
        super().crop(tokens_to_remove)

    def dense_tokens(self) -> int:
        return min(self.seen_tokens, self.sliding_window - 1)
