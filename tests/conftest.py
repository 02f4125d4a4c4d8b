"""Tiny random-weight models and an independent dense reference for think-cache's tests."""

from __future__ import annotations

import os

# Triton decides when it is imported whether its functions run interpreted (on the CPU, with numpy), and the model
# classes below import it: test_kernels.py runs the Triton kernel interpreted. Elsewhere this changes nothing: on
# the CPU the kernel runs only when THINK_CACHE_KERNEL=triton asks for it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers import __version__ as transformers_version
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import think_cache
from think_cache import _compat as compat

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 256

#: Settings every tiny test model shares; `make_config` adds each architecture's.
COMMON_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


#: Per architecture: config class, model class, and settings on top of COMMON_CONFIG. Sliding windows are short, so
#: that sliding layers really trim in the tests; Gemma's scale (query_pre_attn_scalar) differs from 1/sqrt(head_dim) and
#: Gemma 2 caps its logits at 5 (its default, 50, would never bite on these tiny models).
_ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=48)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32)),
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=16, attn_logit_softcapping=5.0),
    ),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=16,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        ),
    ),
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(sliding_window=16)),
    # mixture-of-experts models: the attention of Mistral / Qwen2 / Qwen3, four experts of which two run per token
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(sliding_window=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    ),
}


#: Families built by model type through transformers' Auto classes, with what each adds to the attention (three
#: layers, two sliding, where the family has sliding layers).
_SLIDING = dict(sliding_window=16, num_hidden_layers=3, layer_types=["sliding_attention"] * 2 + ["full_attention"])
_HYBRID = dict(num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2)
#: Qwen3-Next and Qwen3.5's linear layers at a tiny size (their defaults hold 4 MiB of state a layer and row)
_QWEN_LINEAR = dict(
    _HYBRID, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16
)
_BY_MODEL_TYPE = {
    "olmo2": ("olmo2", {}),  # q/k norms over all heads' channels at once, before the heads are split
    "olmo3": ("olmo3", _SLIDING),
    "granite": ("granite", dict(attention_multiplier=0.1)),  # its own attention scale, not 1/sqrt(head_dim)
    "glm4": ("glm4", {}),  # rotary positions on half of each head's channels
    "cohere2": ("cohere2", _SLIDING),  # Command R7B / A: sliding layers with rotary, global ones without
    "smollm3": ("smollm3", dict(no_rope_layers=[1, 0])),  # a layer without rotary positions
    "exaone4": ("exaone4", _SLIDING),
    # chunked attention (each token sees its own chunk of 16) on three layers, the fourth global without rotary
    # positions (NoPE) and with temperature-tuned queries; L2-normed q/k; experts
    "llama4_text": (
        "llama4_text",
        dict(attention_chunk_size=16, num_hidden_layers=4, intermediate_size_mlp=128, num_local_experts=4),
    ),
    # attention sinks (a logit per query head in every softmax, no value), biases, sliding and global layers; experts
    "gpt_oss": ("gpt_oss", dict(_SLIDING, num_local_experts=4, num_experts_per_tok=2)),
    # test_families.MORE_FAMILIES: attention like Llama's or the families above, each checked once
    "gemma": ("gemma", {}),  # Gemma 1 / CodeGemma: (1 + weight) norms, embeddings scaled by sqrt(hidden)
    "cohere": ("cohere", {}),  # Command R: layer norm, parallel attention and MLP, logit scale
    "starcoder2": ("starcoder2", dict(sliding_window=16)),  # biases everywhere, a window on every layer
    "phimoe": ("phimoe", dict(sliding_window=16)),  # Phi-3.5-MoE: a window on every layer
    "ministral3": ("ministral3", dict(sliding_window=16)),
    "seed_oss": ("seed_oss", {}),  # q/k/v biases, 512k-token context checkpoints
    "apertus": ("apertus", {}),  # q/k norms
    "arcee": ("arcee", {}),
    "ernie4_5": ("ernie4_5", {}),
    "ernie4_5_moe": ("ernie4_5_moe", {}),
    "glm4_moe": ("glm4_moe", {}),  # GLM-4.5/4.6: partial rotary, q/k norms
    "granitemoe": ("granitemoe", dict(attention_multiplier=0.1)),
    "internlm3": ("internlm3", {}),
    "olmoe": ("olmoe", {}),
    "flex_olmo": ("flex_olmo", {}),
    "vaultgemma": ("vaultgemma", _SLIDING),
    "exaone_moe": ("exaone_moe", _SLIDING),
    "cohere2_moe": ("cohere2_moe", _SLIDING),
    "afmoe": ("afmoe", _SLIDING),
    "granitemoeshared": ("granitemoeshared", dict(attention_multiplier=0.1, num_local_experts=4)),  # a shared expert
    "minimax_m2": ("minimax_m2", dict(num_local_experts=4, num_experts_per_tok=2)),  # MiniMax-M2: q/k norms; experts
    # hybrids (transformers 5): linear-attention layers (a recurrent state, no tokens) at 0 and 2, attention at 1 and 3
    # Qwen3-Next: gated delta rule layers, gated attention, partial rotary; experts
    "qwen3_next": ("qwen3_next", dict(_QWEN_LINEAR, num_experts=4, num_experts_per_tok=2)),
    "qwen3_5_text": ("qwen3_5_text", _QWEN_LINEAR),  # Qwen3.5's text model: the same layout
    "qwen3_5_moe_text": ("qwen3_5_moe_text", dict(_QWEN_LINEAR, num_experts=4, num_experts_per_tok=2)),
    "olmo_hybrid": ("olmo_hybrid", _HYBRID),  # its linear layers have q/k/v projections too
    # Gemma 4 (26B-A4B, 31B): per-layer head sizes (global layers 64 here, 512 in the real models), q/k/v norms,
    # scale 1, sliding and global layers; `attention_k_eq_v` (the family's second entry): values from the key
    # projection on global layers, with their own KV heads
    "gemma4_text": (
        "gemma4_text",
        dict(
            _SLIDING, head_dim=32, global_head_dim=64, hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB
        ),
    ),
    # Granite 4.0-H: Mamba 2 layers beside attention with Granite's scales; experts
    "granitemoehybrid": (
        "granitemoehybrid",
        dict(_HYBRID, attention_multiplier=0.1, mamba_n_heads=4, mamba_d_head=32, num_local_experts=4),
    ),
    # Falcon-H1: Mamba 2 beside attention in every layer (its parallel hybrid), µP multipliers on keys and more
    "falcon_h1": ("falcon_h1", dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_ssm=64, key_multiplier=0.5)),
    # Gemma 3n (text, E2B/E4B): the last two layers reuse the keys and values of the two before them, AltUp,
    # LAuReL and per-layer inputs beside the attention
    "gemma3n_text": (
        "gemma3n_text",
        dict(
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * 2,
            num_kv_shared_layers=2,
            hidden_size_per_layer_input=16,
            vocab_size_per_layer_input=VOCAB,
            laurel_rank=8,
            activation_sparsity_pattern=[0.0] * 4,
            intermediate_size=[128] * 4,
        ),
    ),
    "jamba": (  # Mamba layers
        "jamba",
        dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, num_experts=2, expert_layer_period=4),
    ),
}


def make_config(arch: str, **overrides):
    """The config of a tiny ``arch`` model (skips the test where this transformers does not have the family)."""
    if arch in _BY_MODEL_TYPE:
        model_type, defaults = _BY_MODEL_TYPE[arch]
        if model_type not in CONFIG_MAPPING:
            pytest.skip(f"transformers {transformers_version} has no {model_type!r} models")
        hybrid = "linear_attention" in defaults.get("layer_types", ()) or model_type == "falcon_h1"
        if model_type in compat.PER_LAYER_MODEL_TYPES and not compat.PER_LAYER_CONFIGS:
            pytest.skip(f"think_cache serves {model_type!r} where configs are per layer, not on {transformers_version}")
        if hybrid and compat.LinearAttentionLayer is None:
            pytest.skip(
                f"think_cache serves hybrid models where cache layers keep states by index, not {transformers_version}"
            )
        return AutoConfig.for_model(model_type, **{**COMMON_CONFIG, **defaults, **overrides})
    if arch not in _ARCHITECTURES:
        raise ValueError(arch)
    config_class, _, defaults = _ARCHITECTURES[arch]
    return config_class(**{**COMMON_CONFIG, **defaults, **overrides})


def make_model(arch: str = "llama", seed: int = 0, patch: bool = True, **overrides):
    """A tiny random-weight model in float32, eval mode, patched for ThinK unless ``patch=False``."""
    torch.manual_seed(seed)
    config = make_config(arch, **overrides)
    if arch in _BY_MODEL_TYPE:
        model = AutoModelForCausalLM.from_config(config).eval()
    else:
        model = _ARCHITECTURES[arch][1](config).eval()
    # no eos stop: every run generates exactly max_new_tokens
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return think_cache.patch(model) if patch else model


def make_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of the given lengths: ``(input_ids, attention_mask)``."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


def generate(model, ids, mask, cache, steps: int = 12, **kwargs):
    """``model.generate`` with ``cache``, greedy unless told otherwise, returning the per-step logits too."""
    kwargs.setdefault("do_sample", False)
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=steps,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )


def chat(model, cache, first: torch.Tensor, user_turns: list, new_tokens: int | list[int] = 8, **kwargs) -> list:
    """Turns on one cache: the prompt ``first``, then each of ``user_turns`` after the conversation so far (the
    whole sequence passed, as a chat does), ``new_tokens`` generated per turn (one count, or one per turn).
    Returns each turn's `generate` output."""
    counts = new_tokens if isinstance(new_tokens, list) else [new_tokens] * (len(user_turns) + 1)
    outs, sequence = [], first
    for turn, count in enumerate(counts):
        outs.append(generate(model, sequence, torch.ones_like(sequence), cache, count, **kwargs))
        if turn < len(user_turns):
            sequence = torch.cat([outs[-1].sequences, user_turns[turn]], dim=-1)
    return outs


def prefill(model, cache, ids, mask=None):
    """The prompt (its new tokens, after those already cached) in one forward, told to end there (what the patched
    ``generate`` tells a ThinKCache), so that the cache is compacted at its end."""
    if isinstance(cache, think_cache.ThinKCache):
        cache.mark_prompt_end(int(cache.get_seq_length()) + ids.shape[1])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return cache


@pytest.fixture(params=["loops", "torch"])
def attention_path(request, monkeypatch) -> str:
    """Runs a test of attention over quantized parts through both CPU paths: the C loops of
    `think_cache.cpu_kernels` (the default where they build) and the torch path (``THINK_CACHE_KERNEL=torch``)."""
    from think_cache import cpu_kernels, kernels

    if request.param == "torch":
        monkeypatch.setenv(kernels.KERNEL_ENV, "torch")
    elif not cpu_kernels.available():
        pytest.skip("the CPU loops cannot be built here (no C compiler)")
    else:
        monkeypatch.delenv(kernels.KERNEL_ENV, raising=False)
    return request.param


@pytest.fixture
def torch_path(monkeypatch) -> None:
    """Attention over quantized parts through the torch path only (``THINK_CACHE_KERNEL=torch``)."""
    from think_cache import kernels

    monkeypatch.setenv(kernels.KERNEL_ENV, "torch")


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def named_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor ``obj`` holds, by attribute path (``store.keys.scale``), found by walking its attributes and
    those of the think_cache objects it holds (a layer's store, quantized keys), not by asking it."""
    found = {}
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            found[prefix + name] = value
        elif type(value).__module__.startswith("think_cache.") and hasattr(value, "__dict__"):
            found.update(named_tensors(value, f"{prefix}{name}."))
    return found


def held_bytes(cache) -> int:
    """Bytes of every tensor storage a cache's layers hold, found by walking their attributes (not `stats`)."""
    storages = {}
    for layer in cache.layers:
        for value in named_tensors(layer).values():
            if value.numel():
                s = value.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


# --------------------------------------------------------------------------------------- dense reference
class ZeroedLayer(DynamicLayer):
    """A stock full-size layer whose tokens, once out of the full-width part, get pruned channels zeroed.

    It mirrors ThinK's schedule without sharing its code: channels are given (taken from a ThinK run); the prompt
    ends at the first single-token forward after a multi-token one (where the patched ``generate`` puts it too);
    from then on a forward starting at position ``t`` sees tokens before
    ``origin - held + fold_block * ((t - origin) // fold_block)`` thinned, where ``origin`` is the latest prompt's
    end and ``held`` is ``recent`` for the first prompt and ``max(recent, window)`` for a later one (a chat's turn).
    When a prompt ends, the unzeroed keys of its last ``window`` tokens are copied aside (those not zeroed yet, for
    the newest ``SPARE_PROMPTS`` prompts; not in sliding layers); a later prompt's forward (several tokens after the
    first prompt's end) sees them unzeroed.
    """

    def __init__(
        self, key_channels, value_channels, recent: int, head_dim: int, fold_block: int, sliding_window=None, window=32
    ):
        super().__init__()
        self.recent = recent
        self.later_recent = max(recent, window)
        self.first_origin = None
        self.fold_block = fold_block
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None  # masks of a model mixing sliding and full layers look for it
        self.key_keep = self._keep_mask(key_channels, head_dim)
        self.value_keep = None if value_channels is None else self._keep_mask(value_channels, head_dim)
        self.origin = None  # logical end of the latest prompt
        self.window = window
        self.zeroed_before = 0  # positions before this one have their pruned channels zeroed
        self.spare: list[tuple[int, torch.Tensor]] = []  # (logical position, unzeroed key (B, H, D))
        self.last_forward = 0
        self.seen = 0

    @staticmethod
    def _keep_mask(channels, head_dim):
        keep = torch.zeros(*channels.shape[:-1], head_dim, dtype=torch.bool)
        keep.scatter_(-1, channels.long(), True)
        return keep[:, :, None, :]  # (B, H, 1, D)

    def update(self, key_states, value_states, *args, **kwargs):
        from think_cache.layer import SPARE_PROMPTS

        n, t0 = key_states.shape[-2], self.seen
        later_prompt = n > 1 and self.origin is not None
        new_origin = n == 1 and t0 > 0 and (self.last_forward > 1 or self.origin is None)
        if new_origin:
            self.origin = t0
            if self.first_origin is None:
                self.first_origin = t0
        self.last_forward = n
        self.seen += n
        keys, values = super().update(key_states, value_states)
        offset = self.seen - keys.shape[-2]  # logical position of the first stored token
        if new_origin and self.sliding_window is None:  # the prompt's question, as far as it is not zeroed yet
            kept = {position for position, _ in self.spare}
            for position in range(max(self.origin - self.window, self.zeroed_before, offset), self.origin):
                if position not in kept:
                    self.spare.append((position, keys[:, :, position - offset].clone()))
            self.spare = self.spare[-SPARE_PROMPTS * self.window :]
        if self.origin is not None:
            held = self.recent if self.origin == self.first_origin else self.later_recent
            thinned_before = self.origin - held + self.fold_block * ((t0 - self.origin) // self.fold_block)
            self.zeroed_before = max(self.zeroed_before, thinned_before)
            old = keys.shape[-2] - (self.seen - thinned_before)  # stored tokens before that position
            if old > 0:
                keys[:, :, :old] = keys[:, :, :old] * self.key_keep
                if self.value_keep is not None:
                    values[:, :, :old] = values[:, :, :old] * self.value_keep
        if later_prompt and self.spare:
            keys = keys.clone()
            for position, key in self.spare:
                if position >= offset:
                    keys[:, :, position - offset] = key
        out = keys, values
        if self.sliding_window is not None:  # keep what a sliding layer keeps after the forward
            self.keys = keys[:, :, -(self.sliding_window - 1) :]
            self.values = values[:, :, -(self.sliding_window - 1) :]
        return out

    def get_seq_length(self):
        return self.seen

    def get_mask_sizes(self, query_length):
        query_length = compat.query_length(query_length)  # cache positions on transformers 4.x
        if self.sliding_window is None:
            return self.seen + query_length, 0
        offset = max(self.seen - self.sliding_window + 1, 0)
        return min(self.seen, self.sliding_window - 1) + query_length, offset


class ZeroedHybridLayer(*(() if compat.LinearAttentionLayer is None else (compat.LinearAttentionLayer,)), ZeroedLayer):
    """A `ZeroedLayer` with a recurrent state beside it (Falcon-H1 runs Mamba beside attention in each layer), built
    as transformers' ``LinearAttentionAndFullAttentionLayer`` is."""

    is_compileable = False

    def __init__(self, *args, **kwargs):
        ZeroedLayer.__init__(self, *args, **kwargs)
        compat.LinearAttentionLayer.__init__(self)

    def lazy_initialization(self, *args, **kwargs) -> None:
        if len(args) == 2 and not kwargs:  # the attention's keys and values
            ZeroedLayer.lazy_initialization(self, *args)
        elif not args:  # a conv or recurrent state
            compat.LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def reset(self) -> None:
        compat.LinearAttentionLayer.reset(self)
        ZeroedLayer.reset(self)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        compat.LinearAttentionLayer.reorder_cache(self, beam_idx)
        ZeroedLayer.reorder_cache(self, beam_idx)


def zeroed_reference(think_cache_after_run, model) -> DynamicCache:
    """A DynamicCache of `ZeroedLayer`s using the channels a ThinK run chose."""
    layers = []
    # which layers slide, and by how much: as transformers' own DynamicCache for this model says
    stock = DynamicCache(config=model.config).layers
    think_layers = iter(think_cache_after_run.layers)
    for stock_layer in stock:
        if type(stock_layer).__name__ == "DummyLayer":  # Gemma 4's layers that reuse an earlier layer's keys
            layers.append(stock_layer)
            continue
        linear = compat.LinearAttentionCacheLayerMixin and isinstance(
            stock_layer, compat.LinearAttentionCacheLayerMixin
        )
        if linear and not isinstance(stock_layer, DynamicLayer):
            layers.append(stock_layer)  # a hybrid model's linear-attention layer: transformers' own, as in ThinK
            next(think_layers)
            continue
        layer, window = next(think_layers), getattr(stock_layer, "sliding_window", None)
        zeroed = ZeroedHybridLayer if linear else ZeroedLayer  # Falcon-H1: a recurrent state beside the tokens
        layers.append(
            zeroed(
                layer.key_channels,
                layer.value_channels,
                layer.recent,
                layer.head_dim,
                layer.fold_block,
                sliding_window=window,
                window=layer.window,
            )
        )
    cache = DynamicCache()
    cache.layers = layers
    return cache


# ------------------------------------------------------------------------------- quantized storage reference
#: Code widths whose scales a store keeps as one-byte codes, as the reference writes them.
LOG_SCALE_BITS = (4,)


def log_scale(scale: torch.Tensor) -> torch.Tensor:
    """A one-byte scale as stored, written apart from think_cache.quant: ``2 ** (k / 12)`` for the least integer
    ``k`` in [-143, 111] with ``2 ** (k / 12) >= scale`` (rounded up; clipped at the ends); 0 stays 0."""
    k = torch.ceil(torch.log2(scale) * 12)
    k = torch.where(torch.exp2((k - 1) / 12) >= scale, k - 1, k).clamp(-143, 111)
    return torch.where(scale > 0, torch.exp2(k / 12), 0.0)


def fake_quant(
    x: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
    valid: torch.Tensor | None = None,
    keys: bool = False,
    log_scales: bool = False,
) -> torch.Tensor:
    """The reference quantizer: quantize then dequantize float32 ``x`` over its last axis, written apart from
    think_cache.quant. Each group's range is its min/max (over ``valid`` elements only when given) narrowed about its
    middle by each fraction of ``quant.CLIP_RATIOS[bits]`` (``KEY_CLIP_RATIOS`` for ``keys``) in turn, scale and
    zero point rounded to ``dtype`` as stored (``log_scales``: the scale to a one-byte code, `log_scale`, and the
    zero point centring the range in the levels); the range with the least squared error (over valid elements; the
    first on a tie) is kept."""
    from think_cache import quant

    qmax = 2**bits - 1
    if valid is None:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    else:
        lo = torch.where(valid, x, torch.inf).amin(-1, keepdim=True)
        hi = torch.where(valid, x, -torch.inf).amax(-1, keepdim=True)
        lo, hi = torch.nan_to_num(lo, posinf=0.0), torch.nan_to_num(hi, neginf=0.0)

    def approximations():
        for ratio in (quant.KEY_CLIP_RATIOS if keys else quant.CLIP_RATIOS)[bits]:
            margin = (1.0 - ratio) / 2 * (hi - lo)
            low, high = lo + margin, hi - margin
            if log_scales:
                scale = log_scale((high - low) / qmax)
                zero = ((low + high) / 2 - scale * (qmax / 2)).to(dtype).float()
            else:
                scale = ((high - low) / qmax).to(dtype).float()
                zero = low.to(dtype).float()
            codes = torch.clamp(torch.round((x - zero) / torch.where(scale == 0, 1.0, scale)), 0, qmax)
            yield codes * scale + zero

    return _least_error(approximations(), x, valid)


def _least_error(approximations, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per group (the last axis), the first of ``approximations`` of ``x`` with the least squared error (over
    ``valid`` elements when given)."""
    best, best_error = None, None
    for approx in approximations:
        error = (approx - x).square()
        error = (error if valid is None else torch.where(valid, error, 0.0)).sum(-1, keepdim=True)
        if best is None:
            best, best_error = approx, error
        else:
            best = torch.where(error < best_error, approx, best)
            best_error = torch.minimum(error, best_error)
    return best


#: Code widths whose values the store quantizes symmetric (no zero point), as the reference writes them.
SYMMETRIC_VALUE_BITS = (4,)


def fake_quant_symmetric(x: torch.Tensor, bits: int, dtype: torch.dtype, log_scales: bool = False) -> torch.Tensor:
    """The reference symmetric quantizer, apart from think_cache.quant: over the last axis, levels ``(c - m) * s``
    for codes ``c`` in ``0 .. 2**bits - 1`` and ``m = (2**bits - 1) / 2``, ``s = ratio * max|x| / m`` rounded to
    ``dtype`` (``log_scales``: to a one-byte code, `log_scale`), for each fraction of ``quant.CLIP_RATIOS[bits]``;
    the one with the least squared error (the first on a tie) is kept."""
    from think_cache import quant

    qmax = 2**bits - 1
    mid = qmax / 2
    peak = x.abs().amax(-1, keepdim=True)

    def approximations():
        for ratio in quant.CLIP_RATIOS[bits]:
            scale = log_scale(ratio * peak / mid) if log_scales else (ratio * peak / mid).to(dtype).float()
            codes = torch.clamp(torch.round(x / torch.where(scale == 0, 1.0, scale) + mid), 0, qmax)
            yield (codes - mid) * scale

    return _least_error(approximations(), x)


def fake_quant_value_group(x: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """One group of values as the store quantizes it at ``bits``: symmetric or min/max, its scale as one byte at
    `LOG_SCALE_BITS`."""
    log_scales = bits in LOG_SCALE_BITS
    if bits in SYMMETRIC_VALUE_BITS:
        return fake_quant_symmetric(x, bits, dtype, log_scales)
    return fake_quant(x, bits, dtype, log_scales=log_scales)


def peak_allocated_bytes(fn) -> int:
    """Peak of the bytes torch allocated (and not yet freed) while ``fn`` ran, from the CPU profiler's memory
    events: every allocation and free, in order, summed. Unlike RSS it does not see memory the C allocator keeps."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profile:
        fn()
    events = sorted(
        (e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def continue_after(model, ids, mask, interrupt) -> list:
    """Two ``generate`` calls on a fresh ``ThinKCache(key_ratio=0.5)`` (a token, then five more: the second is a later
    turn), without and with ``interrupt(cache, last_token)`` between them (a refused forward, say): the second
    call's outputs, ``[uninterrupted, interrupted]``."""
    outputs = []
    for between in (None, interrupt):
        cache = think_cache.ThinKCache(key_ratio=0.5)
        first = generate(model, ids, mask, cache, 1)
        if between is not None:
            between(cache, first.sequences[:, -1:])
        outputs.append(generate(model, first.sequences, torch.ones_like(first.sequences), cache, 5))
    return outputs
