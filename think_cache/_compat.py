"""Every difference between the transformers versions think-cache supports (4.56 up to the newest 5.x).

The rest of the package is written as if only one transformers existed; whatever differs lives here.
"""

from __future__ import annotations

import functools
import inspect

import torch
import transformers
from packaging.version import Version
from transformers import GenerationConfig
from transformers.cache_utils import DynamicLayer

try:  # transformers 5.x: the recurrent state of a linear-attention layer (Qwen3-Next, Qwen3.5, ...) is a cache layer
    from transformers.cache_utils import LinearAttentionCacheLayerMixin, LinearAttentionLayer
except ImportError:  # 4.x: hybrid models bring their own cache classes, which a ThinKCache cannot stand in for
    LinearAttentionCacheLayerMixin = LinearAttentionLayer = None
if (
    LinearAttentionLayer is not None
    and "state_idx" not in inspect.signature(LinearAttentionLayer.update_conv_state).parameters
):
    # earlier 5.x (5.12): one state per layer, read through other methods; think-cache serves the states by index
    # (5.24 on), and treats these versions as having no hybrid support
    LinearAttentionCacheLayerMixin = LinearAttentionLayer = None

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_TRANSFORMERS = Version("4.56.0")

if TRANSFORMERS_VERSION < MIN_TRANSFORMERS:  # pragma: no cover - refused at import
    raise ImportError(
        f"think-cache needs transformers>={MIN_TRANSFORMERS}, found {TRANSFORMERS_VERSION}: "
        "older versions have no per-layer cache classes. Upgrade with `pip install -U transformers`."
    )

# transformers 5.24 renamed the cache argument of forwards and `generate` from `past_key_values` to `cache`;
# `past_key_values` stays as a deprecated alias there.
CACHE_ARGUMENTS: tuple[str, ...] = (
    ("cache", "past_key_values") if TRANSFORMERS_VERSION >= Version("5.24.0") else ("past_key_values",)
)
CACHE_ARGUMENT = CACHE_ARGUMENTS[0]

# Newer `crop` takes a non-positive count of tokens to remove; older ones took the length to keep
# (a negative value meaning "remove that many").
_CROP_TAKES_COUNT = "tokens_to_remove" in inspect.signature(DynamicLayer.crop).parameters


def crop_count(argument: int, seq_length: int) -> int:
    """Translate the installed version's `crop` argument into the (non-positive) count of tokens to remove."""
    if argument < 0:
        return argument
    if _CROP_TAKES_COUNT:
        if argument > 0:
            raise ValueError(
                f"`crop` takes a negative number of tokens to remove on transformers {TRANSFORMERS_VERSION}, got "
                f"{argument}."
            )
        return 0
    return -max(seq_length - argument, 0)


#: New tokens generate makes when no length is given (transformers' own default, the same in every version).
DEFAULT_NEW_TOKENS = 20


def generated_length(max_length: int | None, keyword: bool, prompt_length: int, max_positions: int | None) -> int:
    """The total length ``generate`` stops at from the ``max_length`` it reads (``keyword``: passed to generate as
    ``max_length=``), when no ``max_new_tokens`` is given: that length, or by default the prompt and
    `DEFAULT_NEW_TOKENS` more, within the model's ``max_positions``."""
    # a fresh GenerationConfig's max_length means "the default" unless passed to generate: None on transformers 5,
    # 20 on 4.x (which then generates 20 new tokens, not 20 in all)
    if max_length is not None and (keyword or max_length != _default_generation_config().max_length):
        return max_length
    length = prompt_length + DEFAULT_NEW_TOKENS
    return length if max_positions is None else min(length, max_positions)


def query_length(query_length_or_cache_position: int | torch.Tensor) -> int:
    """`get_mask_sizes` receives the query length (newer) or the cache positions (older)."""
    if isinstance(query_length_or_cache_position, torch.Tensor):
        return query_length_or_cache_position.shape[0]
    return int(query_length_or_cache_position)


def attn_implementation(model: torch.nn.Module) -> str | None:
    return config_attn_implementation(model.config)


def config_attn_implementation(config) -> str | None:
    """The attention implementation a model of ``config`` runs."""
    return getattr(config, "_attn_implementation", None)


def attention_dropout(module: torch.nn.Module) -> float:
    """The dropout probability an attention module applies in training mode (a float attribute in most families, a
    ``Dropout`` module in some), 0 where it has none."""
    value = getattr(module, "attention_dropout", 0.0)
    if isinstance(value, torch.nn.Dropout):
        value = value.p
    return float(value) if isinstance(value, int | float) else 0.0


def set_attn_implementation(model: torch.nn.Module, name: str) -> None:
    """Switch a loaded model (and its sub-models) to the attention registered as ``name``."""
    model.set_attn_implementation(name)
    if attn_implementation(model) != name:  # a version that ignored the request
        model.config._attn_implementation = name


def sdpa_mask_function():
    """The mask builder transformers pairs with its sdpa attention (it differs with the torch version)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]


def is_chunked(module: torch.nn.Module) -> bool:
    """Whether an attention module's layer attends in chunks (Llama 4's ``chunked_attention`` layers)."""
    layer_types = getattr(module.config, "layer_types", None)
    return layer_types is not None and layer_types[module.layer_idx] == "chunked_attention"


try:  # newer transformers: a heterogeneous config (Gemma 4) refuses to read a value that differs by layer globally
    from transformers.integrations.heterogeneity.configuration_utils import AmbiguousGlobalPerLayerAttributeError
except ImportError:
    AmbiguousGlobalPerLayerAttributeError = ()  # catches nothing
#: Whether configs say what differs by layer (5.24 has it; 5.12's Gemma 4 keeps one head_dim for layers of two).
PER_LAYER_CONFIGS = AmbiguousGlobalPerLayerAttributeError != ()
#: Model types served only where configs are per layer (their head sizes differ by layer).
PER_LAYER_MODEL_TYPES = ("gemma4", "gemma4_text")


def config_value(config, name: str):
    """``config.<name>``, None where absent; for a value a heterogeneous config keeps per layer (Gemma 4's head_dim),
    the tuple of the layers' values."""
    try:
        return getattr(config, name, None)
    except AmbiguousGlobalPerLayerAttributeError:
        return tuple(getattr(layer, name, None) for layer in config.per_layer_config)


#: The ``layer_types`` of a hybrid model's layers that hold a fixed-size recurrent state (and no tokens)...
LINEAR_LAYER_TYPES = ("linear_attention",)
#: ... and of those that hold one beside their attention's tokens (Falcon-H1 runs both side by side in each layer).
BOTH_LAYER_TYPES = ("hybrid",)


def _layers_of(config, kinds: tuple[str, ...]) -> list[int]:
    """The indices of the layers whose ``layer_types`` entry is one of ``kinds``."""
    return [i for i, kind in enumerate(getattr(config, "layer_types", None) or ()) if kind in kinds]


def linear_layer_indices(config) -> list[int]:
    """The indices of a hybrid model's linear-attention layers (its ``layer_types``), empty for other models."""
    return _layers_of(config, LINEAR_LAYER_TYPES)


def state_layer_indices(config) -> list[int]:
    """The indices of a hybrid model's layers with a recurrent state: linear-attention layers, and layers of both."""
    return _layers_of(config, LINEAR_LAYER_TYPES + BOTH_LAYER_TYPES)


def stores_shared_kv(module: torch.nn.Module) -> bool:
    """Whether later layers reuse this attention module's keys and values (Gemma 4's KV sharing: the last layer of
    each kind before the shared ones). Read from the instance's attributes, where the models that share set it: a
    miss through ``nn.Module.__getattr__`` raises and catches an AttributeError, 2 µs a layer of every step."""
    return bool(vars(module).get("store_full_length_kv", False))


def shares_kv(config) -> bool:
    """Whether some layers of the model of ``config`` reuse an earlier layer's keys and values (Gemma 4 E2B and E4B,
    Gemma 3n; a config before transformers 5 says it by a count only)."""
    modes = getattr(config, "kv_sharing_modes", None)
    if modes is not None:
        return "reuse" in modes
    return (getattr(config, "num_kv_shared_layers", None) or 0) > 0


def sliding_window_of(module: torch.nn.Module) -> int | None:
    """The sliding window of an attention module's layer, or None for full attention, by transformers' own rule
    (``get_layer_types_and_kwargs``): a config's ``layer_types`` says which layers slide (Qwen2/Qwen3, their MoE
    models, Gemma 2/3; their full-attention layers may still see a ``config.sliding_window``, 0 or a number, that
    does not apply to them); without it, every layer slides when the config has a window (Mistral, Mixtral, Phi-3).
    Some modules keep their layer's window themselves; it wins where set. A layer of chunked attention (Llama 4:
    each token sees the tokens of its own chunk of ``attention_chunk_size``) never needs more than that many past
    tokens, which transformers' caches keep as a sliding window; so does ThinK.
    """
    config = module.config
    layer_types = getattr(config, "layer_types", None)
    if is_chunked(module):
        return getattr(config, "attention_chunk_size", None) or None
    if layer_types is not None and layer_types[module.layer_idx] != "sliding_attention":
        return None
    return getattr(module, "sliding_window", None) or getattr(config, "sliding_window", None) or None


def is_compiling() -> bool:
    """Whether torch.compile (dynamo) is tracing the current code (torch >= 2.3 has ``torch.compiler.is_compiling``;
    think-cache needs 2.6). Called several times a layer in every step: no lookups beyond that call. (A wrapper, not
    an alias of torch's function: with the alias, a compile without ``fullgraph`` of a model holding a dynamic
    ThinKCache raised the unpatched-model error instead of the compile one: ``test_torch_compile_is_refused``.)"""
    return torch.compiler.is_compiling()


def output_attentions(config) -> bool:
    """A model config's ``output_attentions``, read every layer of every forward by the ThinK attention: from the
    instance's ``_output_attentions`` (where every supported transformers keeps it behind the property, 4.56 to
    5.24) without the config's attribute hooks (2 µs a read in 5.24), else (and under torch.compile) through them."""
    if not is_compiling():  # dynamo cannot trace object.__getattribute__
        try:
            return bool(object.__getattribute__(config, "__dict__")["_output_attentions"])
        except (AttributeError, KeyError):  # no config, or one that keeps it otherwise
            pass
    return bool(getattr(config, "output_attentions", False))


@functools.cache
def _default_generation_config() -> GenerationConfig:
    return GenerationConfig()


def generation_config_sets(config: GenerationConfig, name: str) -> bool:
    """Whether a GenerationConfig passed to ``generate`` sets option ``name`` itself rather than leave it to
    ``model.generation_config``.

    In 5.x an option left unset is None and generate fills it from the model's generation config. In 4.x it holds
    transformers' global default, and generate takes the model's value instead when that one differs. Either way a
    value that is None or the global default defers to the model.
    """
    value = getattr(config, name, None)
    return value is not None and value != getattr(_default_generation_config(), name, None)
