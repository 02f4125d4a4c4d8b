"""Per-layer storage of a ThinK cache, in the style of transformers' ``DynamicLayer``.

A `ThinKLayer` stores one attention layer's keys and values in two parts:

* the **full-width** part, ``keys``/``values`` ``(batch, kv_heads, n_full, head_dim)``: the newest tokens. Before the
  layer is compacted it holds every token.
* the **compact** part, ``store``, a `CompactStore` (`think_cache.storage`): the older tokens at the kept key
  channels, ``key_channels`` ``(batch, kv_heads, kept_k)`` (int16) per batch row and KV head, and their values,
  full width unless value channels are pruned too (``value_channels``). A `FullStore` holds them in the model's
  dtype, a `QuantizedStore` as 2/4/8-bit codes; the layer only says which tokens go in and when.

With a token `Policy`, the layer also holds ``compact_positions`` ``(batch, kv_heads, n_compact)`` int32: the
logical position of each compact token, which may differ per head (eviction is per head); masks are gathered at
those positions. Policies that accumulate attention (H2O) keep ``token_scores`` for every stored token. Both stay
in the layer, not the store: they are token choice and masking in logical positions, which the store does not
know about, and ``token_scores`` spans the full-width part too; the layer moves them with the same index it
gives the store (`_keep_compact`, `_drop_oldest`, `_fold`).

When things happen (the schedule), in logical positions, whatever the way tokens are fed:

* **A forward's own tokens attend to each other at full width.** `update` only appends them; whatever is due
  (folding, dropping tokens that left a sliding window) happens at the start of the *next* `update`, so a
  forward's tokens stay full-width until then and `crop` can remove them exactly (assisted decoding).
* **The layer is compacted at the end of the prompt**, position ``P``: the policy picks the prompt's tokens and the
  channels are chosen from the prompt's last ``window`` queries (remembered across forwards, so a prompt fed in
  chunks is scored like one prefill). ``generate`` tells the cache where its prompt ends (`ThinKCache` is told by
  the patched ``generate``); without that, a single-token forward after a multi-token one marks the end (the
  first decoding step). A plain forward over a document therefore leaves it full-width: copies of the cache can
  then each be compacted at the end of their own question (prefix caching).
* **Generated tokens fold in blocks.** A query at position ``t >= P`` sees every token before ``P - recent +
  FOLD_BLOCK * ((t - P) // FOLD_BLOCK)`` thinned and the later ones at full width: generated tokens wait full-width
  and fold ``FOLD_BLOCK`` at a time. A store with a ``block`` (quantized keys: 32 tokens make whole key blocks of 16,
  or 32 at 8 bits) takes whole blocks only: without a policy the prompt's last ``< block`` tokens stay in the
  full-width part at compaction, and folds take whole blocks; the tokens the schedule thins short of a block wait
  there *thinned*, their pruned channels zeroed in place (`_thin_oldest`), and are quantized when their block
  folds, so every query sees exactly the tokens before its fold point thinned, whatever the store. A policy that
  evicts while decoding (H2O, StreamingLLM) evicts a block at a time as well: it lets the layer grow to ``budget +
  FOLD_BLOCK`` tokens, and in the forward that folds them drops the lowest-scored compact tokens back to the budget.
  When one forward holds several generated positions (assisted decoding verifies drafts in one forward), each query
  row gets exactly the view it would have had one token at a time (`thinned_rows`). A later prompt (a chat's next
  turn) restarts the schedule at its own end and keeps at least its last ``window`` tokens at full width
  (`held_tokens`): its question did not choose the channels.
* **A later prompt sees the earlier prompts' questions whole.** When a prompt ends, the pruned key channels of its
  last ``window`` tokens (its question, where the channels were chosen from) are kept aside (``spare``, a
  few KiB per full-attention layer, for the newest `SPARE_PROMPTS` prompts). The query rows of a later prompt (a
  chat's next turn) see those tokens at full width (`restored`); generated tokens see them thinned, as before.
  Prefilled in one piece with the whole conversation, a later turn's tokens would see every earlier token whole;
  the questions are the part that this keeps affordable (SmolLM2 at key ratio 0.4: second turns right 3 of 12
  without, 11 of 12 with; see README).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import CacheLayerMixin

from .compact import (
    Restored,
    as_bool_mask,
    causal_mask,
    gather_channels,
    gather_tokens,
    kept_channel_mask,
    key_padding,
    pruned_channels,
)
from .policies import Policy, checked_scores, top_tokens, window_attention
from .scoring import (
    channel_index_dtype,
    kept_channel_count,
    key_channel_scores,
    select_channels,
    value_channel_scores,
)
from .storage import CompactStore, FullStore, SpareKeys, WaitingPrompt

__all__ = [
    "ThinKLayer",
    "ThinKSlidingLayer",
    "LayerStats",
    "gather_tokens",
    "storage_bytes",
    "fold_point",
    "FOLD_BLOCK",
]

# Every tensor a layer holds itself whose first dimension is the batch (the store holds the compact part's).
_ROW_TENSORS = (
    "keys",
    "values",
    "compact_positions",
    "token_scores",
    "window_queries",
    "real_keys",
)

#: Generated tokens fold into the compact part this many at a time. Appending to the compact part copies it, so
#: folding a block at a time instead of a token a step keeps that copy off most decoding steps (transformers'
#: DynamicCache copies its whole cache every step). Between forwards the full-width part holds ``recent`` tokens
#: plus 1 to ``FOLD_BLOCK`` generated ones.
FOLD_BLOCK = 32

#: A prompt fed in chunks (``generate(..., prefill_chunk_size=C)``) under a policy with a budget waits at full width
#: while it holds at most this many times the budget; past that, its earlier chunks wait as 8-bit codes
#: (`ThinKLayer.wait_coded`), so that chunking takes less memory than one prefill, not more.
CHUNKED_PROMPT_HOLD = 2

#: A layer keeps the pruned key channels of the last ``window`` tokens of this many prompts, the newest ones
#: (`ThinKLayer.restored`): a chat's later turns see the recent questions whole, and a long agent loop stays bounded.
SPARE_PROMPTS = 8


@dataclass(frozen=True)
class LayerStats:
    """What one layer holds. ``stored_bytes`` is measured: the bytes of the storages behind the layer's tensors.
    ``dense_bytes`` and ``static_bytes`` are computed from token counts: what transformers' DynamicCache and
    StaticCache layers hold for them (within a token of a sliding layer's buffer and a few bytes of bookkeeping)."""

    layer_idx: int
    tokens: int
    stored_tokens: int
    compact_tokens: int
    head_dim: int
    key_channels: int
    value_channels: int
    stored_bytes: int
    dense_bytes: int
    bits: int | None = None  # code width of the compact part (None: the model's dtype)
    #: Bytes a transformers ``StaticCache`` layer of the same ``max_cache_len`` would hold (None: a layer that grows).
    static_bytes: int | None = None

    @property
    def ratio(self) -> float:
        """``stored_bytes / dense_bytes`` (1.0 for an empty layer)."""
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0


def storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view holding a larger buffer counts it whole)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _takes_keyword(function: Callable, name: str) -> bool:
    """Whether ``function`` accepts the keyword argument ``name`` (by name or through ``**kwargs``): a policy written
    without a ``softcap`` parameter is called without it."""
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def fold_point(t, origin, held: int, fold_block: int):
    """The schedule: a query at logical position ``t`` sees the tokens before this position thinned, when the
    prompt ended at ``origin`` and its last ``held`` tokens wait at full width with the generated ones (ints, or
    0-d tensors in a compiled step)."""
    return origin - held + fold_block * ((t - origin) // fold_block)


def without_padding_ranges(keys: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``keys (batch, kv_heads, tokens, head_dim)`` with each padded token (``real (batch, 1 or kv_heads, tokens)``
    False) given the keys of its row's last real token. Padding is masked, so no attention output changes; a
    quantizing store then fits no key block's range to it when the prompt's last tokens, waiting at full width,
    fold with the first generated ones (README: padding never sets a range). A row with no real token stays."""
    if bool(real.all()):
        return keys
    real = real.expand(keys.shape[:3])
    last = (torch.arange(keys.shape[2], device=keys.device) * real).argmax(dim=-1, keepdim=True)
    source = keys.gather(2, last[..., None].expand(*last.shape, keys.shape[-1]))
    replace_at = ~real & real.any(dim=-1, keepdim=True)
    return torch.where(replace_at[..., None], source, keys)


def compacts(key_ratio: float, value_ratio: float, policy: Policy | None, bits: int | None) -> bool:
    """Whether a layer of these settings ever compacts: a ratio above zero, a token policy, or quantized storage
    (with ``key_ratio=0`` and ``bits`` set every channel is kept and the tokens are still stored as codes). Without
    any, it holds its tokens as ``DynamicCache`` does."""
    return key_ratio > 0 or value_ratio > 0 or policy is not None or bits is not None


class ThinKLayer(CacheLayerMixin):
    """One full-attention layer of a `ThinKCache`. See the module docstring for the layout and the schedule."""

    is_compileable = False
    is_sliding = False
    #: Whether the layer keeps the pruned channels of each prompt's question aside for later prompts (`restored`).
    keeps_spare = True
    #: Whether a long prompt fed in chunks under a budget waits as 8-bit codes (`wait_coded`).
    codes_chunked_prompt = True

    def __init__(
        self,
        key_ratio: float,
        value_ratio: float,
        window: int,
        recent: int,
        policy: Policy | None,
        store: CompactStore | None = None,
    ):
        # the settings come from ThinKCache, which validates them and holds their defaults
        super().__init__()
        self.key_ratio = key_ratio
        self.value_ratio = value_ratio
        self.window = window
        self.recent = recent
        self.policy = policy
        self.store = FullStore() if store is None else store
        # a policy that evicts while decoding does it a fold block at a time too (`_evict`): one gather of the
        # compact part every `fold_block` steps instead of a fold and a gather every step
        self.fold_block = max(self.store.block, FOLD_BLOCK)
        # the queries remembered for the end of the prompt: ThinK's window and the policy's, whichever is longer
        self.query_rows = max(window, 0 if policy is None else policy.observation_window)
        #: logical start and end of the current prompt, when `generate` told the cache (None: not known)
        self.prompt_start: int = 0
        self.prompt_end: int | None = None
        self.reset()

    def __repr__(self) -> str:
        state = "compacted" if self.is_compacted else "full"
        return f"{type(self).__name__}(tokens={self.seen_tokens}, stored={self.stored_tokens}, {state})"

    # ----------------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Drop everything; the layer starts again from its first `update`."""
        for name in _ROW_TENSORS:
            setattr(self, name, None)
        self.store.clear()
        self.seen_tokens = 0
        self.origin: int | None = None  # logical end of the last prompt: where the fold schedule counts from
        self.compacted_at: int | None = None  # logical end of the prompt the layer was compacted at
        self.real_keys: torch.Tensor | None = None  # (batch, stored) before compaction: False at padding
        self.scaling = 1.0
        self.softcap: float | None = None  # the model's attention logit cap (Gemma 2), None for none
        self.forward_tokens = 0  # tokens of the last forward
        self.spare: SpareKeys | None = None  # the questions' pruned key channels (`_keep_spare`)
        self.spare_positions: list[int] = []  # logical positions of the tokens in `spare`
        self.folded = False  # tokens were folded since the policy last evicted
        self.thinned_full = 0  # the oldest full-width tokens seen thinned in place (`_thin_oldest`)
        self.waiting: WaitingPrompt | None = None  # a chunked prompt's earlier chunks, before compaction
        self.is_initialized = False

    @property
    def evicts_while_decoding(self) -> bool:
        """Whether the layer's policy evicts tokens while decoding too (H2O, StreamingLLM), not only at the prompt."""
        return self.policy is not None and self.policy.evicts_while_decoding

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can undo the newest forward exactly (not after a policy evicted during it)."""
        return not self.evicts_while_decoding

    @property
    def prunes(self) -> bool:
        """Whether this layer ever compacts (`compacts`)."""
        return compacts(self.key_ratio, self.value_ratio, self.policy, self.store.bits)

    @property
    def is_compacted(self) -> bool:
        """Whether the channels were chosen and older tokens live in the compact part."""
        return self.key_channels is not None

    @property
    def key_channels(self) -> torch.Tensor | None:
        """``(batch, kv_heads, kept_k)``: the kept key channels (None before compaction)."""
        return self.store.key_channels

    @property
    def value_channels(self) -> torch.Tensor | None:
        """``(batch, kv_heads, kept_v)``: the kept value channels (None: every channel)."""
        return self.store.value_channels

    @property
    def compact_tokens(self) -> int:
        """Tokens in the compact part (thinned; codes in a quantized store)."""
        return self.store.tokens

    @property
    def waiting_tokens(self) -> int:
        """A chunked prompt's earlier tokens waiting as codes for its end (`wait_coded`)."""
        return 0 if self.waiting is None else self.waiting.tokens

    @property
    def stored_tokens(self) -> int:
        """Tokens held: compact, waiting and full-width (fewer than seen after eviction or a sliding window)."""
        return self.compact_tokens + self.waiting_tokens + (0 if self.keys is None else self.keys.shape[-2])

    @property
    def full_from(self) -> int:
        """Logical position of the oldest full-width token (or of the oldest token waiting as codes)."""
        return self.seen_tokens - self.keys.shape[-2] - self.waiting_tokens

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the layer holds, its store's included."""
        for name in _ROW_TENSORS:
            t = getattr(self, name)
            if t is not None:
                yield t
        yield from self.store.tensors()
        for part in (self.waiting, self.spare):
            if part is not None:
                yield from part.tensors()

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in _ROW_TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self.store.map(fn)
        for part in (self.waiting, self.spare):
            if part is not None:
                part.map(fn)

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
        """Do what the schedule says is due before this forward, then append its tokens at full width.

        Returns the full-width part's keys and values: the ThinK attention reads the compact part from the layer.
        Before compaction, the tokens of a chunked prompt waiting as codes come first, dequantized (`wait_coded`).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._before_forward(self.seen_tokens, n)
        self.seen_tokens += n
        self.forward_tokens = n
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.token_scores is not None:
            new = self.token_scores.new_zeros(*key_states.shape[:3])
            self.token_scores = torch.cat([self.token_scores, new], dim=-1)
        return self._with_waiting()

    def get_seq_length(self) -> int:
        """Tokens seen (the logical length), which is what position ids and masks are built from."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The mask's length and offset for a forward of ``query_length`` tokens: masks span logical positions
        (after eviction `attention_mask` gathers the kept ones)."""
        return self.seen_tokens + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5
        """`get_max_length` under transformers 4.x's name."""
        return self.get_max_length()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest ``-tokens_to_remove`` tokens (a non-positive count, as in transformers 5.x).

        Exact for the tokens still whole at full width, which always include the newest forward's: pruned channels
        (also those of the tokens thinned in place, `_thin_oldest`) and evicted tokens cannot be restored.
        """
        count = -tokens_to_remove
        if count <= 0 or not self.is_initialized:
            return
        if not self.is_croppable:
            raise ValueError(
                f"ThinKCache cannot crop under {type(self.policy).__name__}: the policy evicts tokens while "
                f"decoding (a block of {FOLD_BLOCK} at a time), and evicted tokens cannot be restored, so assisted "
                "decoding and other rollbacks would not be exact. Use no policy or SnapKV for assisted decoding."
            )
        whole = self.keys.shape[-2] - self.thinned_full  # the oldest full-width tokens may be thinned in place
        if count > whole:
            if not self.is_compacted:
                older = "older ones of this prompt wait as 8-bit codes for its end"
            else:
                how = [f"{self.key_channels.shape[-1]} of {self.head_dim} key channels"]
                if self.store.bits is not None:
                    how.append(f"{self.store.bits}-bit codes")
                older = f"older ones were folded into the compact part ({', '.join(how)})"
            raise ValueError(
                f"ThinKCache cannot crop {count} tokens: only the newest {whole} tokens are stored at full width "
                f"and {older}. Crop at most the tokens of the newest forward."
            )
        self.keys = self.keys[:, :, :-count].clone()
        self.values = self.values[:, :, :-count].clone()
        if self.token_scores is not None:
            self.token_scores = self.token_scores[..., :-count].clone()
        if self.window_queries is not None:  # forget the queries of the removed tokens
            keep = max(self.window_queries.shape[3] - count, 0)
            self.window_queries = self.window_queries[:, :, :, :keep].clone()
        self.seen_tokens -= count
        self.forward_tokens = max(self.forward_tokens - count, 0)
        self._retain_spare([p < self.seen_tokens for p in self.spare_positions])  # forget questions cut off

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_tensors(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows at ``indices`` (contrastive search)."""
        self._map_tensors(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (contrastive search)."""
        self._map_tensors(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        if self.is_initialized:
            self._map_tensors(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized and self.keys.device != self.device:
            self._map_tensors(lambda t: t.to(self.device, non_blocking=True))

    # -------------------------------------------------------------------------------------------- schedule
    def _ended_prompt(self, t0: int, n: int) -> int | None:
        """The end of a prompt that lies at or before ``t0``, the first position of a forward of ``n`` tokens, if
        this forward starts generating after it; None while a prompt may still go on."""
        if self.prompt_end is not None:
            return self.prompt_end if self.prompt_end <= t0 else None
        if n == 1 and t0 > 0 and (self.forward_tokens > 1 or not self.is_compacted):
            return t0  # the first single-token forward after a prompt: decoding has begun
        return None

    def fold_point(self, t: int, origin: int | None = None) -> int:
        """Logical position before which a query at ``t`` sees tokens thinned, for a prompt that ended at ``origin``
        (default: the latest one; ``t`` at or after it)."""
        origin = self.origin if origin is None else origin
        return fold_point(t, origin, self.held_tokens(origin), self.fold_block)

    def held_tokens(self, origin: int) -> int:
        """How many of a prompt's last tokens wait at full width with the generated ones, for the prompt that ended
        at ``origin``: ``recent`` for the prompt the layer was compacted at, at least ``window`` for a later one (a
        chat's next turn). A later prompt's question did not choose the channels; thinned by channels chosen for
        an earlier question, SmolLM2 answered the earlier question again (0 of 12 second turns right at 0.4)."""
        if origin == self.compacted_at:
            return self.recent
        return max(self.recent, self.window)

    def _before_forward(self, t0: int, n: int) -> None:
        """What is due before a forward whose first token is at logical position ``t0``: compacting an ended
        prompt, folding generated tokens, dropping tokens no later query can see."""
        end = self._ended_prompt(t0, n)
        if not self.is_compacted:
            self._trim(t0)
            if end is not None and self.prunes and self.keys.shape[-2] + self.waiting_tokens > 0:
                self.compact(end)
        elif end is not None and end > self.origin:
            self.origin = end  # a new prompt (a chat's next turn) restarts the schedule at its end
            first = max(end - self.window, self.full_from + self.thinned_full)  # its question's tokens still whole
            self._keep_spare(self.keys[:, :, first - self.full_from : end - self.full_from], first)
        if self.is_compacted:
            fold_at = t0
            if self.prompt_end is not None and self.prompt_start < t0 < self.prompt_end:
                fold_at = self.prompt_start  # a later chunk of the same prompt: its tokens keep seeing each other
            self._fold(self.fold_point(fold_at) - self.full_from)
            self._trim(t0)

    def _trim(self, t0: int) -> None:
        """Drop tokens that no query from ``t0`` on can see (sliding-window layers)."""

    def wait_coded(self) -> None:
        """Called by the ThinK attention after a prompt forward's attention, while the prompt goes on after it (a
        chunk; ``generate`` tells the layer where the prompt ends). Under a policy with a budget, once the layer
        holds more than `CHUNKED_PROMPT_HOLD` times the budget, its full-width tokens join the earlier chunks
        waiting as 8-bit codes (`storage.WaitingPrompt`): only the chunk in flight is at full width, in the layer
        it is in.

        Why: in one prefill the policy keeps its budget as soon as each layer has seen the prompt; fed in chunks, it
        can choose only at the prompt's end, from every token. Held whole at full width until then, the prompt made
        chunking cost memory instead of saving it (SnapKV(512) on SmolLM2 at 2k: 113 MiB peak in ``generate`` with
        chunks of 32, 80 MiB in one prefill). The later chunks attend to the codes dequantized, and the end of the
        prompt chooses from them (`compact`): close to one prefill (8 bits a number), not equal to it, once the
        codes start; a prompt within the hold gives exactly what one prefill gives."""
        policy = self.policy
        if not self.codes_chunked_prompt or policy is None or policy.budget is None or not self.prunes:
            return
        if self.prompt_end is None or self.seen_tokens >= self.prompt_end:
            return
        if self.stored_tokens <= CHUNKED_PROMPT_HOLD * policy.budget or self.keys.shape[-2] == 0:
            return
        if self.waiting is None:
            self.waiting = WaitingPrompt()
        self.waiting.append(self.keys, self.values)
        self.keys = self.keys[:, :, :0].clone()  # clone: a slice would keep the whole old buffer alive
        self.values = self.values[:, :, :0].clone()

    def _with_waiting(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the tokens waiting as codes, dequantized, then of the full-width ones (just the
        full-width ones when none wait)."""
        if self.waiting is None:
            return self.keys, self.values
        keys, values = self.waiting.dequantized(self.dtype)
        return torch.cat([keys, self.keys], dim=-2), torch.cat([values, self.values], dim=-2)

    def _restore_waiting(self) -> None:
        """Put the tokens waiting as codes back before the full-width ones, dequantized (the end of the prompt)."""
        self.keys, self.values = self._with_waiting()
        self.waiting = None

    def thinned_rows(self, q_len: int) -> list[int] | None:
        """For the current forward's query rows: how many of the oldest full-width tokens each row must see thinned
        (the view it would have had decoding one token at a time, `think_cache.compact.thinned_views`), 0 for a
        row that sees no more of them thinned than those thinned in place (`_thin_oldest`). None when no row
        does, the usual case."""
        t0 = self.seen_tokens - q_len
        if q_len == 1 or self.prompt_end is None or self.prompt_end >= t0 + q_len or not self.is_compacted:
            return None  # one token, or a forward of prompt tokens: all at full width
        origin = self.prompt_end if self.prompt_end > t0 else self.origin
        counts = []
        for t in range(t0, t0 + q_len):
            count = 0 if t < origin else self.fold_point(t, origin) - self.full_from
            counts.append(count if count > self.thinned_full else 0)
        return counts if any(counts) else None

    def rows_before_end(self, q_len: int) -> int:
        """How many of the current forward's query rows come before the prompt's end when that end lies inside
        this forward (assisted decoding's first forward holds the prompt and the drafts); else ``q_len``."""
        t0 = self.seen_tokens - q_len
        if self.prompt_end is not None and t0 < self.prompt_end < t0 + q_len and self.prunes:
            return self.prompt_end - t0
        return q_len

    def _keep_spare(self, keys: torch.Tensor, first: int) -> None:
        """Keep aside the pruned key channels of ``keys`` (full width, logical positions from ``first``), the end of
        a prompt: its later prompts' rows see them whole (`restored`)."""
        if not self.keeps_spare:
            return
        if self.spare_positions and first <= self.spare_positions[-1]:  # already kept (a short later turn)
            keys = keys[:, :, self.spare_positions[-1] + 1 - first :]
            first = self.spare_positions[-1] + 1
        n, pruned = keys.shape[-2], self.head_dim - self.key_channels.shape[-1]
        if n == 0 or pruned == 0:
            return
        spare = gather_channels(keys, pruned_channels(self.key_channels, self.head_dim))
        bound = SPARE_PROMPTS * self.window
        if self.spare is None:
            self.spare = SpareKeys(spare[:, :, -bound:], coded=self.store.codes_spare)
        else:
            self.spare.append(spare, bound)
        self.spare_positions = (self.spare_positions + list(range(first, first + n)))[-bound:]

    def restored(self, q_len: int, group: int) -> Restored | None:
        """For the current forward's ``q_len`` query rows (of each of a KV head's ``group`` query heads): the thinned
        tokens (compact, or thinned in place by `_thin_oldest`) a later prompt's rows see at full width (the earlier
        prompts' questions, kept aside by `_keep_spare`), or None when no row does (decoding, the usual case). A row
        is a later prompt's when it comes before the prompt end ``generate`` declared; without a declared end, every
        row of a multi-token forward is. The rows are the forward's last ``q_len`` (all of them, but where Gemma 4
        cuts a reusing layer's queries to ``logits_to_keep``)."""
        n_thinned = self.compact_tokens + self.thinned_full  # tokens held thinned: compact, then thinned in place
        if self.spare is None or n_thinned == 0:
            return None
        t0 = self.seen_tokens - q_len
        if self.prompt_end is not None:
            n_rows = min(max(self.prompt_end - t0, 0), q_len)
        else:
            n_rows = q_len if self.forward_tokens > 1 else 0
        if n_rows == 0:
            return None
        spare_keys = self.spare.keys(self.dtype)
        device = spare_keys.device
        batch, kv_heads, n, _ = spare_keys.shape
        positions = torch.tensor(self.spare_positions, device=device)
        if self.compact_positions is None:  # the compact part holds consecutive positions, the oldest dropped
            columns = positions - (self.full_from - self.compact_tokens)
            present = (columns >= 0) & (columns < n_thinned)
            columns, present = columns.expand(batch, kv_heads, n), present.expand(batch, kv_heads, n)
        else:  # per head, ascending positions: find each one, if the policy kept it
            in_place = torch.arange(self.full_from, self.full_from + self.thinned_full, device=device)
            held = torch.cat([self.compact_positions, in_place.to(torch.int32).expand(batch, kv_heads, -1)], -1)
            wanted = positions.to(held.dtype).expand(batch, kv_heads, n).contiguous()
            columns = torch.searchsorted(held, wanted)
            present = (columns < n_thinned) & (held.gather(-1, columns.clamp(max=n_thinned - 1)) == wanted)
        rows = (torch.arange(q_len, device=device) < n_rows).repeat(group)
        return Restored(
            keys=spare_keys,
            channels=pruned_channels(self.key_channels, self.head_dim),
            columns=columns.clamp(0, n_thinned - 1),
            present=present,
            rows=rows,
        )

    # ------------------------------------------------------------------------------------ ThinK proper
    @property
    def accumulates_prompt_attention(self) -> bool:
        """Whether `observe` adds the prompt's attention weights to each token's score (H2O)."""
        return self.prunes and self.policy is not None and self.policy.accumulates_attention

    def observe(
        self,
        query: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        upto: int | None = None,
        token_weights: torch.Tensor | None = None,
        softcap: float | None = None,
        keys: torch.Tensor | None = None,
    ) -> None:
        """Remember what the end of the prompt will need from an uncompacted forward.

        ``query`` ``(batch, q_heads, rows, head_dim)`` holds the queries of the logical positions just before
        ``upto`` (default: the layer's end); ``mask`` is their attention mask over the stored tokens before
        ``upto``, which tells padded keys and queries apart; ``scaling`` and ``softcap`` turn the model's query-key
        products into its attention logits. Keeps the last ``query_rows`` queries (padded rows zeroed) and, for a
        policy that accumulates attention (H2O), adds each stored token's attention weight: ``token_weights`` when
        the attention already summed them (`policies.attention_and_token_weights`), else
        `policies.window_attention` computes them over ``keys``, the stored keys `update` returned (default: the
        full-width part).
        """
        if not self.prunes:
            return
        batch, q_heads, rows, head_dim = query.shape
        keys = self.keys if keys is None else keys
        kv_heads = keys.shape[1]
        stored = keys.shape[-2] - (0 if upto is None else self.seen_tokens - upto)
        real_keys = key_padding(mask, batch, stored, query.device)
        real_rows = real_keys[:, stored - rows :]  # query i is stored token stored - rows + i
        if self.accumulates_prompt_attention:
            if self.token_scores is None:
                self.token_scores = query.new_zeros(batch, kv_heads, keys.shape[-2], dtype=torch.float32)
            if token_weights is None:
                token_weights = window_attention(query, keys[:, :, :stored], real_keys, scaling, softcap=softcap)
            self.token_scores[..., :stored] += token_weights
        w = min(self.query_rows, rows)
        q = query[:, :, rows - w :] * real_rows[:, None, rows - w :, None].to(query.dtype)
        q = q.reshape(batch, kv_heads, q_heads // kv_heads, w, head_dim)
        if self.window_queries is not None:
            q = torch.cat([self.window_queries, q], dim=3)
        self.window_queries = q[:, :, :, -self.query_rows :].contiguous()
        self.real_keys = real_keys
        self.scaling, self.softcap = scaling, softcap

    def compact(self, end: int | None = None) -> None:
        """End of the prompt at logical position ``end`` (default: every stored token): pick the prompt's tokens
        (with a policy), choose the kept channels from the remembered window on those tokens, and move all but
        the newest ``recent`` prompt tokens into the compact part. Tokens after ``end`` stay at full width."""
        if not self.prunes:
            self._trim(self.seen_tokens if end is None else end)
            return
        if self.is_compacted:
            return
        if self.window_queries is None:
            raise RuntimeError(
                "think_cache: a layer was asked to compact before it saw any query; this is a bug, please report it"
            )
        self._restore_waiting()
        end = self.seen_tokens if end is None else end
        first = self.full_from
        n_prompt = end - first  # stored prompt tokens
        keys, values = self.keys[:, :, :n_prompt], self.values[:, :, :n_prompt]
        after_k, after_v = self.keys[:, :, n_prompt:], self.values[:, :, n_prompt:]
        real = self.real_keys[:, :n_prompt]
        question = self.keys[:, :, max(n_prompt - self.window, 0) : n_prompt]  # before a policy picks tokens
        positions = None
        visible = self._visible_after(end, torch.arange(first, end, device=keys.device))
        if visible is not None:  # tokens out of a sliding window are no query's concern any more
            real = real & visible
        if self.policy is not None:
            keys, values, real, positions = self._select_prompt_tokens(keys, values, real, first, end)

        batch, kv_heads, group, w, head_dim = self.window_queries.shape
        queries = self.window_queries[:, :, :, -self.window :].reshape(batch, kv_heads, -1, head_dim)
        index_dtype = channel_index_dtype(head_dim)
        scores = key_channel_scores(queries, keys, real)
        key_channels = select_channels(scores, kept_channel_count(head_dim, self.key_ratio)).to(index_dtype)
        value_channels = None
        if self.value_ratio > 0:
            w = min(w, self.window)
            window_mask = self._window_mask(real, positions, group, w, end, first)
            scores = value_channel_scores(queries, keys, values, self.scaling, window_mask, self.softcap)
            kept = kept_channel_count(values.shape[-1], self.value_ratio)
            value_channels = select_channels(scores, kept).to(index_dtype)
        self.store.start(key_channels, value_channels)
        self.window_queries = self.real_keys = None
        self.origin = self.compacted_at = end
        self._keep_spare(question, end - question.shape[-2])

        due = max(keys.shape[-2] - self.recent, 0)
        n = due
        if positions is None:  # the same tokens for every head: a partial block can wait, thinned (`_thin_oldest`)
            n = self.store.whole_blocks(due)
            real = real[:, None]
        self.store.append(keys[:, :, :n], values[:, :, :n], real=real[..., :n])
        if positions is not None:
            self.compact_positions = positions[:, :, :n].to(torch.int32)
        waiting = keys[:, :, n:]
        if self.store.bits is not None:  # the prompt's padding that waits here is quantized when its block folds
            waiting = without_padding_ranges(waiting, real[..., n:])
        # clone: a slice would keep the whole old buffer alive
        self.keys = torch.cat([waiting, after_k], dim=-2)
        self.values = torch.cat([values[:, :, n:], after_v], dim=-2)
        self._thin_oldest(due - n)
        self._trim(end)  # what a sliding window hides from every query after the prompt
        if positions is not None:  # a question's tokens the policy dropped in every head need no spare channels
            self._forget_evicted_spare()

    def _select_prompt_tokens(self, keys, values, real_keys, first: int, end: int):
        """Apply the policy to the prompt's stored tokens (logical positions ``first`` to ``end``): returns kept
        keys, values, realness and positions per head."""
        stored = keys.shape[-2]
        positions = torch.arange(first, end, device=keys.device).expand(*keys.shape[:2], stored)
        real_logical = torch.zeros(real_keys.shape[0], end, dtype=torch.bool, device=keys.device)
        real_logical[:, first:] = real_keys
        real_at, always, prefer = self._forced(real_logical, positions, end)
        never = ~real_at
        visible = self._visible_after(end, positions)
        n_keep = stored if self.policy.budget is None else min(self.policy.budget, stored)
        if visible is not None:  # a sliding layer: tokens out of the window are never seen again
            never = never | ~visible
            always = always & visible
            n_keep = min(n_keep, int(visible[0, 0].sum()))
        batch, kv_heads, group, w, head_dim = self.window_queries.shape
        rows = min(w, stored)  # a window longer than the tokens left (a short sliding window) scores what is there
        query = self.window_queries[:, :, :, w - rows :].reshape(batch, kv_heads * group, rows, head_dim)
        extra = {}
        if self.policy.accumulates_attention:
            extra["accumulated"] = self.token_scores[..., :stored]
        if self.softcap is not None and _takes_keyword(self.policy.prompt_scores, "softcap"):
            extra["softcap"] = self.softcap
        scores = self.policy.prompt_scores(query, keys, real_keys, self.scaling, **extra)
        scores = checked_scores(self.policy, "prompt_scores", scores, keys.shape[:3])
        index = top_tokens(scores, n_keep, always, never, prefer)
        if self.policy.accumulates_attention:
            self.token_scores = torch.cat(
                [scores.float().gather(-1, index), self.token_scores[..., stored:]], dim=-1
            ).contiguous()
        return (
            gather_tokens(keys, index),
            gather_tokens(values, index),
            real_at.gather(-1, index),
            positions.gather(-1, index),
        )

    def _visible_after(self, end: int, positions: torch.Tensor) -> torch.Tensor | None:
        """Which tokens a query at ``end`` or later can still see (None: all; sliding layers override)."""
        return None

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

    def after_attention(self, mask: torch.Tensor | None, token_weights: torch.Tensor | None = None) -> None:
        """Called by the ThinK attention at the end of a forward through a compacted layer: a policy that
        accumulates attention gets the forward's weights (``token_weights``, ``(batch, kv_heads, stored)``), and
        one that evicts while decoding brings the layer back within its budget."""
        if self.token_scores is not None and token_weights is not None:
            self.token_scores += token_weights.detach()  # a choice's score: no graph kept from step to step
        if self.evicts_while_decoding:
            self._evict(mask)

    def _evict(self, mask: torch.Tensor | None) -> None:
        """Drop the compact tokens the policy scores lowest, back to the policy's budget, in the forward that
        folded a block: the folded tokens compete with the older ones. Between folds a layer holds at most
        ``budget + fold_block`` tokens after a forward (the documented slack), and the compact part is gathered
        once a block instead of every step."""
        if self.policy.budget is None or not self.folded or self.forward_tokens > 1:
            return  # a multi-token forward (a later prompt) waits: its tokens compete once they fold
        self.folded = False
        excess = self.stored_tokens - self.policy.budget
        n_compact = self.compact_tokens
        if excess <= 0 or n_compact == 0:
            return
        positions = self.compact_positions.long()
        real_logical = key_padding(mask, positions.shape[0], self.seen_tokens, positions.device)
        real_at, always, prefer = self._forced(real_logical, positions, self.seen_tokens)
        accumulated = None if self.token_scores is None else self.token_scores[..., :n_compact]
        scores = checked_scores(
            self.policy, "decode_scores", self.policy.decode_scores(positions, accumulated), positions.shape
        )
        # a block's eviction may exceed what the compact part can spare: the policy's sinks and newest tokens stay
        n_keep = max(n_compact - excess, int((always | prefer).sum(-1).max()))
        keep = top_tokens(scores, n_keep, always, ~real_at, prefer)
        self._keep_compact(keep)
        self._forget_evicted_spare()

    def _forget_evicted_spare(self) -> None:
        """Drop the kept-aside channels of tokens that every head has evicted (a later prompt cannot see them)."""
        if not self.spare_positions:
            return
        positions = torch.tensor(self.spare_positions, device=self.compact_positions.device)
        held = torch.isin(positions, self.compact_positions) | (positions >= self.full_from)
        self._retain_spare(held.tolist())

    def _retain_spare(self, keep: list[bool]) -> None:
        """Keep the kept-aside channels of the questions' tokens where ``keep`` (one flag per spare position)."""
        if all(keep):
            return
        self.spare_positions = [p for p, k in zip(self.spare_positions, keep, strict=True) if k]
        if self.spare_positions:
            self.spare.select(keep)
        else:
            self.spare = None

    def _keep_compact(self, index: torch.Tensor) -> None:
        """Keep the compact tokens at ``index`` ``(B, H, K)`` per head (ascending)."""
        n_compact = self.compact_tokens
        self.store.gather(index)
        self.compact_positions = self.compact_positions.gather(-1, index)
        if self.token_scores is not None:
            kept = self.token_scores[..., :n_compact].gather(-1, index)
            self.token_scores = torch.cat([kept, self.token_scores[..., n_compact:]], -1)

    def attention_mask(self, mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
        """The forward's mask over the stored tokens, compact then full-width: ``(B, 1 or kv_heads, q_len, stored)``.

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

    def _window_mask(
        self, real: torch.Tensor, positions: torch.Tensor | None, group: int, w: int, end: int, first: int
    ) -> torch.Tensor:
        """``(batch, 1 or heads, group * w, tokens)``: which tokens each remembered window query may attend.

        The window's queries are the logical positions ``end - w`` to ``end``. ``real`` is ``(B, T)`` or per head
        ``(B, H, T)``; ``positions`` the tokens' logical positions per head, or None when they are ``first..end``.
        """
        if positions is None:
            positions = torch.arange(first, first + real.shape[-1], device=real.device)[None, None]
        if real.dim() == 2:
            real = real[:, None]
        q_pos = torch.arange(end - w, end, device=real.device)
        causal = positions[..., None, :] <= q_pos[:, None]  # (B|1, H|1, w, T)
        mask = (causal & real[..., None, :])[:, :, None]  # (B, H, 1, w, T)
        mask = mask.expand(-1, -1, group, -1, -1)
        return mask.reshape(mask.shape[0], mask.shape[1], group * w, mask.shape[-1])

    def _fold(self, n: int) -> None:
        """Move the oldest ``n`` full-width tokens into the compact part: whole blocks of the store's, the rest of
        the ``n`` thinned where they are (`_thin_oldest`)."""
        due = max(min(n, self.keys.shape[-2]), 0)  # negative when a later prompt holds tokens before its fold point
        if due == 0:  # most decoding steps
            return
        n = self.store.whole_blocks(due)
        if n > 0:
            self.store.append(self.keys[:, :, :n], self.values[:, :, :n])
            self.folded = True
            if self.compact_positions is not None:
                first = self.full_from
                new = torch.arange(first, first + n, dtype=torch.int32, device=self.keys.device)
                self.compact_positions = torch.cat([self.compact_positions, new.expand(*self.keys.shape[:2], n)], -1)
            # clone: a slice would keep the whole old buffer alive
            self.keys = self.keys[:, :, n:].clone()
            self.values = self.values[:, :, n:].clone()
            self.thinned_full = max(self.thinned_full - n, 0)
        self._thin_oldest(due - n)

    def _thin_oldest(self, n: int) -> None:
        """Make the oldest ``n`` full-width tokens attend as thinned: zero their pruned key channels (and pruned value
        channels), in place.

        A store that takes whole blocks only (`QuantizedStore`) leaves the tokens short of a block that the schedule
        says are thinned at full width until the next fold. Seen whole, a prompt's last tokens (its question) would
        outweigh the thinned context: every other token lost the pruned channels' share of its logits (SmolLM2, ThinK
        0.4 at 8 bits, 2k pass key: "The pass key is a coin that..." where the full-precision compact part answered).
        With those channels zero they give exactly the thinned logits and outputs, in every attention path, for no
        bytes; they are quantized when their block folds. Only the tokens not yet thinned are written."""
        if n <= self.thinned_full:
            return
        start = self.thinned_full
        self.thinned_full = n
        for part, kept in ((self.keys, self.key_channels), (self.values, self.value_channels)):
            if kept is None or kept.shape[-1] == part.shape[-1]:
                continue
            part[:, :, start:n].masked_fill_(~kept_channel_mask(kept, part.shape[-1])[:, :, None, :], 0)

    def _drop_oldest(self, n: int) -> None:
        """Forget the oldest ``n`` stored tokens, compact part first (the same tokens for every head)."""
        if n <= 0:
            return
        n_compact = self.compact_tokens
        if n_compact:
            from_compact = min(n, n_compact)
            self.store.drop_oldest(from_compact)
            if self.compact_positions is not None:
                self.compact_positions = self.compact_positions[..., from_compact:].clone()
            if self.token_scores is not None:
                self.token_scores = self.token_scores[..., from_compact:].clone()
            n -= from_compact
        if n > 0:
            self.keys = self.keys[:, :, n:].clone()
            self.values = self.values[:, :, n:].clone()
            self.thinned_full = max(self.thinned_full - n, 0)
            if self.token_scores is not None:
                self.token_scores = self.token_scores[..., n:].clone()
            if self.real_keys is not None:
                self.real_keys = self.real_keys[:, n:]

    # ---------------------------------------------------------------------------------------------- stats
    def dense_tokens(self) -> int:
        """Tokens a transformers ``DynamicCache`` layer would hold after the same inputs."""
        return self.seen_tokens

    def static_tokens(self) -> int | None:
        """Token slots a transformers ``StaticCache`` layer of the same length would hold (None: a layer that
        grows)."""
        return None

    def stats(self, layer_idx: int) -> LayerStats:
        """Tokens, channels and bytes held, against a ``DynamicCache`` layer on the same inputs."""
        if not self.is_initialized:
            return LayerStats(layer_idx, 0, 0, 0, 0, 0, 0, 0, 0, bits=self.store.bits)
        batch, heads, _, head_dim = self.keys.shape
        v_dim = self.values.shape[-1]
        token_bytes = batch * heads * (head_dim * self.keys.element_size() + v_dim * self.values.element_size())
        static_tokens = self.static_tokens()
        return LayerStats(
            layer_idx=layer_idx,
            tokens=self.seen_tokens,
            stored_tokens=self.stored_tokens,
            compact_tokens=self.compact_tokens,
            head_dim=head_dim,
            key_channels=head_dim if self.key_channels is None else self.key_channels.shape[-1],
            value_channels=v_dim if self.value_channels is None else self.value_channels.shape[-1],
            stored_bytes=storage_bytes(self.tensors()),
            dense_bytes=self.dense_tokens() * token_bytes,
            bits=self.store.bits,
            static_bytes=None if static_tokens is None else static_tokens * token_bytes,
        )


class ThinKSlidingLayer(ThinKLayer):
    """A ThinK layer for sliding-window attention: it keeps at most ``sliding_window - 1`` past tokens, with the
    masks and lengths of transformers' ``DynamicSlidingWindowLayer``.

    Tokens that leave the window are dropped at the start of the next forward (so `crop` stays exact). With a
    policy, the prompt's tokens are picked among those still in the window, and as eviction is per head, each head
    then keeps its newest tokens up to the largest number any head still has in the window (the sliding mask hides
    the rest): never more than the window.
    """

    is_sliding = True
    # the previous turn's question soon leaves a window, which holds few tokens: keeping it aside would cost a
    # sliding layer a large share of its bytes for little
    keeps_spare = False
    codes_chunked_prompt = False  # `_trim` drops full-width tokens; the window bounds what it holds anyway

    def __init__(self, sliding_window: int, **kwargs) -> None:
        self.sliding_window = sliding_window
        super().__init__(**kwargs)
        if self.fold_block > 1:  # fold often enough that a window's worth of tokens is mostly thinned
            self.fold_block = max(self.store.block, 1, min(FOLD_BLOCK, (sliding_window - 1 - self.recent) // 2))

    def _trim(self, t0: int) -> None:
        oldest_visible = t0 - self.sliding_window + 1
        if self.compact_positions is not None:  # per-head positions: keep the newest `in_window` of each head
            in_window = int((self.compact_positions >= oldest_visible).sum(-1).max()) if self.compact_tokens else 0
            self._drop_oldest(self.compact_tokens - in_window)
            self._drop_oldest(max(oldest_visible - self.full_from, 0))
        else:  # the stored tokens are the newest ones, up to `seen_tokens` (which may lie past t0: a prompt's end
            # inside a forward, as when prompt lookup sends the prompt and its guesses at once)
            self._drop_oldest(max(oldest_visible, 0) - (self.seen_tokens - self.stored_tokens))

    def _visible_after(self, end: int, positions: torch.Tensor) -> torch.Tensor | None:
        return positions >= end - self.sliding_window + 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """As transformers' sliding layers: the window's last tokens and their offset (logical positions under a
        policy, whose layers keep their own tokens)."""
        if self.policy is not None:
            return super().get_mask_sizes(query_length)
        kv_offset = max(self.seen_tokens - self.sliding_window + 1, 0)
        return min(self.seen_tokens, self.sliding_window - 1) + query_length, kv_offset

    def get_max_length(self) -> int:
        return self.sliding_window

    def crop(self, tokens_to_remove: int) -> None:
        count = -tokens_to_remove
        if count > 0 and self.is_initialized:
            t0 = self.seen_tokens - count  # the next forward's first position
            oldest_needed = max(t0 - self.sliding_window + 1, 0)
            if self.compact_positions is None and self.seen_tokens - self.stored_tokens > oldest_needed:
                raise ValueError(
                    f"ThinKCache cannot crop {count} tokens from a sliding-window layer: the tokens the window "
                    "would need again were already dropped. Crop at most the tokens of the newest forward."
                )
        super().crop(tokens_to_remove)

    def dense_tokens(self) -> int:
        return min(self.seen_tokens, self.sliding_window - 1)
