"""The ThinK attention function and its hand-off with the cache.

transformers calls ``cache.update(key, value, layer_idx)`` and then the registered attention function with the
returned key; neither call sees the other's arguments. So, per thread:

1. a forward pre-hook (installed by `think_cache.patch`) records the attention module being run;
2. `ThinKCache.update` records the layer it updated and the very key tensor it returned;
3. `think_attention` takes that record back when it receives that same tensor (``key is returned_key``) and
   computes over the layer's compact and recent parts. Any other key (another cache, cross-attention) goes to
   transformers' stock sdpa attention unchanged.

A compiled decoding step (a static cache, `think_cache.static`) runs no hook, and dynamo cannot trace a
thread-local: there the cache hands the layer over through a plain object instead (`_compiled_state`). The hand-off
is made and taken within the traced forward of one attention layer, so dynamo resolves the layer to the cache that
was passed to the call and guards nothing else. (Reading a layer left on the attention module by an earlier
forward, as this module once did through a weak reference, made the compiled graph guard on whatever cache was
last used: one that died between tracing and guard building, as inductor's compile can collect garbage, crashed
dynamo's guard building; see ``test_a_cache_dying_during_a_compile_does_not_break_it``.)
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, replace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from . import kernels
from ._compat import is_compiling, output_attentions
from .compact import as_bool_mask, causal_mask, compact_probs, key_padding, thinned_views, weighted_values
from .policies import attention_and_token_weights
from .static import STATIC_SINKS

__all__ = ["ATTENTION_NAME", "think_attention", "register"]

#: The name the ThinK attention is registered under in transformers' AttentionInterface.
ATTENTION_NAME = "think"


@dataclass
class _Handoff:
    layer: object
    key: torch.Tensor


@dataclass
class _Shared:
    """A layer whose keys later layers reuse (Gemma 4's KV sharing), the keys it returned this forward, and whether
    it was compacted before this forward's attention. Weak references: a forward's keys and a dropped cache's layers
    are not kept alive after the forward for the next one."""

    layer: weakref.ref
    key: weakref.ref
    compacted: bool


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.module: torch.nn.Module | None = None
        self.handoff: _Handoff | None = None
        self.linear_config: object = None  # the text config of the hybrid model whose linear layer is running
        self.shared: dict[int, _Shared] = {}  # by id(layer): the KV-sharing layers of the running forward


class _CompiledState:
    """The hand-off of a compiled step: a plain object, whose attribute writes dynamo traces (and replays)."""

    def __init__(self) -> None:
        self.handoff: _Handoff | None = None


_state = _ThreadState()
_compiled_state = _CompiledState()


def _handoff_state() -> _ThreadState | _CompiledState:
    """Where `hand_off` leaves a layer for `think_attention`: per thread, or the traceable object under compile."""
    return _compiled_state if is_compiling() else _state


def enter_module(module: torch.nn.Module, *args, **kwargs) -> None:
    """Forward pre-hook: this thread is now running ``module`` (nothing under torch.compile: see the module
    docstring)."""
    if not is_compiling():
        _state.module = module


def exit_module(module: torch.nn.Module, *args, **kwargs) -> None:
    """Forward hook: this thread has left ``module`` (registered with ``always_call=True``: also when it raised)."""
    if not is_compiling():
        _state.module = None
        _state.handoff = None
        _state.linear_config = None


class EnterLinearModule:
    """Forward pre-hook of a hybrid model's linear-attention module: this thread now runs a linear layer of the model
    whose text config is ``config`` (its modules do not all keep one), so that a ThinKCache can check that it serves
    this model before it hands out or stores a recurrent state."""

    def __init__(self, config: object) -> None:
        self.config = config

    def __call__(self, module: torch.nn.Module, *args, **kwargs) -> None:
        if not is_compiling():
            _state.module = module
            _state.linear_config = self.config


def current_linear_config() -> object:
    """The text config of the hybrid model whose linear-attention module this thread is running, if any."""
    return _state.linear_config


def current_module() -> torch.nn.Module | None:
    """The patched attention module this thread is running, if any."""
    return _state.module


def hand_off(layer: object, key: torch.Tensor, shared: bool = False) -> None:
    """Called by the cache: ``layer`` was just updated and returned ``key``; ``shared``: later layers of the model
    reuse its keys and values (Gemma 4's KV sharing: they get ``key`` itself, never updating a cache)."""
    _handoff_state().handoff = _Handoff(layer, key)
    if shared and not is_compiling():
        _state.shared[id(layer)] = _Shared(weakref.ref(layer), weakref.ref(key), layer.is_compacted)


def forget_shared() -> None:
    """Called by the cache at the start of a forward: last forward's shared keys are done with."""
    _state.shared = {}


def _shared_layer(key: torch.Tensor) -> tuple[object, bool] | None:
    """The KV-sharing layer that returned ``key`` this forward and whether it was compacted before it, when a layer
    that reuses its keys attends."""
    for shared in _state.shared.values():
        if shared.key() is key and (layer := shared.layer()) is not None:
            return layer, shared.compacted
    return None


def _take_handoff(key: torch.Tensor):
    """The layer handed off with ``key``, if this is that key (the hand-off is taken either way)."""
    state = _handoff_state()
    handoff, state.handoff = state.handoff, None
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

    Before its layer is compacted (the prompt), the stock sdpa kernel runs on the full keys and the layer remembers
    the queries it needs to choose its channels; at the end of the prompt the layer is compacted. Once compacted,
    attention runs over the compact part (query gathered at the kept channels) and the full-width part in one
    softmax. When the prompt ends inside a forward (assisted decoding's first forward holds the prompt and the
    drafts), the rows before the end attend the prompt at full width and the rows after it the compacted layer.
    Anything else falls through to transformers' sdpa attention.

    A model that caps its attention logits (Gemma 2 passes ``softcap``) gets the cap on every path: the eager
    formula replaces sdpa (which has no softcapping) on full keys, the compacted path caps the pruned logits, and the
    fused kernel, which has no cap, is not used. Attention sinks (GPT-OSS passes ``s_aux``, a logit per query head
    that takes a share of every softmax and gives no value) are kept the same way: the eager formula on full keys
    (row chunk by row chunk), in the compacted path's softmax, and no fused kernel.

    With ``output_attentions=True`` the weights come back, ``(batch, q_heads, q_len, keys)`` as from transformers'
    eager attention (which then replaces sdpa): over the stored tokens, or under a token policy, which keeps other
    tokens per head, over every token seen with 0 for the evicted ones.
    """
    layer = _take_handoff(key)
    if layer is None:
        return _without_layer(module, query, key, value, attention_mask, dropout, scaling, kwargs)
    scale = _scale(scaling, query)
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")  # GPT-OSS's attention sinks: a logit per query head, with no value
    wants_attention = _wants_attention_weights(module, kwargs)
    if dropout and module.training:
        raise NotImplementedError(
            "ThinKCache is an inference cache: attention dropout in training mode is not supported."
        )
    if getattr(layer, "is_static", False):
        if wants_attention:
            raise NotImplementedError(
                "A static ThinKCache (max_cache_len) does not return attention weights; use a ThinKCache without "
                "max_cache_len for output_attentions=True."
            )
        if sinks is not None:  # refused where the layer was built (`ThinKCache._new_layer`), for a module that
            raise NotImplementedError(STATIC_SINKS)  # names its sinks; this is for one that does not
        return layer.attend(query, attention_mask, scale, softcap), None
    if layer.is_compacted:
        return _attend_compacted(layer, query, attention_mask, scale, wants_attention, softcap, sinks)

    q_len = query.shape[2]
    rows = layer.rows_before_end(q_len)
    mask = _stored_columns(attention_mask, key.shape[-2])  # while uncompacted the stored tokens are the newest
    if rows == q_len:
        token_weights = None
        if _scores_while_attending(layer, query, wants_attention, kwargs):
            real_keys = key_padding(mask, query.shape[0], key.shape[-2], query.device)
            out, token_weights = attention_and_token_weights(query, key, value, as_bool_mask(mask), real_keys, scale)
            weights = None
        else:
            out, weights = _full_attention(module, query, key, value, mask, 0.0, scaling, wants_attention, kwargs)
        layer.observe(query, mask, scale, token_weights=token_weights, softcap=softcap, keys=key)
        if layer.prompt_end == layer.seen_tokens:  # the prompt ends with this forward
            layer.compact()
        else:
            layer.wait_coded()  # a chunk of a longer prompt
        return out, weights

    # the prompt ends after `rows` of this forward's queries
    cols = key.shape[-2] - (q_len - rows)
    if mask is None:
        mask = causal_mask(q_len, key.shape[-2], query.device)
    head_mask = mask[:, :, :rows, :cols]
    head = query[:, :, :rows]
    out_head, w_head = _full_attention(
        module, head, key[:, :, :cols], value[:, :, :cols], head_mask, 0.0, scaling, wants_attention, kwargs
    )
    layer.observe(head, head_mask, scale, upto=layer.prompt_end, softcap=softcap, keys=key)
    layer.compact(layer.prompt_end)
    tail_mask = None if attention_mask is None else attention_mask[:, :, rows:]
    if layer.compact_positions is None:  # a sliding layer just dropped what the window hides from the tail rows
        tail_mask = _stored_columns(tail_mask, layer.stored_tokens)
    out_tail, w_tail = _attend_compacted(layer, query[:, :, rows:], tail_mask, scale, wants_attention, softcap, sinks)
    weights = None
    if wants_attention:  # the head rows saw none of the tokens after the prompt
        w_head = torch.nn.functional.pad(w_head, (0, w_tail.shape[-1] - w_head.shape[-1]))
        weights = torch.cat([w_head, w_tail], dim=2)
    return torch.cat([out_head, out_tail], dim=1), weights


def _without_layer(module, query, key, value, attention_mask, dropout: float, scaling, kwargs: dict):
    """`think_attention` for a key no ThinKCache layer handed off: a layer that reuses a ThinK layer's keys
    (Gemma 4's KV sharing), else another cache's or no cache's keys, which transformers' attention serves."""
    wants_attention = _wants_attention_weights(module, kwargs)
    if _state.shared and (shared := _shared_layer(key)) is not None:
        storing, compacted = shared
        if compacted:  # its own queries over that compacted layer, which it leaves as is
            scale = _scale(scaling, query)
            softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
            return _attend_compacted(storing, query, attention_mask, scale, wants_attention, softcap, sinks, False)
        mask = _stored_columns(attention_mask, key.shape[-2])  # a prompt: the stored keys whole, as that layer saw
        return _full_attention(module, query, key, value, mask, dropout, scaling, wants_attention, kwargs)
    if key.shape[-1] != query.shape[-1] and is_compiling():  # a compact buffer nobody handed over
        raise RuntimeError(
            "think_cache: a compiled step got a compact key without its static ThinKCache layer; this is a bug, "
            "please report it"
        )
    return _full_attention(module, query, key, value, attention_mask, dropout, scaling, wants_attention, kwargs)


def wants_grad(query: torch.Tensor) -> bool:
    """Whether autograd records this forward's attention (a loop run without ``torch.no_grad()``): the torch path
    then serves it, which has a backward."""
    return query.requires_grad and torch.is_grad_enabled()


def _scores_while_attending(layer, query: torch.Tensor, wants_attention: bool, kwargs: dict) -> bool:
    """Whether a prompt forward computes its attention and H2O's token scores from one softmax
    (`policies.attention_and_token_weights`) instead of sdpa plus a second pass: for a layer that accumulates the
    prompt's attention, not sliding (H2O scores a sliding layer's tokens causally, not by its window), with no
    weights asked for, no logit soft-capping and no gradient wanted (its softmax runs in place)."""
    return (
        layer.accumulates_prompt_attention
        and not wants_grad(query)
        and not layer.is_sliding
        and not wants_attention
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
    )


def _full_attention(module, query, key, value, mask, dropout: float, scaling, wants_attention: bool, kwargs: dict):
    """Stock attention over full keys: transformers' sdpa, or the eager formula when the weights are wanted, the
    logits are capped (``softcap`` in ``kwargs``) or the model has attention sinks (``s_aux``): sdpa would silently
    leave either out."""
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    q_len, kv_len = query.shape[2], key.shape[-2]
    if mask is None and 1 < q_len < kv_len:  # the last rows of a forward (Gemma 4 cuts its reusing layers' queries to
        mask = causal_mask(q_len, kv_len, query.device)  # `logits_to_keep`): sdpa's is_causal would align them first
    if wants_attention or softcap is not None or sinks is not None:
        scale = _scale(scaling, query)
        return _eager_attention(module, query, key, value, mask, dropout, scale, softcap, sinks, wants_attention)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _attend_compacted(
    layer,
    query: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    wants_attention: bool,
    softcap: float | None,
    sinks: torch.Tensor | None = None,
    bookkeeping: bool = True,
):
    """Attention of ``query`` (the forward's newest rows) over a compacted layer, then the layer's bookkeeping
    (none for a layer that reuses another's keys: ``bookkeeping=False``).

    The fused kernel (`think_cache.kernels`, chosen by `kernels.use_kernel`: on CUDA, never with a ``softcap`` nor
    attention ``sinks``)
    serves the forwards that ask for no attention weights (each token's summed weight, which H2O accumulates, it
    gives too, from a float32 block of every row's logits: so only while that block fits `ROW_CHUNK_ELEMENTS`), with
    no query row that must see recent tokens thinned (`ThinKLayer.thinned_rows`) nor earlier
    questions whole (`ThinKLayer.restored`: a chat's later prompt). The rest takes the torch path, whose float32
    logits are built a chunk of query rows at a time (`ROW_CHUNK_ELEMENTS`): a long later prompt over a long
    context stays within one chunk's memory.
    """
    q_len = query.shape[2]
    group = query.shape[1] // layer.keys.shape[1]
    restored = layer.restored(q_len, group)
    thinned_rows = layer.thinned_rows(q_len)
    n_total = layer.compact_tokens + layer.keys.shape[-2]
    stored_mask = layer.attention_mask(mask, q_len)
    scores = bookkeeping and layer.token_scores is not None  # H2O: each stored token's weight too
    if (
        not wants_attention
        and restored is None
        and thinned_rows is None
        and (not scores or query.numel() // query.shape[-1] * n_total <= ROW_CHUNK_ELEMENTS)
        and kernels.use_kernel(layer.store, query.device, softcap, sinks)
        and not wants_grad(query)  # the kernel has no backward
    ):
        result = kernels.store_attention(
            query, layer.store, layer.keys, layer.values, stored_mask, scale, token_weights=scores
        )
        out, token_weights = result if scores else (result, None)
        if bookkeeping:
            layer.after_attention(mask, token_weights)
        return out, None
    thinned = thinned_views(layer.store, layer.keys, layer.values, thinned_rows, group)
    rows = _row_chunk(query.shape[0] * query.shape[1], n_total, q_len)
    outs, weights, token_weights = [], [], None
    for start in range(0, q_len, rows):  # one pass, unless a long forward (a later prompt) meets a long context
        stop = min(start + rows, q_len)
        thinned_chunk = None
        if thinned is not None:
            thinned_chunk = [replace(v, mask=_group_rows(v.mask, group, q_len, start, stop)) for v in thinned]
        restored_rows = None
        if restored is not None:
            restored_rows = replace(restored, rows=_group_rows(restored.rows, group, q_len, start, stop))
        probs = compact_probs(
            query[:, :, start:stop],
            layer.store,
            layer.keys,
            _mask_rows(stored_mask, start, stop, q_len, n_total, query.device),
            scale,
            thinned_chunk,
            softcap,
            restored_rows,
            sinks,
        )
        outs.append(weighted_values(probs, layer.store, layer.values, thinned_chunk))
        if wants_attention:
            weights.append(_weights_per_token(layer, probs).to(query.dtype))
        # a policy that accumulates attention (H2O) gets each stored token's weight, summed over its group's queries
        if scores:
            chunk_weights = probs.sum(dim=(2, 3))
            token_weights = chunk_weights if token_weights is None else token_weights + chunk_weights
        del probs
    if bookkeeping:
        layer.after_attention(mask, token_weights)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out, (torch.cat(weights, dim=2) if wants_attention else None)


#: The most float32 logits one chunk of query rows builds over a compacted layer (`_attend_compacted`'s torch
#: path): 2**26 (256 MiB). A decoding step is one chunk; a later prompt of 4k tokens over a 32k-token context on an
#: 8B-shaped model (32 query heads) is split into chunks of 64 rows instead of one 16 GiB block.
ROW_CHUNK_ELEMENTS = 2**26


def _row_chunk(batch_x_heads: int, n_total: int, q_len: int) -> int:
    """Query rows per chunk: as many as fit `ROW_CHUNK_ELEMENTS` logits, at least one."""
    return max(1, min(q_len, ROW_CHUNK_ELEMENTS // max(batch_x_heads * n_total, 1)))


def _mask_rows(mask: torch.Tensor | None, start: int, stop: int, q_len: int, n_total: int, device) -> torch.Tensor:
    """The mask rows of queries ``start:stop`` of ``q_len`` (None, for every row: causal, the queries the newest)."""
    if start == 0 and stop == q_len:
        return mask
    if mask is not None:
        return mask[:, :, start:stop]
    return causal_mask(q_len, n_total, device, start, stop)


def _group_rows(rows: torch.Tensor | None, group: int, q_len: int, start: int, stop: int) -> torch.Tensor | None:
    """The rows ``start:stop`` of a per-row tensor laid out group member by member (``(group * q_len, ...)``)."""
    if rows is None or (start == 0 and stop == q_len):
        return rows
    return rows.view(group, q_len, *rows.shape[1:])[:, start:stop].reshape(group * (stop - start), *rows.shape[1:])


def _stored_columns(mask: torch.Tensor | None, stored: int) -> torch.Tensor | None:
    """The columns of a forward's mask that belong to the stored tokens (a mask over logical positions, as a
    policy's layers get, is longer than what a sliding layer still stores)."""
    if mask is None or mask.shape[-1] == stored:
        return mask
    return mask[..., mask.shape[-1] - stored :]


def _wants_attention_weights(module: torch.nn.Module, kwargs: dict) -> bool:
    """Whether this forward was asked for attention weights (transformers passes ``output_attentions`` down to the
    attention function; a model config's ``output_attentions`` applies when the call says nothing)."""
    wanted = kwargs.get("output_attentions")
    if wanted is None:
        return output_attentions(getattr(module, "config", None))
    return bool(wanted)


def _eager_attention(
    module, query, key, value, attention_mask, dropout: float, scale: float, softcap=None, sinks=None, weights=True
):
    """Plain attention that also returns its weights ``(batch, q_heads, q_len, keys)``, like transformers' eager
    (with Gemma 2's logit ``softcap`` and GPT-OSS's attention ``sinks`` when given). Without weights asked for (a
    capped model's or GPT-OSS's prompt), a chunk of query rows at a time (`ROW_CHUNK_ELEMENTS`): a long prompt's
    float32 logits stay within one chunk's memory."""
    wants_weights = weights or bool(dropout and module.training)
    q_len, n_keys = query.shape[2], key.shape[2]
    rows = q_len if wants_weights else _row_chunk(query.shape[0] * query.shape[1], n_keys, q_len)
    outs = []
    for start in range(0, q_len, rows):
        stop = min(start + rows, q_len)
        mask = _mask_rows(attention_mask, start, stop, q_len, n_keys, query.device)
        probs = compact_probs(query[:, :, start:stop], None, key, mask, scale, softcap=softcap, sinks=sinks)
        if dropout and module.training:
            probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
        outs.append(weighted_values(probs, None, value))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out, (probs.flatten(1, 2).to(query.dtype) if wants_weights else None)


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
