"""think-cache: ThinK (query-driven key-channel pruning, arXiv 2407.21018) as a drop-in transformers KV cache.

>>> import think_cache
>>> think_cache.patch(model)                                  # once
>>> cache = think_cache.ThinKCache(key_ratio=0.5, policy=think_cache.SnapKV(budget=1024))
>>> model.generate(**inputs, cache=cache, max_new_tokens=64)       # past_key_values= before transformers 5.24
>>> print(cache.stats())
"""

from .attention import ATTENTION_NAME
from .cache import CacheStats, ThinKCache, held_bytes
from .layer import LayerStats, ThinKLayer, ThinKSlidingLayer
from .patch import SUPPORTED_MODEL_TYPES, is_patched, patch, unpatch
from .policies import H2O, Policy, SnapKV, StreamingLLM

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_NAME",
    "H2O",
    "Policy",
    "SnapKV",
    "StreamingLLM",
    "CacheStats",
    "LayerStats",
    "SUPPORTED_MODEL_TYPES",
    "ThinKCache",
    "ThinKLayer",
    "ThinKSlidingLayer",
    "held_bytes",
    "is_patched",
    "patch",
    "unpatch",
]
