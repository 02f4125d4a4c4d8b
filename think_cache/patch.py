"""`patch(model)` / `unpatch(model)`: the model surgery, and nothing else."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig
from transformers import __version__ as transformers_version

from . import _compat
from .attention import ATTENTION_NAME, EnterLinearModule, enter_module, exit_module, register
from .cache import ThinKCache
from .layer import FOLD_BLOCK
from .policies import Policy
from .static import second_prompt_error

__all__ = ["patch", "unpatch", "is_patched", "SUPPORTED_MODEL_TYPES"]

#: Model types whose attention think-cache is tested on (``gemma3_text``: Gemma 3's text model, `Gemma3ForCausalLM`;
#: ``gemma3``: with its vision tower, `Gemma3ForConditionalGeneration`, the 4B-27B checkpoints).
SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3",  # tests/test_exactness.py, test_reference.py and the rest
    "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe",  # tests/test_families.py from here on
    "olmo2", "olmo3", "granite", "glm4", "cohere2", "smollm3", "exaone4",
    "gemma", "cohere", "starcoder2", "phimoe", "ministral3", "seed_oss", "apertus", "arcee", "ernie4_5",
    "ernie4_5_moe", "glm4_moe", "granitemoe", "internlm3", "olmoe", "flex_olmo", "vaultgemma", "exaone_moe",
    "cohere2_moe", "afmoe",
    "gpt_oss",  # attention sinks
    "llama4_text",  # chunked attention (Llama4ForCausalLM; the model with images, "llama4", not yet)
    "granitemoeshared", "minimax_m2",
    "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid", "jamba", "granitemoehybrid",  # hybrids
    "falcon_h1",  # a hybrid whose every layer runs attention and Mamba side by side
    "qwen3_5", "qwen3_5_moe",  # Qwen3.5 with its vision tower (hybrids too)
    "gemma4_text", "gemma4",  # per-layer head sizes, KV-shared layers (E2B, E4B); "gemma4" sees images
    "gemma3n_text",  # KV-shared layers too
    "gemma3", "mistral3", "qwen2_5_vl", "qwen3_vl",  # they see images too
)  # fmt: skip

#: The projections of a self-attention module: separate (Llama and its kin), or fused (Phi-3's ``qkv_proj``).
_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))

_STATE_ATTRIBUTE = "_think_cache_patch"


@dataclass
class _PatchState:
    original_attn_implementation: str | None
    hooks: list = field(default_factory=list)
    defaults: dict = field(default_factory=dict)
    generate_wrapped: bool = False
    own_generate: object = None  # a ``generate`` set on the instance before patching, if any
    own_init_continuous_batching: object = None  # likewise for ``init_continuous_batching``
    attention_config: object = None  # the config its attention layers read (the text model's, beside images)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's self-attention modules: those with a layer index and q/k/v projections, separate as in
    Llama and its kin or fused as in Phi-3, but not a hybrid model's linear-attention modules (OLMo Hybrid's have
    q/k/v too) nor a vision tower's (Gemma 4's have a layer index too, and the vision tower's config)."""
    text_config = model.config.get_text_config(decoder=True)
    linear = set(_compat.linear_layer_indices(text_config))
    return [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx")
        and _has_projections(m)
        and m.layer_idx not in linear
        and getattr(m, "config", text_config) is text_config
    ]


def _linear_modules(model: torch.nn.Module, attention_modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """A hybrid model's modules at its layers with a recurrent state, other than its ``attention_modules`` (those
    with a layer index there: the mixer that asks the cache for its state, and the decoder layer around it where it
    keeps an index); none in other models."""
    text_config = model.config.get_text_config(decoder=True)
    stateful = set(_compat.state_layer_indices(text_config))
    attention = set(attention_modules)
    return [
        m
        for m in model.modules()
        if getattr(m, "layer_idx", None) in stateful
        and getattr(m, "config", text_config) is text_config
        and m not in attention
    ]


def _has_projections(module: torch.nn.Module) -> bool:
    return any(all(hasattr(module, name) for name in names) for names in _PROJECTIONS)


def _check_model(model: object) -> list[torch.nn.Module]:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"think_cache.patch expects a transformers model (a PreTrainedModel), got {type(model).__name__}"
        )
    config = model.config
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"think_cache does not support encoder-decoder models ({config.model_type!r}); supported decoder-only "
            f"model types: {supported}"
        )
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"think_cache does not support model type {config.model_type!r}; supported: {supported}")
    text_config = config.get_text_config(decoder=True)
    hybrid = bool(_compat.state_layer_indices(text_config))
    if hybrid and _compat.LinearAttentionLayer is None:
        raise ValueError(
            f"think_cache serves hybrid models ({config.model_type!r}: linear-attention layers beside attention) "
            f"on a transformers whose cache keeps their states layer by layer, by index (5.24; tested there), not "
            f"{transformers_version}: pip install -U transformers"
        )
    if config.model_type in _compat.PER_LAYER_MODEL_TYPES and not _compat.PER_LAYER_CONFIGS:
        raise ValueError(
            f"think_cache serves {config.model_type!r} on a transformers whose configs give each layer its head size "
            f"(5.24; tested there), not {transformers_version}: pip install -U transformers"
        )
    # Qwen2-MoE, Phi-3.5-MoE, OLMoE before transformers 5; hybrid models leave the flag unset for their linear layers
    # (it tells vLLM's transformers backend what it can run), while their attention layers use the interface
    if not getattr(model, "_supports_attention_backend", True) and not hybrid:
        raise ValueError(
            f"think_cache cannot serve {type(model).__name__} on transformers {transformers_version}: its attention "
            "does not go through transformers' attention interface in this version (a newer transformers has it)"
        )
    implementation = _compat.attn_implementation(model) or ""
    if implementation.startswith("paged"):
        raise ValueError(
            f"think_cache cannot serve attn_implementation={implementation!r} (continuous batching with a paged "
            "cache); load the model with attn_implementation='sdpa' or 'eager'"
        )
    modules = _attention_modules(model)
    if not modules or any(getattr(m, "num_key_value_groups", None) is None for m in modules):
        raise ValueError(
            f"think_cache found no attention layer it can serve in {type(model).__name__}: it needs self-attention "
            "modules with q_proj/k_proj/v_proj (or a fused qkv_proj), a layer_idx and grouped-query heads "
            "(num_key_value_groups)"
        )
    if any(getattr(m, "is_causal", True) is False for m in modules):
        raise ValueError(
            f"think_cache serves causal decoders; this {config.model_type!r} model attends bidirectionally "
            "(use_bidirectional_attention=True, as an embedding model does)"
        )
    return modules


def is_patched(model: torch.nn.Module) -> bool:
    """Whether `patch` was applied to ``model`` (and not undone)."""
    return getattr(model, _STATE_ATTRIBUTE, None) is not None


def patch(model: torch.nn.Module, **defaults: Any) -> torch.nn.Module:
    """Switch ``model`` to the ThinK attention so that it can use a `ThinKCache`. Idempotent; returns the model.

    Parameters
    ----------
    model:
        A transformers decoder-only model of a supported type (see ``SUPPORTED_MODEL_TYPES``).
    **defaults:
        `ThinKCache` settings (``key_ratio``, ``value_ratio``, ``window``, ``recent``, ``policy``, ``bits``,
        ``group_size``, ``max_cache_len``), validated here, against the model's layers too (a static cache on
        sliding-window layers, say, is refused here and the model left unpatched). When given,
        ``model.generate(...)`` without a cache argument uses a fresh ``ThinKCache(**defaults)``: the one-liner
        ``think_cache.patch(model, key_ratio=0.5)``. Patching again with settings replaces them; patching again
        without settings keeps them (`unpatch` drops them). ``use_cache=False`` (as a keyword, in a passed
        ``generation_config`` or in ``model.generation_config``) means no cache, as in transformers; a
        ``cache_implementation`` set in any of them is refused with a clear error, and so is a ``compile_config``
        unless the settings make a static cache (``max_cache_len``), which transformers may compile.

    The patched ``generate`` also tells a `ThinKCache` where each call's prompt ends, so that channels are
    chosen there however the prompt is fed (chunked prefill, assisted decoding, a filled cache), and refuses a
    call that would not fit in a static ThinKCache (prompt + ``max_new_tokens`` above its ``max_cache_len``).

    Other caches keep working on a patched model: the ThinK attention hands them to transformers' sdpa attention.
    """
    modules = _check_model(model)
    if defaults:
        try:
            cache = ThinKCache(**defaults)  # validate now, where the settings enter
        except TypeError as error:
            raise TypeError(f"think_cache.patch: invalid ThinKCache setting: {error}") from None
        for module in modules:  # and against this model's layers
            try:
                cache.check_layer(module)
            except ValueError as error:
                raise ValueError(f"think_cache.patch: {error}") from None
    register()

    state = getattr(model, _STATE_ATTRIBUTE, None)
    if state is None:
        state = _PatchState(
            original_attn_implementation=_compat.attn_implementation(model), attention_config=modules[0].config
        )
        for module in modules:
            state.hooks.append(module.register_forward_pre_hook(enter_module))
            # always_call: the state is cleared even when the forward raises (torch>=2.0), or a later ThinKCache
            # on another model would take this module for its own
            state.hooks.append(module.register_forward_hook(exit_module, always_call=True))
        enter_linear = EnterLinearModule(modules[0].config)  # the attention layers' config: the text model's
        for module in _linear_modules(model, modules):
            state.hooks.append(module.register_forward_pre_hook(enter_linear))
            state.hooks.append(module.register_forward_hook(exit_module, always_call=True))
        if hasattr(model, _CONTINUOUS_BATCHING):  # transformers' paged attention cannot serve ThinK: say so
            state.own_init_continuous_batching = vars(model).get(_CONTINUOUS_BATCHING)
            setattr(model, _CONTINUOUS_BATCHING, _refuse_continuous_batching)
        setattr(model, _STATE_ATTRIBUTE, state)
    _compat.set_attn_implementation(model, ATTENTION_NAME)

    if defaults:
        state.defaults = dict(defaults)
    if not state.generate_wrapped and hasattr(model, "generate"):  # a base model (LlamaModel) has no generate
        state.own_generate = vars(model).get("generate")
        model.generate = _PatchedGenerate(model)
        state.generate_wrapped = True
    return model


class _PatchedGenerate:
    """``generate`` as a patched model runs it (`_patched_generate`), bound to its model: a ``copy.deepcopy`` of the
    model rebinds it to the copy, and pickling the model keeps it (a closure over the model generated with the
    original's weights and settings in a copy; a bound method unpickled as the class's plain ``generate``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        functools.update_wrapper(self, type(model).generate)
        self.__self__ = model

    def __call__(self, *args, **kwargs):
        return _patched_generate(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return _PatchedGenerate, (self.__self__,)


def _patched_generate(model: torch.nn.Module, *args, **kwargs):
    """The one-liner's ThinKCache where ``generate`` would build a cache, then, with a ThinKCache, the checks and
    the prompt's end told to it around the model's own ``generate``."""
    state = getattr(model, _STATE_ATTRIBUTE)
    original = state.own_generate or type(model).generate.__get__(model)
    _rename_cache_argument(kwargs)
    static = state.defaults.get("max_cache_len") is not None
    if state.defaults and _builds_own_cache(model, args, kwargs, static):
        kwargs[_compat.CACHE_ARGUMENT] = ThinKCache(**state.defaults)
    cache = kwargs.get(_compat.CACHE_ARGUMENT)  # the one transformers uses (`_rename_cache_argument`)
    if isinstance(cache, Policy):
        raise TypeError(
            f"{type(cache).__name__} is a token policy, not a cache: pass "
            f"{_compat.CACHE_ARGUMENT}=ThinKCache(key_ratio=..., policy={cache!r})"
        )
    if isinstance(cache, type):
        raise TypeError(
            f"{_compat.CACHE_ARGUMENT}={cache.__name__} is a class: pass a cache, {_compat.CACHE_ARGUMENT}="
            f"{cache.__name__}(...)"
        )
    if not isinstance(cache, ThinKCache):
        return original(*args, **kwargs)
    _check_compiled(model, cache)
    for module in _attention_modules(model):  # settings its layers cannot serve, before transformers builds masks
        cache.check_layer(module)
    _check_rollback(model, cache, kwargs)
    prompt_length = _prompt_length(cache, args, kwargs)
    _check_reuse(model, cache, prompt_length)
    _check_capacity(model, cache, prompt_length, args, kwargs)
    cache.mark_prompt_end(prompt_length)
    try:
        return original(*args, **kwargs)
    finally:
        cache.mark_prompt_end(None)


def _rename_cache_argument(kwargs: dict) -> None:
    """``past_key_values=`` where transformers names the argument ``cache=`` (5.24 on): passed on as ``cache=``,
    with transformers' deprecation told at the user's call (from inside `generate` it would name this file). After
    it, ``kwargs[_compat.CACHE_ARGUMENT]`` is the cache transformers uses, whichever name the call gave."""
    if _compat.CACHE_ARGUMENT == "past_key_values" or "past_key_values" not in kwargs:
        return
    if _compat.CACHE_ARGUMENT in kwargs:  # both given: left to transformers, which keeps `cache` and warns
        return
    warnings.warn(
        f"`past_key_values` is deprecated as generate's argument since transformers 5.24: pass "
        f"{_compat.CACHE_ARGUMENT}=... (the same cache)",
        FutureWarning,
        stacklevel=4,  # the user's call, through _PatchedGenerate.__call__ and _patched_generate
    )
    kwargs[_compat.CACHE_ARGUMENT] = kwargs.pop("past_key_values")


def _prompt_length(cache: ThinKCache, args: tuple, kwargs: dict) -> int | None:
    """The whole prompt's length in a ``generate`` call: the attention mask spans it when given, else the inputs
    (``generate`` takes either the whole sequence or, on a filled cache, only the new tokens)."""
    inputs = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    if mask is not None:
        return mask.shape[1]
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        return None
    length = inputs.shape[1]
    past = int(cache.get_seq_length())
    return length if length >= past else past + length


def _check_reuse(model: torch.nn.Module, cache: ThinKCache, prompt_length: int | None) -> None:
    """A filled cache: refuse another model's, inputs shorter than what it holds, and a second prompt on a static
    one, before any forward (deep in one, the first failing check would be a less telling one)."""
    cached = int(cache.get_seq_length())
    if cached == 0:
        return
    state = getattr(model, _STATE_ATTRIBUTE)
    # a model pickled before its patch state kept the attention config has None there: find it
    cache.check_model(state.attention_config or _attention_modules(model)[0].config)
    if prompt_length is None:
        return
    if prompt_length <= cached:
        raise ValueError(
            f"generate was given {prompt_length} tokens (its attention mask's length) but the cache already holds "
            f"{cached}{': nothing new to feed' if prompt_length == cached else ''}: pass the whole sequence, the "
            "cached tokens then at least one new one, or a new cache (or `cache.reset()`) for a new prompt."
        )
    prompt_ended = any(getattr(layer, "is_static", False) for layer in cache.layers)  # else still a prompt
    if prompt_ended and prompt_length - cached > 1:
        raise second_prompt_error(prompt_length - cached)


def _check_compiled(model: torch.nn.Module, cache: ThinKCache) -> None:
    """A forward compiled by the user (``model.forward = torch.compile(model.forward)``, ``model.compile()``, also
    of an inner module such as ``model.model``) would run the prompt compiled too, which ThinK cannot: refuse it
    before any work. (transformers' own compile of the decoding steps sets neither.)"""
    for module in model.modules():  # one walk (it runs in every generate call)
        if hasattr(vars(module).get("forward"), "_torchdynamo_orig_callable"):
            how = "torch.compile"
            break
        if getattr(module, "_compiled_call_impl", None) is not None:
            how = "model.compile()"
            break
    else:
        return
    if cache.max_cache_len is None:
        advice = "a ThinKCache without max_cache_len runs uncompiled (its compact part changes shape)"
    else:
        advice = (
            "leave it uncompiled: generate compiles a static ThinKCache's decoding steps by itself, as with "
            "StaticCache, or drive the loop yourself (the prompt eagerly, then compiled steps)"
        )
    raise ValueError(
        f"This model's forward is compiled ({how}), so generate would run the prompt compiled, which a ThinKCache "
        f"cannot: ThinK chooses channels as the prompt ends, in eager code; {advice}."
    )


def _check_rollback(model: torch.nn.Module, cache: ThinKCache, kwargs: dict) -> None:
    """Assisted decoding and prompt lookup roll back rejected drafts: refuse where that cannot be exact."""
    drafts = kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None
    text_config = model.config.get_text_config(decoder=True)
    if drafts and _compat.state_layer_indices(text_config):
        raise ValueError(
            f"Assisted decoding and prompt lookup roll back rejected draft tokens, which the linear-attention layers "
            f"of this hybrid model ({model.config.model_type!r}) cannot: their recurrent state holds no tokens to "
            "remove (transformers refuses it with DynamicCache too). Generate without an assistant."
        )
    if drafts and _compat.shares_kv(text_config) and cache.prunes:
        raise ValueError(
            "Assisted decoding and prompt lookup end the prompt inside a forward, which ThinKCache does not yet do "
            "for layers that reuse an earlier layer's keys and values (Gemma 4's KV sharing). Generate without an "
            "assistant (or with a ThinKCache that prunes nothing: key_ratio=0, no policy, no bits)."
        )
    if drafts and cache.max_cache_len is not None:
        raise ValueError(
            "Assisted decoding and prompt lookup verify several draft tokens per forward and roll back the rejected "
            "ones, which a static ThinKCache (max_cache_len) does not do: use a ThinKCache without max_cache_len "
            "with an assistant."
        )
    if drafts and not cache.is_croppable:
        raise ValueError(
            f"Assisted decoding and prompt lookup roll back rejected draft tokens, which ThinKCache cannot do "
            f"exactly under {type(cache.policy).__name__}: it evicts tokens while decoding (a block of {FOLD_BLOCK} "
            "at a time). Use no policy or SnapKV with an assistant."
        )


def _check_capacity(model: torch.nn.Module, cache: ThinKCache, prompt_length: int | None, args, kwargs) -> None:
    """A static ThinKCache must hold the prompt and every new token, and returns no attention weights: refuse the
    call before any work otherwise."""
    if cache.max_cache_len is None:
        return
    passed = _passed_generation_config(args, kwargs)
    if _effective_generation_option(model, kwargs, passed, "output_attentions")[0]:
        raise NotImplementedError(
            "A static ThinKCache (max_cache_len) does not return attention weights; use a ThinKCache without "
            "max_cache_len for output_attentions=True."
        )
    if prompt_length is None:
        return
    new_tokens, _ = _effective_generation_option(model, kwargs, passed, "max_new_tokens")
    if new_tokens is not None:
        needed, what = prompt_length + new_tokens, f"the prompt ({prompt_length}) + max_new_tokens ({new_tokens})"
    else:
        max_length, _ = _effective_generation_option(model, kwargs, passed, "max_length")
        positions = getattr(model.config, "max_position_embeddings", None)  # as generate reads it
        needed = _compat.generated_length(max_length, kwargs.get("max_length") is not None, prompt_length, positions)
        what = f"max_length ({needed})"
        if needed != max_length:
            what = f"the prompt ({prompt_length}) + generate's default of {needed - prompt_length} new tokens"
    if needed > cache.max_cache_len:
        raise ValueError(
            f"{what} = {needed} tokens do not fit in this static ThinKCache (max_cache_len={cache.max_cache_len}). "
            "Pass a cache with a larger max_cache_len, or generate fewer tokens."
        )


def _builds_own_cache(model: torch.nn.Module, args: tuple, kwargs: dict, static: bool = False) -> bool:
    """Whether ``model.generate(*args, **kwargs)`` would build a cache itself (none passed, ``use_cache`` not
    False), which the one-liner replaces with its ThinKCache. Raises where the call asks transformers to build a
    cache of its own (``cache_implementation``, or ``compile_config``); a ``compile_config`` is fine when the
    one-liner's cache is ``static``."""
    if kwargs.get(_compat.CACHE_ARGUMENT) is not None:  # (`_rename_cache_argument` ran first)
        return False
    passed = _passed_generation_config(args, kwargs)
    if _effective_generation_option(model, kwargs, passed, "use_cache")[0] is False:
        return False
    if getattr(passed, "is_assistant", False):  # a draft model's calls in assisted decoding: each round crops its
        # cache back into the tokens just compacted, which ThinK cannot restore; the draft keeps transformers' cache
        return False
    for option in ("cache_implementation",) if static else ("cache_implementation", "compile_config"):
        value, where = _effective_generation_option(model, kwargs, passed, option)
        if value is not None:
            ours = (
                "a static ThinKCache (max_cache_len), which transformers may compile but does not build"
                if static
                else "a ThinKCache"
            )
            raise ValueError(
                f"{where} asks transformers to build its own cache, but "
                f"think_cache.patch(model, ...) makes generate use {ours}. Pass a cache yourself, leave {option} "
                "unset, or call think_cache.unpatch(model) first."
            )
    return True


def _passed_generation_config(args: tuple, kwargs: dict) -> GenerationConfig | None:
    """The GenerationConfig given to generate, by keyword or as its second positional argument."""
    config = kwargs.get("generation_config")
    if config is None and len(args) > 1 and isinstance(args[1], GenerationConfig):
        config = args[1]
    return config


def _effective_generation_option(
    model: torch.nn.Module, kwargs: dict, generation_config: GenerationConfig | None, name: str
) -> tuple[object, str | None]:
    """The value generate uses for the GenerationConfig option ``name`` and where it was set, ``(None, None)`` when
    nowhere. The order is transformers': a keyword argument of generate, then the ``generation_config`` passed to
    it, then ``model.generation_config``."""
    if kwargs.get(name) is not None:
        return kwargs[name], f"generate(..., {name}={kwargs[name]!r})"
    if generation_config is not None and _compat.generation_config_sets(generation_config, name):
        value = getattr(generation_config, name)
        return value, f"The generation_config passed to generate ({name}={value!r})"
    value = getattr(model.generation_config, name, None)
    if name == "cache_implementation" and value == "hybrid":
        value = None  # generate drops this old default of sliding-window models' generation configs
    if value is not None:
        return value, f"model.generation_config.{name} = {value!r}"
    return None, None


#: transformers' entry point of continuous batching: `generate_batch`, its context manager and
#: ``generate(cache_implementation="paged")`` all go through it.
_CONTINUOUS_BATCHING = "init_continuous_batching"


def _refuse_continuous_batching(*args, **kwargs):
    raise ValueError(
        "Continuous batching (generate_batch, init_continuous_batching, cache_implementation='paged') runs "
        "transformers' paged attention, which cannot serve a ThinKCache, and this model is patched by "
        "think_cache. Call think_cache.unpatch(model) first (and think_cache.patch(model) again afterwards)."
    )


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch`: the original attention implementation and ``generate`` come back. Returns the model."""
    state = getattr(model, _STATE_ATTRIBUTE, None)
    if state is None:
        return model
    for hook in state.hooks:
        hook.remove()
    _compat.set_attn_implementation(model, state.original_attn_implementation or "sdpa")
    if state.generate_wrapped:
        vars(model).pop("generate", None)
        if state.own_generate is not None:
            model.generate = state.own_generate
    if vars(model).get(_CONTINUOUS_BATCHING) is _refuse_continuous_batching:
        vars(model).pop(_CONTINUOUS_BATCHING)
        if state.own_init_continuous_batching is not None:
            setattr(model, _CONTINUOUS_BATCHING, state.own_init_continuous_batching)
    delattr(model, _STATE_ATTRIBUTE)
    return model
