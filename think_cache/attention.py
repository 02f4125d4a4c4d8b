"""The ThinK attention function and its hand-off with the cache.

transformers calls ``cache.update(key, value, layer_idx)`` and then the registered attention function with the
returned key; neither call sees the other's arguments. So, per thread:

1. a forward pre-hook (installed by `think_cache.patch`) records the attention module being run;
2. `ThinKCache.update` records the layer it updated and the very key tensor it returned;
3. `think_attention` takes that record back when it receives that same tensor (``key is returned_key``) and
   computes over the layer's compact and recent parts. Any other key (another cache, cross-attention) goes to
   transformers' stock sdpa attention unchanged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .compact import causal_mask, compact_attention

__all__ = ["ATTENTION_NAME", "think_attention", "register"]

#: The name the ThinK attention is registered under in transformers' AttentionInterface.
ATTENTION_NAME = "think"


@dataclass
class _Handoff:
    layer: object
    key: torch.Tensor


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.module: torch.nn.Module | None = None
        self.handoff: _Handoff | None = None


_state = _ThreadState()


def enter_module(module: torch.nn.Module, *args, **kwargs) -> None:
    """Forward pre-hook: this thread is now running ``module``."""
    _state.module = module


def exit_module(module: torch.nn.Module, *args, **kwargs) -> None:
    """Forward hook: this thread has left ``module``."""
    _state.module = None
    _state.handoff = None


def current_module() -> torch.nn.Module | None:
    """The patched attention module this thread is running, if any."""
    return _state.module


def hand_off(layer: object, key: torch.Tensor) -> None:
    """Called by the cache: ``layer`` was just updated and returned ``key``."""
    _state.handoff = _Handoff(layer, key)


def _take_handoff(key: torch.Tensor):
    handoff, _state.handoff = _state.handoff, None
    if handoff is not None and handoff.key is key:
        return handoff.layer
    return None


def think_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for models patched by `think_cache.patch`.

    Before its layer is compacted (the prompt), the stock sdpa kernel runs on the full keys and the layer remembers
    the queries it needs to choose its channels; at the end of the prompt the layer is compacted. Once compacted,
    attention runs over the compact part (query gathered at the kept channels) and the full-width part in one
    softmax. When the prompt ends inside a forward (assisted decoding's first forward holds the prompt and the
    drafts), the rows before the end attend the prompt at full width and the rows after it the compacted layer.
    Anything else falls through to transformers' sdpa attention.
    """
    layer = _take_handoff(key)
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout and module.training:
        raise NotImplementedError(
            "ThinKCache is an inference cache: attention dropout in training mode is not supported."
        )
    scale = _scale(scaling, query)
    if layer.is_compacted:
        return _attend_compacted(layer, query, attention_mask, scale), None

    q_len = query.shape[2]
    rows = layer.rows_before_end(q_len)
    mask = _stored_columns(attention_mask, key.shape[-2])  # while uncompacted the stored tokens are the newest
    if rows == q_len:
        out, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)
        layer.observe(query, mask, scale)
        if layer.prompt_end == layer.seen_tokens:  # the prompt ends with this forward
            layer.compact()
        return out, None

    # the prompt ends after `rows` of this forward's queries
    cols = key.shape[-2] - (q_len - rows)
    if mask is None:
        mask = causal_mask(q_len, key.shape[-2], query.device)
    head_mask = mask[:, :, :rows, :cols]
    out_head, _ = sdpa_attention_forward(
        module, query[:, :, :rows], key[:, :, :cols], value[:, :, :cols], head_mask, scaling=scaling, **kwargs
    )
    layer.observe(query[:, :, :rows], head_mask, scale, upto=layer.prompt_end)
    layer.compact(layer.prompt_end)
    tail_mask = None if attention_mask is None else attention_mask[:, :, rows:]
    out_tail = _attend_compacted(layer, query[:, :, rows:], tail_mask, scale)
    return torch.cat([out_head, out_tail], dim=1), None


def _attend_compacted(layer, query: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of ``query`` (the forward's newest rows) over a compacted layer, then the layer's bookkeeping."""
    q_len = query.shape[2]
    wants_weights = layer.token_scores is not None  # a policy that accumulates attention (H2O)
    out = compact_attention(
        query,
        layer.store,
        layer.keys,
        layer.values,
        layer.attention_mask(mask, q_len),
        scale,
        return_token_weights=wants_weights,
        thinned_rows=layer.thinned_rows(q_len),
    )
    out, weights = out if wants_weights else (out, None)
    layer.after_attention(mask, weights)
    return out


def _stored_columns(mask: torch.Tensor | None, stored: int) -> torch.Tensor | None:
    """The columns of a forward's mask that belong to the stored tokens (a mask over logical positions, as a
    policy's layers get, is longer than what a sliding layer still stores)."""
    if mask is None or mask.shape[-1] == stored:
        return mask
    return mask[..., mask.shape[-1] - stored :]


def _scale(scaling: float | None, query: torch.Tensor) -> float:
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def register() -> None:
    """Register the ThinK attention and its mask builder with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from ._compat import sdpa_mask_function

    AttentionInterface.register(ATTENTION_NAME, think_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask_function())
