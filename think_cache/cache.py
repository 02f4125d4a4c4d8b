"""`ThinKCache`: the user-facing cache, a thin container of `ThinKLayer` objects like transformers' caches."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from numbers import Real
from typing import TYPE_CHECKING

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from . import _compat, quant
from ._checks import check_bits, check_int
from .attention import ATTENTION_NAME, current_linear_config, current_module, forget_shared, hand_off
from .layer import LayerStats, ThinKLayer, ThinKSlidingLayer, compacts, storage_bytes
from .policies import Policy, check_policy
from .static import STATIC_SINKS, StaticThinKLayer
from .static_quant import QuantizedStaticThinKLayer
from .storage import CompactStore, FullStore, QuantizedStore

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ThinKCache", "CacheStats", "held_bytes"]


def _plain_tensors(t: torch.Tensor):
    """``t``, or for a wrapper tensor subclass (optimum-quanto's quantized tensors in transformers'
    ``QuantizedCache``) the plain tensors it holds, found through ``__tensor_flatten__``."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        yield t
        return
    names, _ = t.__tensor_flatten__()
    for name in names:
        yield from _plain_tensors(getattr(t, name))


def _layer_tensors(layer: object):
    """The tensors a cache layer holds: a ThinK layer's own, or a stock layer's attributes (tensors, and the
    dictionaries of states of a linear-attention layer)."""
    if isinstance(layer, ThinKLayer):
        yield from layer.tensors()
        return
    for value in vars(layer).values():
        if isinstance(value, dict):
            yield from (state for state in value.values() if isinstance(state, torch.Tensor))
        elif isinstance(value, torch.Tensor):
            yield value


def held_bytes(cache: Cache) -> int:
    """Bytes of the tensor storages any transformers cache holds (a `ThinKCache` or a stock one, including
    ``QuantizedCache``'s quantized tensors and a hybrid model's linear-attention states), measured."""
    if not isinstance(cache, Cache):
        raise TypeError(
            f"held_bytes takes a transformers Cache (a ThinKCache, DynamicCache, ...), got {type(cache).__name__}"
            + (" (a generate output without a cache: use_cache=False?)" if cache is None else "")
        )
    layers = [*cache.layers, *getattr(cache, "_hybrid_states", {}).values()]  # Falcon-H1's states beside ThinK's
    return storage_bytes(plain for layer in layers for t in _layer_tensors(layer) for plain in _plain_tensors(t))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _check_ratio(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__} {value!r}")
    if not 0 <= value < 1:
        raise ValueError(
            f"{name} must be in [0, 1), got {value!r}: it is the fraction of channels pruned (0.5 keeps half, "
            "0 keeps all)"
        )
    return float(value)


def _check_group_size(group_size: object, bits: int | None) -> int | None:
    if group_size is None:
        return None if bits is None else quant.default_group_size(bits)
    if bits is None:
        raise ValueError(
            f"group_size={group_size!r} applies to quantized storage only: pass bits=2, 4 or 8 with it (or leave "
            "group_size out)"
        )
    return check_int("group_size", group_size, 1)


_UNPATCHED = (
    "ThinKCache needs the ThinK attention, and this model has not been patched: call `think_cache.patch(model)` once "
    "before using ThinKCache with it."
)
_SWITCHED = (
    "ThinKCache needs the ThinK attention, but the model now uses attn_implementation={!r}. Call "
    "`think_cache.patch(model)` again after changing the attention implementation."
)
_ANOTHER_MODEL = (
    "This ThinKCache was filled by another model. Use one ThinKCache per model, or call `cache.reset()` before "
    "reusing it."
)


def _fingerprint(config) -> tuple:
    """What tells one model's attention layers from another's: a copied or unpickled config gives the same."""
    names = (
        "model_type",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "head_dim",
        "sliding_window",
        "layer_types",
        "vocab_size",
    )
    return tuple(repr(_compat.config_value(config, name)) for name in names)


def _layer_kind_error(layer_idx: int, wanted: str, held: str) -> str:
    return (
        f"Layer {layer_idx} of this model is {wanted} layer, but this ThinKCache holds {held} there: it was filled by "
        "another model. Use a new ThinKCache (or `cache.reset()`) for this model."
    )


def _check_static(cache: ThinKCache) -> None:
    """Refuse, where the settings enter, what a static cache cannot do yet."""
    if cache.bits is not None and cache.policy is not None and cache.policy.evicts_while_decoding:
        raise ValueError(
            f"ThinKCache(max_cache_len=..., bits=...) does not support {type(cache.policy).__name__}: it evicts "
            "tokens while decoding, and a static cache's later tokens take the freed slots one by one, which would "
            "scatter a quantized block's tokens over the slots. Use SnapKV or no policy with bits and "
            "max_cache_len, or leave one of bits and max_cache_len out."
        )


@dataclass(frozen=True)
class CacheStats:
    """Memory held by a `ThinKCache`, per layer and in total, against a ``DynamicCache`` on the same inputs.

    The layers are the attention layers; a hybrid model's recurrent states (linear-attention and Mamba layers),
    which ThinK leaves as they are and ``DynamicCache`` holds alike, are ``state_bytes`` apart."""

    layers: tuple[LayerStats, ...]
    state_bytes: int = 0

    @property
    def stored_bytes(self) -> int:
        """Bytes of the tensors the cache holds (their storages, measured)."""
        return sum(layer.stored_bytes for layer in self.layers)

    @property
    def dense_bytes(self) -> int:
        """Bytes a transformers ``DynamicCache`` would hold for the same tokens."""
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        """``stored_bytes / dense_bytes`` (1.0 for an empty cache)."""
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def saved_bytes(self) -> int:
        """``dense_bytes - stored_bytes`` (negative where the cache holds more, as a static one can)."""
        return self.dense_bytes - self.stored_bytes

    @property
    def static_bytes(self) -> int | None:
        """Bytes a transformers ``StaticCache`` of the same ``max_cache_len`` would hold in the static layers (None
        for a cache without ``max_cache_len``); compare it with those layers' ``stored_bytes``."""
        static = [layer.static_bytes for layer in self.layers if layer.static_bytes is not None]
        return sum(static) if static else None

    @property
    def tokens(self) -> int:
        """Tokens seen (the logical sequence length)."""
        return max((layer.tokens for layer in self.layers), default=0)

    def to_dict(self) -> dict:
        """Plain data, for JSON."""
        return {
            "stored_bytes": self.stored_bytes,
            "dense_bytes": self.dense_bytes,
            "ratio": self.ratio,
            "tokens": self.tokens,
            "static_bytes": self.static_bytes,
            "state_bytes": self.state_bytes,
            "layers": [{**vars(layer), "ratio": layer.ratio} for layer in self.layers],
        }

    def __str__(self) -> str:
        header = "layer", "tokens", "stored", "compact", "k ch", "v ch", "bits", "held", "dense", "ratio"
        table = [header] + [
            (
                str(s.layer_idx),
                str(s.tokens),
                str(s.stored_tokens),
                str(s.compact_tokens),
                f"{s.key_channels}/{s.head_dim}",
                f"{s.value_channels}/{s.head_dim}",
                str(s.bits or "-"),
                human_bytes(s.stored_bytes),
                human_bytes(s.dense_bytes),
                f"{s.ratio:.3f}",
            )
            for s in self.layers
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        rows = [" ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in table]
        saved = self.saved_bytes
        rows.append(
            f"total: {human_bytes(self.stored_bytes)} held vs {human_bytes(self.dense_bytes)} for DynamicCache "
            f"({self.ratio:.3f}x, {human_bytes(abs(saved))} {'saved' if saved >= 0 else 'more'})"
        )
        if self.state_bytes:
            rows.append(
                f"plus {human_bytes(self.state_bytes)} of recurrent states (linear-attention and Mamba layers), held "
                "alike by DynamicCache"
            )
        static = self.static_bytes
        if static is not None:
            held = sum(layer.stored_bytes for layer in self.layers if layer.static_bytes is not None)
            rows.append(
                f"static layers: {human_bytes(held)} held vs {human_bytes(static)} for a StaticCache of the same "
                f"max_cache_len ({held / static:.3f}x; both allocate their slots up front)"
            )
        return "\n".join(rows)


class ThinKCache(Cache):
    """A drop-in KV cache that keeps only the key channels that matter (ThinK, arXiv 2407.21018).

    At the end of the prompt, per layer, batch row and KV head, each key channel ``c`` is scored with the last
    ``window`` prompt queries by ``||Q_win[:, c]|| * ||K[:, c]||``; the top ``ceil((1 - key_ratio) * head_dim)``
    channels are kept. Every prompt token is stored with the kept channels only, except that the pruned channels
    of the prompt's last ``window`` tokens (its question) are kept aside so that a later chat turn sees that question
    whole (not on sliding-window layers); generated tokens wait at full width until 32 have gathered, then fold in
    (set ``recent`` to keep more of the newest tokens at full width).

    Each ``generate`` call on a filled cache is a new turn: its prompt is fed as a later prompt and its tokens fold
    on their own schedule, so generating 10 tokens and then 40 more is not bit-identical to 50 in one call (logits
    within about 5e-3 on the Llama, Mistral and Qwen2 test models; up to about 0.1 on Qwen3's, where pruning at all
    moves them as much; under a policy the kept tokens may differ). A policy's budget applies to the first prompt;
    a later turn's prompt is kept whole through its own forward: SnapKV keeps it, while H2O and StreamingLLM cut the
    layer back to the budget, however far over it is, at the next fold of a block (the first decoding step after a
    prompt of more than 32 tokens; a shorter one leaves the layer within the budget and a block until then).

    With a token eviction ``policy`` (`SnapKV`, `H2O`, `StreamingLLM`), the policy first picks which tokens each
    KV head keeps, then ThinK thins every kept token.

    In a hybrid model (Qwen3-Next, Qwen3.5, Granite 4.0-H, Jamba, OLMo Hybrid), ThinK serves the attention layers;
    the linear-attention layers keep their fixed-size recurrent states in transformers' own ``LinearAttentionLayer``,
    as ``DynamicCache`` does (`attention_layers` lists the ThinK layers; `stats` counts the states apart); Falcon-H1's
    states, beside attention in each layer, sit beside its ThinK layers. In a model whose last layers reuse an
    earlier layer's keys (Gemma 4 E2B/E4B, Gemma 3n), those layers attend over that ThinK layer and store nothing.

    Use it on a model patched once with `think_cache.patch(model)`::

        cache = ThinKCache(key_ratio=0.5, policy=SnapKV(budget=1024))
        model.generate(**inputs, cache=cache, max_new_tokens=64)  # past_key_values= before transformers 5.24

    Parameters
    ----------
    key_ratio:
        Fraction of key channels pruned, in [0, 1). 0 keeps all (the cache then equals ``DynamicCache``, or
        with ``bits`` set, quantizes every channel: KIVI-style storage alone); the paper uses 0.4 to 0.5.
    value_ratio:
        Fraction of value channels pruned, in [0, 1), scored by the window's attention-weighted value norms.
    window:
        Observation window: how many of the last prompt queries score the channels (every query head of a
        KV head's group counts). Those tokens' pruned key channels are kept aside for a later turn, so memory grows
        with it: on a 300-token prompt at key ratio 0.5, 0.76x DynamicCache's bytes with 8, 0.78x with 32, 0.86x
        with 128.
    recent:
        How many newest tokens stay at full width (default 0: every token is thinned). A full-width token keeps
        every channel's share of its logit while thinned tokens lose the pruned channels' share, so in one
        softmax the full-width tokens draw attention away from older ones: on SmolLM2 at 2k tokens, key_ratio
        0.4 with ``recent=32`` lost 6 of 48 pass keys that ``recent=0`` found. Under a policy the full-width
        tokens also take a share of the budget's saving. At most the policy's budget.
    policy:
        A token eviction `Policy`, or None to keep every token.
    bits:
        None (the default) keeps the compact part in the model's dtype; 2, 4 or 8 stores it as packed codes, KIVI-style:
        keys per channel with a scale and zero point per block of 16 tokens (8 at 4 bits, 32 at 8), values per token
        with a scale and zero point per ``group_size`` channels (a scale alone at 4 bits, symmetric); zero points in
        the model's dtype, scales too except at 4 bits (one byte each). Tokens are quantized once, when they fold;
        the full-width part (the newest tokens) stays in full precision. Key ratio 0.5 with 4 bits holds 0.25x of
        DynamicCache's bytes, with 2 bits 0.15x (head_dim 64, bfloat16, counting the question's pruned key channels
        kept as 8-bit codes for a later turn).
    group_size:
        Value channels per scale and zero point when ``bits`` is set (default 32, 64 at 2 bits; the last group of
        a pruned value width holds the remainder). Smaller groups are more accurate and cost more scales.
    max_cache_len:
        None (the default): the cache grows as needed. An int ``N``: a static, compileable cache for at most ``N``
        tokens (prompt + generated), like transformers' ``StaticCache``: its buffers are allocated at the end of the
        prompt and every decoding step has static shapes, so ``torch.compile`` (and ``generate``'s automatic
        compile) capture it whole, with the same answers as the dynamic cache (`think_cache.static`). It holds
        its whole capacity from the prompt's end on; under `StreamingLLM` or `H2O` its buffers hold the budget plus
        a fold block, whatever ``N``. With ``bits`` (no policy or `SnapKV`) its slots hold packed codes and each
        block of 32 is quantized in the step that folds it, as in the dynamic cache (`think_cache.static_quant`):
        0.31x the bytes of ``StaticCache`` at key ratio 0.5, 4 bits, head_dim 64, bfloat16, N = 1024. Not yet with
        ``bits`` under `StreamingLLM` or `H2O`, nor with sliding-window layers.
    """

    def __init__(
        self,
        key_ratio: float = 0.5,
        *,
        value_ratio: float = 0.0,
        window: int = 32,
        recent: int = 0,
        policy: Policy | None = None,
        bits: int | None = None,
        group_size: int | None = None,
        max_cache_len: int | None = None,
    ):
        self.key_ratio = _check_ratio("key_ratio", key_ratio)
        self.bits = check_bits(bits, quant.BITS, optional=True)
        self.group_size = _check_group_size(group_size, self.bits)
        self.value_ratio = _check_ratio("value_ratio", value_ratio)
        self.window = check_int("window", window, 1)
        self.policy = check_policy(policy)
        self.recent = check_int("recent", recent, 0)
        if policy is not None and policy.budget is not None and self.recent > policy.budget:
            raise ValueError(
                f"recent ({self.recent}) is larger than the policy's budget ({policy.budget}): the full-width recent "
                "tokens are always kept, so they must fit in the budget"
            )
        self._max_cache_len = None if max_cache_len is None else check_int("max_cache_len", max_cache_len, 1)
        if self.max_cache_len is not None:
            _check_static(self)
        self._model_config = None
        self._model_fingerprint = None
        self._model_module = None  # (layer index, weak reference) of an attention module of the model served
        self._prompt_start, self._prompt_end = 0, None
        self._first_attention = None  # the index of the first ThinK layer (0 but in a hybrid model)
        self._hybrid_states = {}  # layer index -> the recurrent state beside a ThinK layer (Falcon-H1)
        super().__init__(layers=[])

    # ------------------------------------------------------------------------------------------- update
    def _new_store(self) -> CompactStore:
        """The storage kind of the compact part: the one place where ``bits`` matters."""
        if self.bits is None:
            return FullStore()
        return QuantizedStore(self.bits, self.group_size)

    def check_layer(self, module: torch.nn.Module) -> None:
        """Refuse settings that the attention layer ``module`` cannot serve (raised when its cache layer is built, and
        by ``think_cache.patch(model, **settings)`` for every layer, before any forward)."""
        if self.max_cache_len is not None and getattr(module, "sinks", None) is not None:
            raise ValueError(STATIC_SINKS)
        if _compat.shares_kv(module.config) and (self.max_cache_len is not None or self.policy is not None):
            if self.max_cache_len is not None or self.policy.evicts_while_decoding:
                raise ValueError(
                    "Some layers of this model reuse an earlier layer's keys and values (Gemma 4's KV sharing), which "
                    "ThinKCache serves without max_cache_len and with no policy or SnapKV: "
                    f"{'max_cache_len' if self.max_cache_len is not None else type(self.policy).__name__} would "
                    "change those keys between the layer that stores them and the layers that reuse them."
                )
        chunked = _compat.is_chunked(module)
        if self.policy is not None and chunked:
            raise ValueError(
                f"ThinKCache(policy={type(self.policy).__name__}(...)) does not support chunked-attention layers yet "
                f"(Llama 4: this model's layer {module.layer_idx} sees only its chunk of "
                f"{module.config.attention_chunk_size} tokens, which a policy's choice of tokens does not follow); "
                "use ThinK without a policy on this model."
            )
        sliding_window = _compat.sliding_window_of(module)
        if sliding_window is not None and self.max_cache_len is not None:
            kind = (
                f"chunked-attention layers yet (Llama 4: this model's layer {module.layer_idx} sees chunks of "
                if chunked
                else f"sliding-window layers yet (this model's layer {module.layer_idx} has a window of "
            )
            raise ValueError(
                f"ThinKCache(max_cache_len=...) does not support {kind}{sliding_window}); use a ThinKCache without "
                "max_cache_len."
            )

    def _new_layer(self, module: torch.nn.Module) -> ThinKLayer:
        self.check_layer(module)
        kwargs = dict(
            key_ratio=self.key_ratio,
            value_ratio=self.value_ratio,
            window=self.window,
            recent=self.recent,
            policy=self.policy,
            store=self._new_store(),
        )
        sliding_window = _compat.sliding_window_of(module)
        if sliding_window is not None:
            return ThinKSlidingLayer(sliding_window=sliding_window, **kwargs)
        if self.max_cache_len is not None:
            static = StaticThinKLayer if self.bits is None else QuantizedStaticThinKLayer
            return static(max_cache_len=self.max_cache_len, **kwargs)
        return ThinKLayer(**kwargs)

    def _check_module(self, module: torch.nn.Module | None, key_states: torch.Tensor, layer_idx: int) -> None:
        if module is None:
            raise RuntimeError(_UNPATCHED)
        # the attention a model runs changes between forwards only: read it (a slow config lookup, 15 µs) at the
        # first layer of each forward and at a new layer
        implementation = ATTENTION_NAME
        if layer_idx == self._first_attention or layer_idx >= len(self.layers):
            implementation = _compat.attn_implementation(module)
        if implementation != ATTENTION_NAME:
            raise RuntimeError(_SWITCHED.format(implementation))
        if module.layer_idx != layer_idx:  # a module left behind by a forward interrupted inside it (Ctrl-C skips
            raise RuntimeError(_UNPATCHED)  # the hook that clears it): this call comes from a module not patched
        if module.training and _compat.attention_dropout(module):  # refused before anything is stored
            raise NotImplementedError(
                "ThinKCache is an inference cache: attention dropout in training mode is not supported (call "
                "model.eval())."
            )
        if module.config is not self._model_config:  # first use, a copy or unpickled cache, or another model
            self._model_fingerprint = self.check_model(module.config)
            self._model_config = module.config
        if self._model_module is None:  # the very model, by one of its modules (a layer index, a weak reference)
            self._model_module = (layer_idx, weakref.ref(module))
        elif layer_idx == self._model_module[0] and self._model_module[1]() is not module:
            raise ValueError(_ANOTHER_MODEL)  # two models built from one config object share it
        if layer_idx < len(self.layers) and self.layers[layer_idx].is_initialized:
            keys = self.layers[layer_idx].keys
            if keys.shape[0] != key_states.shape[0]:
                raise ValueError(
                    f"This ThinKCache holds a batch of {keys.shape[0]} but the model was called with a batch of "
                    f"{key_states.shape[0]}. Use a new ThinKCache (or `cache.reset()`) for a new batch."
                )
            if keys.dtype != key_states.dtype:
                raise ValueError(
                    f"This ThinKCache holds {keys.dtype} keys but the model now computes {key_states.dtype} ones (a "
                    "model converted, or autocast turned on, after the cache was filled). Use a new ThinKCache (or "
                    "`cache.reset()`) for the model in its new dtype."
                )

    def check_model(self, config: PretrainedConfig) -> tuple:
        """Refuse a cache filled by a model other than the one of ``config`` (its attention layers' config, the text
        model's in a model that sees images); returns that model's fingerprint."""
        if config is self._model_config:
            return self._model_fingerprint
        fingerprint = _fingerprint(config)  # a copied or unpickled cache holds no config: its fingerprint tells
        if self._model_config is not None or fingerprint != (self._model_fingerprint or fingerprint):
            raise ValueError(_ANOTHER_MODEL)
        return fingerprint

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens of layer ``layer_idx``; called by the model's attention modules."""
        if _compat.is_compiling():
            layer, shared = self._compiled_layer(layer_idx), False
        else:
            module = current_module()
            layer = self._eager_layer(module, key_states, layer_idx)
            shared = _compat.stores_shared_kv(module)
        keys, values = layer.update(key_states, value_states)
        hand_off(layer, keys, shared)
        return keys, values

    def _compiled_layer(self, layer_idx: int) -> ThinKLayer:
        """The layer a compiled decoding step updates: a static cache's (static shapes, no thread-local state)."""
        if self.max_cache_len is None:
            raise RuntimeError(
                "ThinKCache cannot run under torch.compile: its compact part changes shape as channels are pruned "
                "and tokens fold in. Run the model uncompiled with ThinKCache (is_compileable is False)."
            )
        if layer_idx >= len(self.layers):
            raise RuntimeError(
                "A static ThinKCache's prompt runs eagerly and only its decoding steps compiled, but a compiled "
                "forward met this cache empty (a prompt): compile the decoding step only. `generate` does so by "
                "itself (leave `model.forward` uncompiled); in a loop of your own, run the prompt with the model, "
                "then the steps with `torch.compile(model)`."
            )
        return self.layers[layer_idx]

    def _eager_layer(self, module: torch.nn.Module | None, key_states: torch.Tensor, layer_idx: int) -> ThinKLayer:
        """The layer an eager forward updates, built on first use, told where the prompt ends."""
        self._check_module(module, key_states, layer_idx)
        if layer_idx == self._first_attention or not self.layers:  # a new forward: the last one's shared keys
            forget_shared()  # (Gemma 4) are done with
        while len(self.layers) <= layer_idx:
            if self._first_attention is None:
                self._first_attention = len(self.layers)
            self.layers.append(self._new_layer(module))
        layer = self.layers[layer_idx]
        if not isinstance(layer, ThinKLayer):
            raise ValueError(_layer_kind_error(layer_idx, "an attention", "a linear-attention state"))
        layer.prompt_start, layer.prompt_end = self._prompt_start, self._prompt_end
        return layer

    # ------------------------------------------------------------------------- linear attention (hybrids)
    def _linear_state(self, layer_idx: int):
        """The recurrent state of layer ``layer_idx``, for the model this cache serves. A linear-attention layer's is
        the layer itself: transformers' own `LinearAttentionLayer`, built where the model first asks for it (layers
        are visited in order, so every earlier one exists by then). A layer of both kinds (Falcon-H1: Mamba beside
        attention) keeps one beside its ThinK layer, in ``_hybrid_states``. The model is checked first, so that
        another model's forward cannot read or overwrite a state."""
        if _compat.is_compiling():  # a static cache's compiled step: every state exists, the model was checked
            return self._hybrid_states[layer_idx] if layer_idx in self._hybrid_states else self.layers[layer_idx]
        config = current_linear_config()
        if config is None:
            raise RuntimeError(_UNPATCHED)
        if config is not self._model_config:
            self._model_fingerprint = self.check_model(config)
            self._model_config = config
        if layer_idx == 0 and _compat.config_attn_implementation(config) != ATTENTION_NAME:  # before a state is
            raise RuntimeError(_SWITCHED.format(_compat.config_attn_implementation(config)))  # written
        if config.layer_types[layer_idx] in _compat.BOTH_LAYER_TYPES:
            if layer_idx not in self._hybrid_states:
                self._hybrid_states[layer_idx] = _compat.LinearAttentionLayer()
            return self._hybrid_states[layer_idx]
        if layer_idx == len(self.layers):
            self.layers.append(_compat.LinearAttentionLayer())
        elif layer_idx > len(self.layers):
            raise RuntimeError(
                f"ThinKCache builds its layers as the model visits them in order, but layer {layer_idx} asked for its "
                f"state before layer {len(self.layers)} ran"
            )
        elif not isinstance(self.layers[layer_idx], _compat.LinearAttentionCacheLayerMixin):
            raise ValueError(_layer_kind_error(layer_idx, "a linear-attention", "attention keys and values"))
        return self.layers[layer_idx]

    def _linear_states(self) -> list:
        """Every recurrent state held: the linear-attention layers and the states beside ThinK layers."""
        linear = [layer for layer in self.layers if not isinstance(layer, ThinKLayer)]
        return linear + list(self._hybrid_states.values())

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        state = self._linear_state(layer_idx)
        return state.conv_states[state_idx] if state.has_previous_state[state_idx] else None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> torch.Tensor | None:
        state = self._linear_state(layer_idx)
        return state.recurrent_states[state_idx] if state.has_previous_state[state_idx] else None

    def update_conv_state(
        self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs
    ) -> torch.Tensor:
        """A hybrid model's convolution state of layer ``layer_idx``, updated (transformers' `LinearAttentionLayer`)."""
        return self._linear_state(layer_idx).update_conv_state(conv_states, state_idx, **kwargs)

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs
    ) -> torch.Tensor:
        """A hybrid model's recurrent state of layer ``layer_idx``, updated (transformers' `LinearAttentionLayer`)."""
        return self._linear_state(layer_idx).update_recurrent_state(recurrent_states, state_idx, **kwargs)

    def is_recording_past(self, layer_idx: int) -> bool:
        return getattr(self._linear_state(layer_idx), "record_past", False)

    def activate_past_recording(self) -> None:
        """Let the recurrent states keep their past until the next `crop` (transformers asks this of the cache it is
        given back; the attention layers keep their tokens anyway)."""
        for layer in [*self.layers, *self._hybrid_states.values()]:
            if hasattr(layer, "activate_past_recording"):
                layer.activate_past_recording()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows of ``beam_idx`` (beam search), in every layer and state."""
        super().reorder_cache(beam_idx)
        for state in self._hybrid_states.values():
            state.reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices``, in every layer and recurrent state (transformers' linear-attention
        layers have no such method of their own)."""
        for layer in self.attention_layers:
            layer.batch_select_indices(indices)
        self._map_states(lambda state: state[indices.to(state.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times, in every layer and recurrent state."""
        for layer in self.attention_layers:
            layer.batch_repeat_interleave(repeats)
        self._map_states(lambda state: state.repeat_interleave(repeats, dim=0))

    def _map_states(self, fn) -> None:
        for holder in self._linear_states():
            for states in (holder.conv_states, holder.recurrent_states):
                for index, state in states.items():
                    if state is not None:
                        states[index] = fn(state)

    @property
    def attention_layers(self) -> list[ThinKLayer]:
        """The ThinK layers, in order: every layer but a hybrid model's linear-attention ones."""
        return [layer for layer in self.layers if isinstance(layer, ThinKLayer)]

    # ---------------------------------------------------------------------------------------- cache API
    def get_seq_length(self, layer_idx: int | None = 0) -> int | torch.Tensor:
        """Tokens seen by layer ``layer_idx`` (logical length, not the stored one). A static cache returns a 0-d
        tensor after the prompt, as transformers' ``StaticCache`` does, so that compiled steps read it."""
        layer_idx = layer_idx or 0
        if layer_idx >= len(self.layers):
            return 0
        if not isinstance(self.layers[layer_idx], ThinKLayer):  # a hybrid model's linear-attention layer
            if layer_idx:
                return super().get_seq_length(layer_idx)  # transformers' error: it counts no tokens
            if self._first_attention is None or self._first_attention >= len(self.layers):
                return 0  # the first forward has not reached an attention layer
            layer_idx = self._first_attention  # the default: the first attention layer, as transformers does
        return self.layers[layer_idx].get_seq_length()

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int) -> tuple[int, int]:
        q_len = _compat.query_length(query_length)
        if layer_idx >= len(self.layers) or not isinstance(self.layers[layer_idx], ThinKLayer):
            return q_len, 0
        return self.layers[layer_idx].get_mask_sizes(q_len)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # transformers < 5
        """`get_max_length` under transformers 4.x's name."""
        return self.get_max_length()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens (as transformers' `crop`); only the full-width recent part can be cut."""
        count = _compat.crop_count(tokens_to_remove, int(self.get_seq_length()))
        if not all(getattr(state, "record_past", False) for state in self._linear_states()):  # before any is cut
            raise ValueError(
                "This hybrid model's linear-attention layers keep a recurrent state that cannot be cut back to an "
                "earlier token (as in DynamicCache): crop is not possible on its cache."
            )
        for layer in [*self.layers, *self._hybrid_states.values()]:
            layer.crop(count)

    def reset(self) -> None:
        """Forget every token and layer (the settings stay); the cache can then serve another model or batch.

        The layers are dropped, not emptied: their kind (full or sliding window) belongs to the model that filled
        them, and the next model's first forward builds its own.
        """
        self.layers = []
        self._model_config = self._model_fingerprint = self._model_module = None
        self._prompt_start, self._prompt_end = 0, None
        self._first_attention = None
        self._hybrid_states = {}

    # ------------------------------------------------------------------------------------------ schedule
    def mark_prompt_end(self, length: int | None) -> None:
        """Say that the prompt is ``length`` tokens long in all (None: not known). The patched ``generate`` does
        this for every call, so users rarely need it.

        Each layer is compacted (channels and a policy's tokens chosen) when the prompt ends, from the prompt's
        last ``window`` queries, however the prompt was fed (in one forward, in chunks with
        ``prefill_chunk_size``, or together with an assistant's drafts). Without it, the first single-token
        forward after the prompt marks the end.
        """
        seen = int(self.get_seq_length())
        if length is not None:
            length = check_int("length", length, 0)
            if length < seen:
                raise ValueError(
                    f"The prompt's length ({length}) is less than the {seen} tokens already in the cache: it counts "
                    "the whole sequence, the cached tokens and the new ones (`mark_prompt_end(cached + new)`); "
                    "to start over, `cache.reset()` first."
                )
        self._prompt_start, self._prompt_end = seen, length

    def compact(self) -> None:
        """Compact every layer now, with the queries seen so far (e.g. to measure the saving after a plain forward
        over a prompt). Normally layers compact by themselves when generation starts."""
        for layer in self.attention_layers:
            if layer.is_initialized and layer.prunes and not layer.is_compacted and layer.window_queries is not None:
                layer.compact()

    def __getstate__(self) -> dict:
        # copies and pickles do not drag the model's config along; the fingerprint still recognises the model
        state = dict(self.__dict__)
        state["_model_config"] = state["_model_module"] = None
        return state

    @property
    def max_cache_len(self) -> int | None:
        """Tokens a static cache holds (prompt + generated); None for a cache that grows."""
        return self._max_cache_len

    @property
    def prunes(self) -> bool:
        """Whether its layers ever compact (`layer.compacts`; a static cache's always do, to allocate their buffers).
        A cache that does not holds every token whole, as ``DynamicCache`` does."""
        return self.max_cache_len is not None or compacts(self.key_ratio, self.value_ratio, self.policy, self.bits)

    @property
    def is_compileable(self) -> bool:
        """Whether transformers may compile the decoding step: only a static cache (``max_cache_len``)."""
        return self.max_cache_len is not None

    @property
    def is_croppable(self) -> bool:
        """Whether `crop` can undo the newest forward exactly: not under a policy that evicts while decoding, nor in
        a static cache."""
        if self.max_cache_len is not None:
            return False
        linear_ok = all(state.is_croppable for state in self._linear_states())
        return linear_ok and (self.policy is None or not self.policy.evicts_while_decoding)

    # ------------------------------------------------------------------------------------------- report
    def stats(self) -> CacheStats:
        """Tokens, kept channels and bytes held per layer, against a ``DynamicCache`` on the same inputs.

        Per attention layer; a hybrid model's recurrent states, the same as in ``DynamicCache``, are counted apart
        (``state_bytes``; `held_bytes` counts everything)."""
        layers = tuple(layer.stats(i) for i, layer in enumerate(self.layers) if isinstance(layer, ThinKLayer))
        states = storage_bytes(t for state in self._linear_states() for t in _layer_tensors(state))
        return CacheStats(layers, states)

    def plot_channels(self, batch_index: int = 0, ax: Axes | None = None, title: str | None = None) -> Figure:
        """Heat map of the kept key channels per layer and KV head; returns a matplotlib Figure
        (needs ``think-cache[plot]``)."""
        from .plotting import plot_channels

        return plot_channels(self, batch_index, ax=ax, title=title)

    def __repr__(self) -> str:
        settings = (
            f"key_ratio={self.key_ratio}, value_ratio={self.value_ratio}, window={self.window}, recent={self.recent}"
        )
        if self.policy is not None:
            settings += f", policy={self.policy!r}"
        if self.bits is not None:
            settings += f", bits={self.bits}, group_size={self.group_size}"
        if self.max_cache_len is not None:
            settings += f", max_cache_len={self.max_cache_len}"
        if not self.attention_layers:
            return f"ThinKCache({settings}; empty)"
        s = self.stats()
        static = "" if s.static_bytes is None else f", {human_bytes(s.static_bytes)} for StaticCache"
        return (
            f"ThinKCache({settings}; {len(s.layers)} layers, {s.tokens} tokens, "
            f"{human_bytes(s.stored_bytes)} held vs {human_bytes(s.dense_bytes)} dense, {s.ratio:.3f}x{static})"
        )
