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

from .compact import compact_attention

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
) -> tuple[torch.Tensor, None]:
    """Attention for models patched by `think_cache.patch`.

    With a `ThinKCache` layer that is not compacted yet (prefill), the stock sdpa kernel runs on the full keys and
    the layer is then handed this forward's queries to choose its channels. Once compacted, attention runs over
    the compact part (query gathered at the kept channels) and the full-width recent part in one softmax.
    Anything else falls through to transformers' sdpa attention.
    """
    layer = _take_handoff(key)
    if layer is None or not layer.is_compacted:
        out = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        if layer is not None:
            layer.after_attention(query, attention_mask, _scale(scaling, query))
        return out
    if dropout and module.training:
        raise NotImplementedError(
            "ThinKCache is an inference cache: attention dropout in training mode is not supported."
        )
    scale = _scale(scaling, query)
    wants_weights = layer.token_scores is not None  # a policy that accumulates attention (H2O)
    out = compact_attention(
        query,
        layer.compact_keys,
        layer.key_channels,
        layer.compact_values,
        layer.value_channels,
        key,
        value,
        layer.attention_mask(attention_mask, query.shape[2]),
        scale,
        return_token_weights=wants_weights,
    )
    out, weights = out if wants_weights else (out, None)
    layer.after_attention(query, attention_mask, scale, weights)
    return out, None


def _scale(scaling: float | None, query: torch.Tensor) -> float:
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def register() -> None:
    """Register the ThinK attention and its mask builder with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from ._compat import sdpa_mask_function

    AttentionInterface.register(ATTENTION_NAME, think_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask_function())
