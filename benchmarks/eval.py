"""Long-context retrieval accuracy on SmolLM2-135M-Instruct (or Gemma 3 270M: ``--model gemma3``), every method on
the same prompts.

    python -m benchmarks.eval --methods dynamic,think-0.4,snapkv-512,snapkv-512+think-0.4 --lengths 1024,2048
    python -m benchmarks.eval --model gemma3 --methods dynamic --lengths 2048,4096 --tasks passkey --threads 1

Each prompt is prefilled once and replayed into every method's cache (exact, see `common.record_prefill`),
then decoded greedily. Prompts use the model's chat template, or for a base model without one (Gemma 3 270M) a
completion ("... What is the pass key? The pass key is"); ``--prompt-style`` chooses. Writes
benchmarks/results/eval_<tag>.json (``--results-dir`` for another folder; the header records the settings, the
command line and the git commit): one row per (prompt, method) with the answer, whether it is right, the bytes
the cache held after the prompt and the seconds of prefill and decoding. Prints accuracy per method, task and
length, then each thinned method against the cache it thins on the same prompts (prompts gained and lost, with
a 95% interval). ``--kl`` adds to each such row its KL divergence from the cache it thins, that cache's answer
teacher-forced into both (an average over the answer: rank variants with it, confirm by answers; `divergences`).
``--summarize results/eval_<tag>.json`` prints those tables again without running anything.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

import think_cache
from think_cache import held_bytes
from think_cache.demo import PROMPT_STYLES, prompt_style
from think_cache.models import MODELS, load_model

from .common import (
    DEFAULT_TAG,
    RESULTS,
    TASKS,
    answer_log_probs,
    available_methods,
    baseline_of,
    baselines_of,
    cache_from_prefill,
    check_methods,
    depths,
    describe,
    eos_ids,
    greedy_decode,
    group_mean,
    is_correct,
    kl_divergence,
    load_results,
    max_context,
    method_help,
    needs_patch,
    paired,
    positive_ints,
    provenance,
    record_prefill,
    result_tag,
    save_json,
    warn_beyond_context,
)

DEFAULT_METHODS = "dynamic,think-0.4,think-0.5,snapkv-512,snapkv-512+think-0.4,snapkv-512+think-0.5"


#: New tokens per task: the model often restates the key before the number in the key-value task.
MAX_NEW_TOKENS = {"passkey": 12, "kv": 24}

#: The shortest prompt a task can be built at: the key-value task spreads 12 keys over its filler, which needs
#: about 240 tokens for the statements and more than one batch of 10 filler sentences (up to ~120 tokens).
MIN_LENGTH = {"passkey": 1, "kv": 384}

#: The header fields a resumed run must share with the file it adds to: they decide the prompts (the model, the
#: prompt style and ``samples``, which sets each prompt's depth) or what a row holds.
RESUME_SETTINGS = ("model", "prompt_style", "samples", "max_new_tokens", "kl")


def check_tasks(tasks: list[str], lengths: list[int]) -> list[str]:
    """``tasks`` if each is a task of `TASKS` and every length is long enough for it (`MIN_LENGTH`); else
    ValueError saying what to pass."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {', '.join(map(repr, unknown))}: --tasks takes {' and/or '.join(TASKS)}")
    for task in tasks:
        short = [n for n in lengths if n < MIN_LENGTH[task]]
        if short:
            raise ValueError(
                f"the {task} task needs prompts of {MIN_LENGTH[task]} tokens at least, not "
                f"{', '.join(map(str, short))}: raise --lengths or leave {task} out of --tasks"
            )
    return tasks


def resume_conflicts(earlier: dict, settings: dict) -> list[str]:
    """How a run with ``settings`` (`RESUME_SETTINGS`; a value of None is not checked) differs from the results
    file ``earlier`` it would resume, so that every method still answers the very same prompts. Files from before
    the settings were recorded are checked through their rows: prompt ``i`` of a length has seed ``1000 * length +
    i`` and depth ``depths(samples)[i]``."""
    conflicts = [
        f"{key} {earlier[key]!r} there, {value!r} now"
        for key, value in settings.items()
        if value is not None and key in earlier and earlier[key] != value
    ]
    samples = settings.get("samples")
    if samples is not None and "samples" not in earlier:
        for row in earlier.get("rows", []):
            i = row["seed"] - 1000 * row["length"]
            if not 0 <= i < samples or row["depth"] != depths(samples)[i]:
                conflicts.append(f"its prompts were drawn for another --samples than {samples}")
                break
    return conflicts


def run(
    methods: list[str],
    lengths: list[int],
    tasks: list[str],
    samples: int,
    on_prompt: Callable[[dict], None] | None = None,
    model_name: str = "smollm2",
    style: str | None = None,
    done: list[dict] | None = None,
    kl: bool = False,
) -> dict:
    """Every method on ``samples`` prompts per task and length, on the model ``model_name`` (see
    `think_cache.models.MODELS`), prompts in ``style`` (None: the model's own, see `prompt_style`). ``on_prompt``
    gets the partial result after each prompt. ``done``: rows of an earlier, interrupted run with the same
    settings; a prompt every method already answered there is kept, not run again. ``kl``: each row of a method
    built on another one also gets ``kl``, its divergence from that method on that method's answer
    (`divergences`)."""
    model, tokenizer = load_model(model_name)
    if any(needs_patch(m) for m in methods):  # transformers' caches alone run on the model as it comes
        think_cache.patch(model)
    style = prompt_style(tokenizer, style)
    limit = max_context(model.config)
    beyond = warn_beyond_context(lengths, limit, MODELS[model_name][0])
    header = {**provenance(), "model": MODELS[model_name][0], "prompt_style": style, "methods": methods}
    header |= {"caches": describe(methods), "lengths": lengths, "tasks": tasks, "samples": samples}
    header |= {"max_new_tokens": dict(MAX_NEW_TOKENS), "kl": kl, "max_position_embeddings": limit}
    header |= {"beyond_context": beyond}
    eos = eos_ids(model, tokenizer)
    keep_queries = None if any("h2o" in m for m in methods) else 64
    rows = list(done or [])
    # a prompt is its task, length, seed and depth: rows of a file with other --samples never stand in for it
    finished = {(r["length"], r["task"], r["seed"], r["depth"], r["method"]) for r in rows}
    # even prompts first, then odd ones: an interrupted run still spreads its depths over the whole context
    order = sorted(range(samples), key=lambda i: (i % 2, i))
    jobs = [(length, task, i) for length in lengths for i in order for task in tasks]
    for length, task, i in tqdm(jobs, desc="prompts", unit="prompt"):
        depth = depths(samples)[i]
        if all((length, task, 1000 * length + i, depth, m) in finished for m in methods):
            continue
        sample = TASKS[task](tokenizer, length, depth, seed=1000 * length + i, style=style)
        ids = sample.inputs["input_ids"]
        prefill = record_prefill(model, ids, keep_queries)
        first = prefill.logits.argmax(-1)
        answers, new_rows = {}, {}
        for method in methods:
            if (length, task, sample.seed, depth, method) in finished:
                continue
            cache = cache_from_prefill(model, method, prefill)
            held = held_bytes(cache)
            start = time.perf_counter()
            tokens = greedy_decode(model, cache, first, MAX_NEW_TOKENS[task], eos)
            answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            answers[method] = tokens
            rows.append(
                {
                    "task": task,
                    "length": length,
                    "prompt_tokens": ids.shape[1],
                    "depth": depth,
                    "seed": sample.seed,
                    "method": method,
                    "answer": answer,
                    "expected": sample.answer,
                    "correct": is_correct(answer, sample.answer),
                    "held_bytes": held,
                    "prefill_seconds": prefill.seconds,
                    "decode_seconds": time.perf_counter() - start,
                }
            )
            if length in beyond:
                rows[-1]["beyond_context"] = True
            new_rows[method] = rows[-1]
        if kl:
            divergences(model, prefill, answers, new_rows)
        del prefill
        if on_prompt is not None:
            on_prompt({**header, "rows": rows})
    return {**header, "rows": rows}


def divergences(model, prefill, answers: dict[str, list[int]], rows: dict[str, dict]) -> None:
    """Add ``kl`` and ``kl_vs`` to the row of every method whose `baseline_of` also answered this prompt: the
    baseline's answer teacher-forced into both caches (rebuilt from ``prefill``; a token a step, as decoding feeds
    it: `answer_log_probs`), ``KL(baseline || method)`` of the next-token distributions summed over the answer. A
    right/wrong answer flips on near-chance prompts; the divergence measures how far a method moved the model on
    every prompt. It is an average: it does not weigh the one token that decides a retrieval (4-bit keys at min/max
    ranges had a quarter of the KL and lost 5 of 38 pass keys; `eval_cpu_2k_int4_rounding_probes.json`), so rank
    variants with it and confirm them by answers."""
    reference: dict[str, torch.Tensor] = {}
    for method, row in rows.items():
        base = baseline_of(method)
        if base not in answers:
            continue
        if base not in reference:
            reference[base] = answer_log_probs(model, cache_from_prefill(model, base, prefill), answers[base])
        own = answer_log_probs(model, cache_from_prefill(model, method, prefill), answers[base])
        row["kl"], row["kl_vs"] = kl_divergence(reference[base], own), base


def kl_summary(result: dict) -> str:
    """A markdown table of the ``kl`` rows (`divergences`): per method, baseline, task and length, the prompts and
    the mean, median and largest divergence (nats summed over the answer)."""
    groups: dict[tuple, list[float]] = {}
    for row in result["rows"]:
        if "kl" in row:
            groups.setdefault((row["method"], row["kl_vs"], row["task"], row["length"]), []).append(row["kl"])
    lines = ["| method | vs | task | length | prompts | mean KL | median | max |", "|" + "---|" * 8]
    for (method, base, task, length), values in groups.items():
        v = torch.tensor(values)
        lines.append(
            f"| {method} | {base} | {task} | {length} | {len(values)} | {v.mean():.4f} | {v.median():.4f} | "
            f"{v.max():.4f} |"
        )
    return "\n".join(lines)


def summary(result: dict) -> str:
    """A markdown table: accuracy (%) per method, task and length, with the KV memory ratio to DynamicCache."""
    rows = result["rows"]
    acc = group_mean(rows, ("method", "task", "length"), "correct")
    mem = group_mean(rows, ("method", "length"), "held_bytes")
    cols = [(task, length) for task in result["tasks"] for length in result["lengths"]]
    lines = ["| method | " + " | ".join(f"{t} {n}" for t, n in cols) + " | KV memory vs dynamic |"]
    lines.append("|" + "---|" * (len(cols) + 2))
    for method in result["methods"]:
        cells = [f"{100 * acc[(method, t, n)]:.0f}" if (method, t, n) in acc else "-" for t, n in cols]
        ratios = [mem[(method, n)] / mem[("dynamic", n)] for n in result["lengths"] if ("dynamic", n) in mem]
        ratio = " / ".join(f"{r:.2f}" for r in ratios) if ratios else "n/a"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def paired_summary(result: dict) -> str:
    """A markdown table: each thinned method against the cache it thins, on the same prompts, per task and
    length: the difference in points, prompts gained / lost, and a 95% interval."""
    rows = result["rows"]
    lines = ["| method | vs | task | length | prompts | Δ points | gained / lost | 95% interval |"]
    lines.append("|" + "---|" * 8)
    for method, baseline in [(m, b) for m in result["methods"] for b in baselines_of(m, result["methods"])]:
        for task in result["tasks"] + ["all"]:
            for length in result["lengths"]:
                where = {"length": length} if task == "all" else {"task": task, "length": length}
                p = paired(rows, method, baseline, **where)
                if not p.n:  # a partial results file: this task has not run yet
                    continue
                lines.append(
                    f"| {method} | {baseline} | {task} | {length} | {p.n} | {p.delta:+.1f} | "
                    f"{p.gained} / {p.lost} | {p.interval[0]:+.1f} to {p.interval[1]:+.1f} |"
                )
    return "\n".join(lines)


def report(result: dict) -> str:
    """Every table of a result: accuracy and memory (`summary`), each method against the cache it thins
    (`paired_summary`), and the divergences (`kl_summary`) when its rows carry them."""
    tables = [summary(result), paired_summary(result)]
    if any("kl" in row for row in result["rows"]):
        tables.append(kl_summary(result))
    return "\n\n".join(tables)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before anything loads: methods, lengths, tasks and samples (`parser.error` with
    what to pass), ``methods``, ``lengths``, ``tasks`` and ``path`` (the results file) made ready to use."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=list(MODELS), help="which model (default smollm2)")
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"comma-separated: {method_help()} (default {DEFAULT_METHODS})"
    )
    parser.add_argument("--lengths", default="1024,2048", help="prompt lengths in tokens (default 1024,2048)")
    parser.add_argument(
        "--tasks", default="passkey,kv", help=f"passkey and/or kv (default both; kv needs {MIN_LENGTH['kv']}+ tokens)"
    )
    parser.add_argument(
        "--prompt-style", choices=PROMPT_STYLES, help="chat or completion (default: chat if the model has a template)"
    )
    parser.add_argument(
        "--samples", type=int, default=10, help="prompts per task and length, depths spread evenly (default 10)"
    )
    parser.add_argument(
        "--tag", help=f"<results-dir>/eval_<tag>.json (default: {DEFAULT_TAG}, and the model unless smollm2)"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS, help="where the results file goes (default benchmarks/results)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--summarize", metavar="JSON", help="print the tables of a results file and run nothing")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the prompts already in <results-dir>/eval_<tag>.json (written with the same model, prompt style, "
        "--samples and --kl), run the rest",
    )
    parser.add_argument(
        "--kl",
        action="store_true",
        help="also each method's KL divergence from the cache it is built on, on that cache's answer",
    )
    args = parser.parse_args(argv)
    if args.summarize:
        return args
    try:
        args.methods = check_methods(args.methods.split(","))
        args.lengths = positive_ints(args.lengths, "--lengths")
        args.tasks = check_tasks(args.tasks.split(","), args.lengths)
    except ValueError as error:
        parser.error(str(error))
    if args.samples < 1:
        parser.error(f"--samples must be 1 or more, not {args.samples}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be 1 or more, not {args.threads}")
    args.path = args.results_dir / f"eval_{args.tag or result_tag(DEFAULT_TAG, args.model)}.json"
    args.done = None
    if args.resume and args.path.exists():
        earlier = json.loads(args.path.read_text())
        settings = {"model": MODELS[args.model][0], "prompt_style": args.prompt_style, "samples": args.samples}
        settings |= {"max_new_tokens": dict(MAX_NEW_TOKENS), "kl": args.kl}
        conflicts = resume_conflicts(earlier, settings)
        if conflicts:
            parser.error(
                f"--resume: {args.path} was written with other settings ({'; '.join(conflicts)}): give the same "
                "ones to resume it, or another --tag to start a new file"
            )
        args.done = earlier["rows"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.summarize:
        try:
            result = load_results(args.summarize, "eval")
        except ValueError as error:
            raise SystemExit(str(error)) from None
        print(report(result))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.path
    result = run(
        available_methods(args.methods),
        args.lengths,
        args.tasks,
        args.samples,
        on_prompt=lambda partial: save_json(partial, path),  # an interrupted run keeps what it measured
        model_name=args.model,
        style=args.prompt_style,
        done=args.done,
        kl=args.kl,
    )
    save_json(result, path)
    print(report(result))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
