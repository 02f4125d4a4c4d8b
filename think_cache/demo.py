"""The think-cache demo: a long-context question on SmolLM2-135M-Instruct (or Gemma 3 270M with ``--model gemma3``),
answered with transformers' DynamicCache and with ThinKCache, with the KV memory each one held.

    python -m think_cache.demo [--model smollm2] [--tokens 1500] [--key-ratio 0.5] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass

import torch

from . import ThinKCache, _compat, held_bytes, patch
from .cache import human_bytes
from .models import MODELS, load_model

_SUBJECTS = (
    "The river",
    "An old library",
    "The mountain village",
    "A small bakery",
    "The harbor",
    "The orchestra",
    "A desert road",
    "The museum",
    "The northern forest",
    "A quiet garden",
    "The train station",
    "A fishing boat",
)
_VERBS = (
    "was known for",
    "attracted visitors with",
    "kept careful records of",
    "changed slowly because of",
    "was famous for",
    "was rebuilt after",
    "is remembered for",
)
_OBJECTS = (
    "its long winters",
    "a festival every spring",
    "the stone bridge",
    "rare maps",
    "fresh bread at dawn",
    "a lighthouse",
    "quiet evenings",
    "a collection of clocks",
    "wild horses",
    "copper roofs",
    "a flood in 1911",
)


def filler_sentences(rng: random.Random, n: int) -> list[str]:
    """``n`` varied filler sentences (subject, verb and object drawn at random), never one repeated line."""
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}." for _ in range(n)]


def fill_to_tokens(tokenizer, rng: random.Random, n_tokens: int) -> list[str]:
    """Filler sentences until they make about ``n_tokens`` tokens."""
    sentences: list[str] = []
    while len(tokenizer(" ".join(sentences))["input_ids"]) < n_tokens:
        sentences += filler_sentences(rng, 10)
    return sentences


def chat_prompt(tokenizer, document: str, question: str) -> dict:
    """The model's chat template around a document and a question, as ``generate`` inputs."""
    messages = [{"role": "user", "content": document + "\n\n" + question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def completion_prompt(tokenizer, document: str, text: str) -> dict:
    """A document and then ``text`` (a question and the start of its answer) for a base model to complete, as
    ``generate`` inputs."""
    return dict(tokenizer(document + "\n\n" + text, return_tensors="pt"))


@dataclass(frozen=True)
class Question:
    """A question about a document in both prompt styles: ``ask`` and then ``hint`` (how to answer) for a chat
    model; ``ask`` and then ``answer_start`` for a base model to complete."""

    ask: str
    hint: str
    answer_start: str

    @property
    def chat(self) -> str:
        return f"{self.ask} {self.hint}"

    @property
    def completion(self) -> str:
        return f"{self.ask} {self.answer_start}"


#: How a document and its question become a prompt: ``chat`` (the model's chat template) or ``completion``.
PROMPT_STYLES = ("chat", "completion")


def prompt_style(tokenizer, style: str | None = None) -> str:
    """``style`` if given, else ``chat`` for a tokenizer with a chat template and ``completion`` for one without
    (a base model, such as Gemma 3 270M)."""
    if style is None:
        return "chat" if getattr(tokenizer, "chat_template", None) else "completion"
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}: choose one of {', '.join(PROMPT_STYLES)} (or None)")
    return style


def document_prompt(tokenizer, document: str, question: Question, style: str | None = None) -> dict:
    """A document and a question as ``generate`` inputs, in ``style`` (see `prompt_style`)."""
    if prompt_style(tokenizer, style) == "chat":
        return chat_prompt(tokenizer, document, question.chat)
    return completion_prompt(tokenizer, document, question.completion)


SECRET_QUESTION = Question("What is the secret code?", "Answer with the number only.", "The secret code is")


def haystack_question(tokenizer, n_tokens: int, seed: int = 0, depth: float = 0.5, style: str | None = None):
    """A prompt of about ``n_tokens`` tokens of varied filler with a secret code hidden at ``depth``: returns
    ``(inputs, code)``."""
    rng = random.Random(seed)
    code = str(rng.randint(10000, 99999))
    sentences = fill_to_tokens(tokenizer, rng, n_tokens - 40)
    sentences.insert(int(len(sentences) * depth), f"The secret code is {code}.")
    return document_prompt(tokenizer, " ".join(sentences), SECRET_QUESTION, style), code


def answer_with(model, tokenizer, inputs: dict, cache, max_new_tokens: int = 16) -> tuple[str, int, float]:
    """Greedy ``generate`` with ``cache``: the answer's text, the bytes the cache held, and the seconds taken."""
    n = inputs["input_ids"].shape[1]
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs, **{_compat.CACHE_ARGUMENT: cache}, max_new_tokens=max_new_tokens, do_sample=False
        )
    seconds = time.perf_counter() - start
    return tokenizer.decode(out[0, n:], skip_special_tokens=True).strip(), held_bytes(cache), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=list(MODELS), help="which model (default smollm2)")
    parser.add_argument("--tokens", type=int, default=1500, help="prompt length (default 1500)")
    parser.add_argument("--key-ratio", type=float, default=0.5, help="fraction of key channels pruned (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the filler and the code (default 0)")
    args = parser.parse_args(argv)
    if args.tokens < 100:
        parser.error(f"--tokens must be at least 100 (the question and its answer take ~60), got {args.tokens}")
    if not 0 <= args.key_ratio < 1:
        parser.error(f"--key-ratio must be in [0, 1): the fraction of key channels pruned, got {args.key_ratio}")

    print(f"Loading {MODELS[args.model][0]} ...", flush=True)
    model, tokenizer = load_model(args.model)
    patch(model)
    inputs, code = haystack_question(tokenizer, args.tokens, seed=args.seed)
    n = inputs["input_ids"].shape[1]
    print(f"Prompt: {n} tokens of filler with one hidden fact. Question: what is the secret code? (it is {code})\n")

    from transformers import DynamicCache

    results = []
    for name, cache in (
        # what generate builds without a cache: sliding-window layers (Gemma 3) keep only their window
        ("DynamicCache", DynamicCache(config=model.config)),
        (f"ThinKCache(key_ratio={args.key_ratio})", ThinKCache(args.key_ratio)),
    ):
        if sys.stdout.isatty():  # a line that the answer overwrites, on a terminal: each answer shows as it comes
            print(f"{name:28s} reading the prompt ...", end="\r", flush=True)
        answer, held, seconds = answer_with(model, tokenizer, inputs, cache)
        results.append((name, answer, held, seconds))
        base = results[0][2]
        verdict = "correct" if code in answer else "WRONG"
        print(f"{name:28s} answer: {answer!r} ({verdict})")
        print(f"{'':28s} KV cache: {human_bytes(held)} ({held / base:.2f}x of DynamicCache), {seconds:.1f} s")
    saved = base - results[1][2]
    print(f"\nThinK saved {human_bytes(saved)} of KV cache ({saved / base:.0%}) on this {n}-token prompt.")
    return 0 if all(code in answer for _, answer, _, _ in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
