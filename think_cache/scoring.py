"""Channel scoring and selection: the ThinK criterion as pure tensor functions.

Shapes follow transformers: ``(batch, kv_heads, tokens, head_dim)``. Under grouped-query attention the
queries of a KV head's whole group are flattened into the token axis: ``(batch, kv_heads, group * window,
head_dim)``. Every score is computed in float32, whatever the model's dtype, so near-ties in bf16 cannot flip
a channel choice from one run to the next.
"""

from __future__ import annotations

import math

import torch

from .compact import cap_logits

__all__ = [
    "kept_channel_count",
    "key_channel_scores",
    "value_channel_scores",
    "select_channels",
    "channel_index_dtype",
]


def kept_channel_count(head_dim: int, ratio: float) -> int:
    """Channels kept out of ``head_dim`` when a fraction ``ratio`` is pruned: ``ceil((1 - ratio) * head_dim)``."""
    # round() first so that e.g. (1 - 0.6) * 64 = 25.599999 does not become 26 by float noise
    return max(1, math.ceil(round((1.0 - ratio) * head_dim, 6)))


def key_channel_scores(
    window_queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Score each key channel by ``||Q_win[:, c]|| * ||K[:, c]||``.

    That product is the Frobenius norm of channel ``c``'s share of the window's attention logits
    (``Q_win[:, c] K[:, c]^T`` is rank one), the criterion of ThinK (arXiv 2407.21018, eq. 4).

    Parameters
    ----------
    window_queries:
        ``(batch, kv_heads, group * window, head_dim)``: the observation window's queries, every query head of
        a KV head's group. Rows of padded positions must already be zero.
    keys:
        ``(batch, kv_heads, tokens, head_dim)``.
    key_mask:
        ``(batch, tokens)`` or per head ``(batch, kv_heads, tokens)`` bool, True for real tokens; padded keys are
        left out of the norm. None: all real.

    Returns
    -------
    ``(batch, kv_heads, head_dim)`` float32 scores.
    """
    if key_mask is not None and key_mask.dim() == 2:
        key_mask = key_mask[:, None]
    return torch.linalg.vector_norm(window_queries.float(), dim=-2) * _channel_norms(keys, key_mask)


#: The most elements scoring reads or builds in float32 at once (16 MiB): `key_channel_scores` sums a long prompt's
#: channel norms a slice of tokens at a time, `value_channel_scores` runs the window's softmax over a slice of
#: tokens at a time (online), so scoring never copies a whole layer's keys or values to float32 (4x a bfloat16
#: layer's keys, twice over with a mask, at the end of every prompt) nor builds the window's logits over all of it.
NORM_CHUNK_ELEMENTS = 2**22


def _slice_tokens(per_token: int) -> int:
    """Tokens scoring takes at once when each costs ``per_token`` float32 elements (`NORM_CHUNK_ELEMENTS`), at
    least one."""
    return max(1, NORM_CHUNK_ELEMENTS // max(per_token, 1))


def _channel_norms(keys: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """``||K[:, c]||`` over the tokens of ``keys (batch, kv_heads, tokens, head_dim)`` in float32, masked tokens
    (``key_mask (batch, 1 or kv_heads, tokens)`` False) left out; `NORM_CHUNK_ELEMENTS` at a time."""
    batch, heads, tokens, head_dim = keys.shape

    def masked(start: int, stop: int) -> torch.Tensor:
        k = keys[:, :, start:stop].float()
        return k if key_mask is None else k * key_mask[..., start:stop, None].to(k.dtype)

    step = _slice_tokens(batch * heads * head_dim)
    if tokens <= step:  # one slice: the norm at once
        return torch.linalg.vector_norm(masked(0, tokens), dim=-2)
    squares = keys.new_zeros(batch, heads, head_dim, dtype=torch.float32)
    for start in range(0, tokens, step):
        squares += masked(start, start + step).square().sum(dim=-2)  # not in place: a float32 slice views the keys
    return squares.sqrt_()


def value_channel_scores(
    window_queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    window_mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Score each value channel by the norm of its share of the window's attention output.

    With ``A = softmax(Q_win K^T * scaling)`` (masked; the logits capped first under a ``softcap``), channel ``c``
    contributes ``A V[:, c]`` to the output; its score is ``||A V[:, c]||`` over the window's query rows.

    Parameters
    ----------
    window_queries:
        ``(batch, kv_heads, rows, head_dim)`` with ``rows = group * window``.
    keys, values:
        ``(batch, kv_heads, tokens, head_dim)``.
    scaling:
        The attention scale (``1 / sqrt(head_dim)``).
    window_mask:
        ``(batch, 1 or kv_heads, rows, tokens)`` bool, True where a window query may attend a key (causal and
        padding). A row that may attend no key (a padded query) counts nothing: its softmax is undefined, and
        spreading it evenly over the keys would make a row's channels depend on its batch-mates' lengths.
    softcap:
        The model's attention logit cap (Gemma 2; `think_cache.compact.cap_logits`), None for none.

    Returns
    -------
    ``(batch, kv_heads, head_dim)`` float32 scores.
    """
    batch, heads, rows, _ = window_queries.shape
    tokens = keys.shape[-2]
    step = _slice_tokens(batch * heads * rows)
    queries = window_queries.float()
    if tokens <= step:  # the window's softmax at once
        logits = _window_logits(queries, keys, scaling, softcap, window_mask)
        weights = torch.softmax(logits, dim=-1)
        if window_mask is not None:
            weights = weights * window_mask.any(dim=-1, keepdim=True)
        return torch.linalg.vector_norm(torch.matmul(weights, values.float()), dim=-2)
    # a long prompt a slice of tokens at a time, the softmax online (a running max and sum per row): no float32
    # copy of the layer's keys and values, and logits of one slice only
    out = queries.new_zeros(batch, heads, rows, values.shape[-1])
    top = queries.new_full((batch, heads, rows, 1), float("-inf"))
    total = queries.new_zeros(batch, heads, rows, 1)
    for start in range(0, tokens, step):
        mask = None if window_mask is None else window_mask[..., start : start + step]
        logits = _window_logits(queries, keys[:, :, start : start + step], scaling, softcap, mask)
        new_top = torch.maximum(top, logits.amax(dim=-1, keepdim=True))
        rescale = torch.exp(top - new_top)  # exp(-inf) = 0 before any slice
        weights = torch.exp(logits - new_top)
        out = out.mul_(rescale).add_(torch.matmul(weights, values[:, :, start : start + step].float()))
        total = total.mul_(rescale).add_(weights.sum(dim=-1, keepdim=True))
        top = new_top
    out = out / total
    if window_mask is not None:
        out = out * window_mask.any(dim=-1, keepdim=True)
    return torch.linalg.vector_norm(out, dim=-2)


def _window_logits(queries, keys, scaling: float, softcap: float | None, mask: torch.Tensor | None) -> torch.Tensor:
    """The window's float32 logits over ``keys``, scaled, capped under a ``softcap``, masked to float32's lowest
    where ``mask`` (bool, True = attend) says (so a row that may attend nothing stays finite)."""
    logits = cap_logits(torch.matmul(queries, keys.float().transpose(-1, -2)).mul_(scaling), softcap)
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return logits


def channel_index_dtype(head_dim: int) -> torch.dtype:
    """The smallest integer dtype that indexes ``head_dim`` channels (int16 for any real head size)."""
    return torch.int16 if head_dim <= torch.iinfo(torch.int16).max else torch.int32


def select_channels(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` best channels per ``(batch, kv_head)``, ascending, as int64.

    ``scores``: ``(batch, kv_heads, head_dim)``. Returns ``(batch, kv_heads, n_keep)``.
    """
    head_dim = scores.shape[-1]
    if not 1 <= n_keep <= head_dim:
        raise ValueError(f"n_keep must be in [1, {head_dim}], got {n_keep}")
    top = torch.topk(scores, n_keep, dim=-1, sorted=False).indices
    return torch.sort(top, dim=-1).values
