"""Attention over a compact key cache, and the mask helpers it needs: pure tensor functions.

A ThinK layer holds two parts per KV head: the *compact* part (older tokens, only the kept key channels,
and optionally only the kept value channels) and the *recent* part (the newest tokens at full width).
`compact_attention` computes one softmax over both parts without ever building a full-width key tensor
for the compact part: the query is gathered at each head's kept channels instead, and the 1/sqrt(head_dim)
scale is unchanged, so the logits equal those of a full cache whose pruned channels are zero. The compact part is
a `think_cache.storage.CompactStore`, full precision or quantized: attention over it goes through the store's
``logits`` and ``output``, so a quantized store is never dequantized whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .storage import CompactStore

__all__ = [
    "as_bool_mask",
    "cap_logits",
    "key_padding",
    "causal_mask",
    "gather_channels",
    "kept_channel_mask",
    "pruned_channels",
    "gather_tokens",
    "Restored",
    "scatter_channels",
    "compact_attention",
    "compact_probs",
    "weighted_values",
    "Thinned",
    "thinned_views",
]


def as_bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A 4D attention mask as bool (True = attend), whether it came boolean or additive (0 / large negative)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def cap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Attention logit softcapping (Gemma 2): ``softcap * tanh(logits / softcap)``, in place; ``logits`` unchanged
    when ``softcap`` is None.

    transformers' Gemma 2 attention applies it to the scaled logits before the mask, so callers pass logits already
    multiplied by the scale and mask them afterwards. Elementwise, so a concatenation of capped parts equals the
    capped concatenation.
    """
    if softcap is None:
        return logits
    return logits.div_(softcap).tanh_().mul_(softcap)


def key_padding(
    mask: torch.Tensor | None, batch: int, kv_length: int, device: torch.device | None = None
) -> torch.Tensor:
    """``(batch, kv_length)`` bool, True for real keys: a key is real if any query row may attend it.

    Every real token attends to itself, so this holds under causal and sliding-window masks too.
    """
    mask = as_bool_mask(mask)
    if mask is None:
        return torch.ones(batch, kv_length, dtype=torch.bool, device=device)
    real = mask.any(dim=-2).any(dim=1)  # (B|1, kv)
    return real.expand(batch, kv_length)


def causal_mask(
    q_length: int, kv_length: int, device: torch.device, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """``(1, 1, q_length, kv_length)`` bool mask for queries that are the last ``q_length`` keys; only the rows
    ``start:stop`` of it when given (a chunk of the queries)."""
    first = kv_length - q_length
    q_pos = torch.arange(first + start, first + (q_length if stop is None else stop), device=device)
    return (torch.arange(kv_length, device=device)[None, :] <= q_pos[:, None])[None, None]


def gather_channels(x: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Keep the channels ``channels`` of ``x``.

    ``x``: ``(batch, kv_heads, rows, head_dim)``; ``channels``: ``(batch, kv_heads, kept)`` integer indices.
    Returns ``(batch, kv_heads, rows, kept)``, a new contiguous tensor.
    """
    index = channels.long()[:, :, None, :].expand(*x.shape[:-1], channels.shape[-1])
    return torch.gather(x, -1, index)


def kept_channel_mask(kept: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(batch, kv_heads, head_dim)`` bool, True at the channels ``kept`` ``(batch, kv_heads, n_kept)``."""
    keep = torch.zeros(*kept.shape[:-1], head_dim, dtype=torch.bool, device=kept.device)
    return keep.scatter_(-1, kept.long(), True)


def pruned_channels(kept: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The channels not in ``kept`` ``(batch, kv_heads, n_kept)``, ascending: ``(batch, kv_heads, head_dim - n)``
    (boolean indexing: a device sync on CUDA; `kept_channel_mask` has none)."""
    keep = kept_channel_mask(kept, head_dim)
    channels = torch.arange(head_dim, device=kept.device, dtype=kept.dtype).expand_as(keep)
    return channels[~keep].view(*kept.shape[:-1], head_dim - kept.shape[-1])


@dataclass
class Restored:
    """Thinned tokens that some query rows see at full width: the pruned key channels of those tokens, kept aside
    (``keys (batch, kv_heads, n, pruned)`` at ``channels (batch, kv_heads, pruned)``), their ``columns (batch,
    kv_heads, n)`` among the stored tokens (compact part first), whether each is there at all (``present``, same
    shape: an evicted or dropped token is not), and which rows see them whole (``rows``, ``(group * q_len,)`` bool,
    laid out as `compact_probs` lays a KV head's query group out). See `ThinKLayer.restored`."""

    keys: torch.Tensor
    channels: torch.Tensor
    columns: torch.Tensor
    present: torch.Tensor
    rows: torch.Tensor

    def add_to(self, logits: torch.Tensor, q: torch.Tensor, scaling: float) -> None:
        """Add the pruned channels' share to the logits ``(batch, kv_heads, group * q_len, stored)`` of
        ``q (batch, kv_heads, group * q_len, head_dim)``, in place: those rows then see those tokens' keys whole."""
        share = torch.matmul(gather_channels(q, self.channels), self.keys.transpose(-1, -2)).float().mul_(scaling)
        share = torch.where(self.present[:, :, None, :] & self.rows[None, None, :, None], share, 0.0)
        index = self.columns[:, :, None, :].expand_as(share)
        logits.scatter_add_(-1, index, share)  # absent tokens add 0 at a valid column


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Keep tokens per (batch, head): ``x (B, H, T, D)``, ``index (B, H, K)`` -> ``(B, H, K, D)``."""
    return torch.gather(x, 2, index.long()[..., None].expand(*index.shape, x.shape[-1]))


def scatter_channels(x: torch.Tensor, channels: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `gather_channels`: put ``x``'s channels back at ``channels`` in a zero ``head_dim`` tensor."""
    out = x.new_zeros(*x.shape[:-1], head_dim)
    index = channels.long()[:, :, None, :].expand_as(x)
    return out.scatter_(-1, index, x)


def compact_attention(
    query: torch.Tensor,
    store: CompactStore,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    return_token_weights: bool = False,
    thinned_rows: list[int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over a compact part followed by a full-width recent part.

    Parameters
    ----------
    query:
        ``(batch, q_heads, q_len, head_dim)``; query head ``j`` reads KV head ``j // group``.
    store:
        The compact part (a `think_cache.storage.CompactStore`): older tokens at the kept key channels
        ``store.key_channels`` ``(batch, kv_heads, kept_k)`` and the kept value channels ``store.value_channels``
        (None: all), in full precision or quantized.
    keys, values:
        ``(batch, kv_heads, n_recent, head_dim)``: the newest tokens at full width.
    mask:
        ``(batch | 1, 1 | kv_heads, q_len, n_compact + n_recent)``, True (or 0.0) where a query may attend a key,
        columns in the order compact then recent. None means causal with the queries being the last ``q_len``
        tokens.
    scaling:
        The softmax scale: the model's own (``1 / sqrt(head_dim)``, or ``query_pre_attn_scalar ** -0.5`` in Gemma).
    return_token_weights:
        Also return each stored token's attention weight summed over the queries of its KV head's group,
        ``(batch, kv_heads, n_compact + n_recent)`` float32 (what H2O accumulates).
    thinned_rows:
        Per query row (``q_len`` ints), how many of the oldest recent tokens that row sees thinned (kept channels
        only; the whole blocks of a quantizing store quantized, see `thinned_views`): the view each row would have
        had if the queries had come one at a time and the recent part had folded in between. None: all at full
        width.
    softcap:
        Attention logit softcapping (`cap_logits`) applied to the scaled logits of both parts before the mask, as
        Gemma 2 does; None for none.
    sinks:
        Attention sinks, ``(q_heads,)``: a logit per query head that joins every row's softmax without a value
        (GPT-OSS's ``sinks``), so a row's weights sum to less than one; None for none.

    Returns
    -------
    ``(batch, q_len, q_heads, head_dim)``, the layout transformers' attention functions return (and the token
    weights when asked). `compact_probs` and `weighted_values` are its two halves.
    """
    thinned = thinned_views(store, keys, values, thinned_rows, query.shape[1] // keys.shape[1])
    probs = compact_probs(query, store, keys, mask, scaling, thinned, softcap, sinks=sinks)
    out = weighted_values(probs, store, values, thinned)
    if return_token_weights:
        return out, probs.sum(dim=(2, 3))
    return out


@dataclass
class Thinned:
    """Some of the oldest recent (full-width) tokens as some query rows see them thinned: ``mask`` ``(group * q_len,
    n)`` bool, which rows (laid out as `compact_probs` lays a KV head's query group out) see which of the oldest
    ``n`` tokens this way, and ``store``, those ``n`` tokens held this way. See `thinned_views`."""

    mask: torch.Tensor
    store: CompactStore


def thinned_views(
    store: CompactStore, keys: torch.Tensor, values: torch.Tensor, thinned_rows: list[int] | None, group: int
) -> list[Thinned] | None:
    """How the query rows that see some of the oldest recent tokens thinned see them (`compact_attention`'s
    ``thinned_rows``, one count per row), as they would have one token at a time: a row's whole blocks of the
    store's (`CompactStore.whole_blocks`) as the store holds them once folded (``store.preview``), the rest of its
    count thinned at full precision (``store.preview_exact``: a store that takes whole blocks only leaves them so
    until their block folds, `ThinKLayer._thin_oldest`). The views do not overlap; None without ``thinned_rows``."""
    if thinned_rows is None:
        return None
    device = keys.device
    counts = torch.tensor(thinned_rows, device=device).repeat(group)[:, None]
    whole = store.whole_blocks(counts)
    n_thin = max(thinned_rows)
    n_stored = store.whole_blocks(n_thin)
    columns = torch.arange(n_thin, device=device)[None, :]
    views = []
    if n_stored:
        preview = store.preview(keys[:, :, :n_stored], values[:, :, :n_stored])
        views.append(Thinned(columns[:, :n_stored] < whole, preview))
    if store.block > 1:
        exact = (columns < counts) & (columns >= whole)
        if bool(exact.any()):
            views.append(Thinned(exact, store.preview_exact(keys[:, :, :n_thin], values[:, :, :n_thin])))
    return views


def compact_probs(
    query: torch.Tensor,
    store: CompactStore | None,
    keys: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    thinned: list[Thinned] | None = None,
    softcap: float | None = None,
    restored: Restored | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention weights of `compact_attention`: one float32 softmax over the compact part (``store``, None for
    none) then the recent part, ``(batch, kv_heads, group, q_len, n_compact + n_recent)``; ``view(batch, q_heads,
    q_len, -1)`` gives them per query head. ``thinned`` (`thinned_views`): how the rows that see some of the
    oldest recent tokens thinned see them; ``restored``: thinned tokens some rows see at full width (`Restored`);
    ``sinks``: a logit per query head in every row's softmax, with no value (the weights then sum to less than one).
    Else as in `compact_attention`."""
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads = keys.shape[1]
    n_compact = 0 if store is None else store.tokens
    n_total = n_compact + keys.shape[2]
    group = q_heads // kv_heads
    # (B, Hkv, G * L, D): a view of each KV head's whole query group, no repeat_kv
    q = query.reshape(batch, kv_heads, group * q_len, head_dim)

    logits = torch.matmul(q, keys.transpose(-1, -2)).float().mul_(scaling)
    for view in thinned or ():  # the oldest recent tokens as the rows that see them thinned see them
        n = view.mask.shape[-1]
        view_logits = view.store.logits(gather_channels(q, view.store.key_channels), scaling)
        logits[..., :n] = torch.where(view.mask, view_logits, logits[..., :n])
    if store is not None:
        compact = store.logits(gather_channels(q, store.key_channels), scaling)
        logits = torch.cat([compact, logits], dim=-1)
    if restored is not None:
        restored.add_to(logits, q, scaling)
    logits = cap_logits(logits, softcap).view(batch, kv_heads, group, q_len, n_total)

    mask = as_bool_mask(mask)
    if mask is None and q_len > 1:
        mask = causal_mask(q_len, n_total, query.device)
    if mask is not None:
        if mask.shape[-1] != n_total:
            raise RuntimeError(
                f"think_cache: the attention mask covers {mask.shape[-1]} keys but the cache holds {n_total}; "
                "this is a bug, please report it with your transformers version"
            )
        # a finite minimum, not -inf: a fully masked (padded) row then gives a uniform softmax instead of NaN (or,
        # with sinks, gives the sink all its weight)
        logits = logits.masked_fill(~mask[:, :, None], torch.finfo(logits.dtype).min)
    if sinks is None:
        return torch.softmax(logits, dim=-1)
    return softmax_with_sinks(logits, sinks.float().view(1, kv_heads, group, 1, 1))


def softmax_with_sinks(logits: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``softmax([logits, sinks])`` along the last axis without the sinks' column: each row's weights over its
    tokens when a sink logit (broadcast to ``logits[..., :1]``) takes its share of the softmax and gives no value."""
    top = torch.maximum(logits.amax(dim=-1, keepdim=True), sinks)  # no concatenated copy of the logits
    weights = (logits - top).exp_()
    return weights.div_(weights.sum(dim=-1, keepdim=True) + (sinks - top).exp())


def weighted_values(
    probs: torch.Tensor,
    store: CompactStore | None,
    values: torch.Tensor,
    thinned: list[Thinned] | None = None,
) -> torch.Tensor:
    """The output of `compact_attention` from its weights ``probs`` (`compact_probs`): ``(batch, q_len, q_heads,
    v_dim)``. Arguments as in `compact_probs`."""
    batch, kv_heads, group, q_len, n_total = probs.shape
    v_dim = values.shape[-1]
    n_compact = n_total - values.shape[2]
    weights = probs.view(batch, kv_heads, group * q_len, n_total)
    recent = weights[..., n_compact:]
    kept_out = None  # what the tokens held at the kept value channels give: the compact part, thinned tokens
    for view in thinned or ():  # (views come with a store, and hold its channels)
        n = view.mask.shape[-1]
        view_out = view.store.output(recent[..., :n] * view.mask)
        kept_out = view_out if kept_out is None else kept_out + view_out
        recent = torch.cat([recent[..., :n] * ~view.mask, recent[..., n:]], dim=-1)
    if store is not None:
        compact_out = store.output(weights[..., :n_compact])
        kept_out = compact_out if kept_out is None else compact_out + kept_out
    out = torch.matmul(recent.to(values.dtype), values)
    if kept_out is not None:
        value_channels = store.value_channels
        if value_channels is not None:
            kept_out = scatter_channels(kept_out, value_channels, v_dim)
        out = kept_out.to(values.dtype) + out
    return out.view(batch, kv_heads * group, q_len, v_dim).transpose(1, 2)
