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

from .compact import compact_probs, weighted_values

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
    """Forward hook: this thread has left ``module`` (registered with ``always_call=True``: also when it raised)."""
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention for models patched by `think_cache.patch`.

    With a `ThinKCache` layer that is not compacted yet (prefill), the stock sdpa kernel runs on the full keys and
    the layer is then handed this forward's queries to choose its channels. Once compacted, attention runs over
    the compact part (query gathered at the kept channels) and the full-width recent part in one softmax.
    Anything else falls through to transformers' sdpa attention.

    With ``output_attentions=True`` the weights come back, ``(batch, q_heads, q_len, keys)`` as from transformers'
    eager attention (which then replaces sdpa): over the stored tokens, or under a token policy, which keeps other
    tokens per head, over every token seen with 0 for the evicted ones.
    """
    layer = _take_handoff(key)
    scale = _scale(scaling, query)
    wants_attention = _wants_attention_weights(module, kwargs)
    if layer is None or not layer.is_compacted:
        if wants_attention:
            out, weights = _eager_attention(module, query, key, value, attention_mask, dropout, scale)
        else:
            out, weights = sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        if layer is not None:
            layer.after_attention(query, attention_mask, scale)
        return out, weights
    if dropout and module.training:
        raise NotImplementedError(
            "ThinKCache is an inference cache: attention dropout in training mode is not supported."
        )
    probs = compact_probs(
        query,
        layer.compact_keys,
        layer.key_channels,
        key,
        layer.attention_mask(attention_mask, query.shape[2]),
        scale,
    )
    out = weighted_values(probs, layer.compact_values, layer.value_channels, value)
    weights = _weights_per_token(layer, probs).to(query.dtype) if wants_attention else None
    # a policy that accumulates attention (H2O) gets each stored token's weight, summed over its group's queries
    token_weights = probs.sum(dim=(2, 3)) if layer.token_scores is not None else None
    layer.after_attention(query, attention_mask, scale, token_weights)
    return out, weights


def _wants_attention_weights(module: torch.nn.Module, kwargs: dict) -> bool:
    """Whether this forward was asked for attention weights (transformers passes ``output_attentions`` down to the
    attention function; a model config's ``output_attentions`` applies when the call says nothing)."""
    wanted = kwargs.get("output_attentions")
    if wanted is None:
        wanted = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(wanted)


def _eager_attention(module, query, key, value, attention_mask, dropout: float, scale: float):
    """Plain attention that also returns its weights ``(batch, q_heads, q_len, keys)``, like transformers' eager."""
    probs = compact_probs(query, None, None, key, attention_mask, scale)
    if dropout and module.training:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = weighted_values(probs, None, None, value)
    return out, probs.flatten(1, 2).to(query.dtype)


def _weights_per_token(layer, probs: torch.Tensor) -> torch.Tensor:
    """``(batch, q_heads, q_len, keys)`` from `compact_probs`'s ``(batch, kv_heads, group, q_len, stored)``.

    Without eviction the stored tokens are the tokens in order. Under a token policy each head keeps its own
    tokens (compact part at ``compact_positions``, then the recent part, the newest tokens): the weights are put
    back at the logical positions of every token seen, 0 where a token was evicted.
    """
    if layer.compact_positions is None:
        return probs.flatten(1, 2)
    batch, kv_heads, group, q_len, stored = probs.shape
    seen, n_recent = layer.seen_tokens, layer.keys.shape[-2]
    recent = torch.arange(seen - n_recent, seen, device=probs.device).expand(batch, kv_heads, n_recent)
    positions = torch.cat([layer.compact_positions.long(), recent], dim=-1)  # (B, Hkv, stored)
    index = positions[:, :, None, None, :].expand(batch, kv_heads, group, q_len, stored)
    return probs.new_zeros(batch, kv_heads, group, q_len, seen).scatter_(-1, index, probs).flatten(1, 2)


def _scale(scaling: float | None, query: torch.Tensor) -> float:
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def register() -> None:
    """Register the ThinK attention and its mask builder with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from ._compat import sdpa_mask_function

    AttentionInterface.register(ATTENTION_NAME, think_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask_function())
