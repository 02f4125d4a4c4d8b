"""PNG plots from the committed results: the accuracy/memory frontier, decode time against context, and the
kept-channel map of SmolLM2.

    python -m benchmarks.plots [--channels] [--results-dir DIR]

Reads and writes in benchmarks/results (``--results-dir`` for another folder): a frontier per model from the
``eval_*.json`` files, a ``decode_<tag>.png`` per ``speed_<tag>.json``; runs under the tools' default tag
(``local``: a quick try) are left out, so that they never enter the committed figures.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .common import RESULTS, group_mean  # noqa: E402


def family(method: str) -> str:
    """The line a method belongs to in the frontier: its name with the ratio or budget it sweeps left out."""
    if method == "dynamic":
        return "DynamicCache"
    if re.fullmatch(r"think-[\d.]+", method):
        return "ThinK (key_ratio)"
    if re.fullmatch(r"snapkv-\d+", method):
        return "SnapKV (budget)"
    if m := re.fullmatch(r"snapkv-\d+\+think-([\d.]+)", method):
        return f"SnapKV + ThinK {m.group(1)}"
    if m := re.fullmatch(r"think-([\d.]+)\+value-([\d.]+)", method):
        return f"ThinK {m.group(1)} + values {m.group(2)}"
    if m := re.fullmatch(r"think-([\d.]+)\+recent-(\d+)", method):
        return f"ThinK {m.group(1)}, recent={m.group(2)}"
    if m := re.fullmatch(r"think-([\d.]+)\+int\d", method):
        return f"ThinK {m.group(1)} + 8/4/2-bit"
    if re.fullmatch(r"quantized-\d", method):
        return "QuantizedCache, quanto (4/2-bit)"
    return method


def model_of(result: dict) -> str:
    """The model a results file was measured on, by its `think_cache.models.MODELS` key (files from before
    ``--model`` are SmolLM2's)."""
    from think_cache.models import MODELS

    keys = {title: key for key, (title, _) in MODELS.items()}
    return keys.get(result.get("model"), "smollm2")


def frontier(eval_files: list, path, model: str = "smollm2") -> bool:
    """One panel per eval file and context length, so that every point in a panel comes from the same prompts.
    Returns whether it drew: files with no panel (DynamicCache alone, or no rows) draw nothing, with a note."""
    panels = []  # (file name, rows of one context length)
    for f in eval_files:
        rows = json.loads(f.read_text())["rows"]
        panels += [(f.name, [r for r in rows if r["length"] == n]) for n in sorted({r["length"] for r in rows})]
    # memory is drawn against DynamicCache's: files without it (a sensitivity run), or with it alone, have no panel
    panels = [(name, rows) for name, rows in panels if any(r["method"] == "dynamic" for r in rows)]
    panels = [(name, rows) for name, rows in panels if len({r["method"] for r in rows}) > 1]
    if not panels:
        names = ", ".join(f.name for f in eval_files)
        print(f"no frontier for {model}: {names} hold no context length with DynamicCache and another method")
        return False
    ncols = min(len(panels), 2 if len(panels) == 4 else 3)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    # one colour per line name across every panel, so that the shared legend reads the same everywhere
    names = sorted({family(r["method"]) for _, rows in panels for r in rows})
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    for ax, (file_name, rows) in zip(axes.flat, panels, strict=False):
        acc = group_mean(rows, ("method",), "correct")
        mem = group_mean(rows, ("method",), "held_bytes")
        lines = defaultdict(list)
        for (method,), a in acc.items():
            lines[family(method)].append((mem[(method,)] / mem[("dynamic",)], 100 * a, method))
        for name, points in sorted(lines.items()):
            points.sort()
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                "o-" if len(points) > 1 else "*",
                label=name,
                color=colours[name],
                markersize=10 if name == "DynamicCache" else 6,
            )
        tasks = sorted({r["task"] for r in rows})
        n_prompts = len({(r["task"], r["seed"]) for r in rows})
        ax.set_title(f"{rows[0]['length']} tokens ({', '.join(tasks)}; {n_prompts} prompts)\n{file_name}", fontsize=10)
        ax.set_xlabel("KV cache bytes / DynamicCache")
        ax.set_ylabel("accuracy (%)")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    labels = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labels.setdefault(label, handle)
    legend_columns = min(len(labels), 4 if ncols > 1 else 2)  # a one-panel figure is narrow
    fig.legend(labels.values(), labels.keys(), fontsize=8, loc="lower center", ncol=legend_columns)
    legend_rows = -(-len(labels) // legend_columns)
    from think_cache.models import MODELS

    fig.suptitle(f"{MODELS[model][0]}: accuracy against KV memory")
    # the top margin keeps the suptitle (about 0.4 inch) clear of the first row's two-line titles
    fig.tight_layout(rect=(0, (0.02 + 0.05 * legend_rows) / nrows, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def decode_time(speed_file, path) -> None:
    """Decode time per token and the cache's size against the context, one line per method, titled with the
    model the file names (SmolLM2 for files from before ``model`` was recorded)."""
    data = json.loads(speed_file.read_text())
    rows = data["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    by = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    for method, rs in by.items():
        rs.sort(key=lambda r: r["length"])
        style = "ks--" if method == "dynamic" else "o-"  # a marker: one context length draws a point only
        ax1.plot([r["length"] for r in rs], [1000 * r["decode_s_per_token"] for r in rs], style, label=method)
        ax2.plot([r["length"] for r in rs], [r["held_bytes"] / 2**20 for r in rs], style, label=method)
    ax1.set_xlabel("context (tokens)")
    ax1.set_ylabel("decode time per token (ms)")
    ax2.set_xlabel("context (tokens)")
    ax2.set_ylabel("KV cache after the prompt (MiB)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    model = data.get("model", "SmolLM2-135M-Instruct")
    fig.suptitle(f"{model}, {data['device']} {data['dtype']}, median of {data['repeats']} runs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def channels(path, key_ratio: float = 0.5) -> None:
    import torch

    import think_cache
    from think_cache import ThinKCache
    from think_cache.models import load_smollm2

    from .common import passkey

    model, tokenizer = load_smollm2()
    think_cache.patch(model)
    cache = ThinKCache(key_ratio=key_ratio)
    inputs = passkey(tokenizer, 1024, 0.5, seed=0).inputs
    cache.mark_prompt_end(inputs["input_ids"].shape[1])  # what generate says: the channels are chosen at its end
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1, **{think_cache._compat.CACHE_ARGUMENT: cache})
    fig = cache.plot_channels(title=f"SmolLM2-135M, 1k-token prompt, key_ratio={key_ratio}: kept key channels")
    fig.savefig(path, dpi=120)


def _tagged(results: Path, kind: str) -> list[Path]:
    """The ``<kind>_<tag>.json`` files of ``results``, but for the default tag's (``local``, ``local_<model>``)."""
    return [f for f in sorted(results.glob(f"{kind}_*.json")) if not f.stem.startswith(f"{kind}_local")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", action="store_true", help="also run SmolLM2 once for the channel map")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="where the JSON files are and the PNGs go (default benchmarks/results)",
    )
    args = parser.parse_args(argv)
    results = args.results_dir or RESULTS
    if not results.is_dir():
        parser.error(f"--results-dir {results} is not a folder")
    written = []
    by_model = defaultdict(list)  # one frontier figure per model: frontier.png (SmolLM2), frontier_<model>.png
    for f in _tagged(results, "eval"):
        result = json.loads(f.read_text())
        if "rows" in result:  # a sweep file holds several runs (and its script) instead: not a frontier
            by_model[model_of(result)].append(f)
    for model, files in sorted(by_model.items()):
        name = "frontier.png" if model == "smollm2" else f"frontier_{model}.png"
        if frontier(files, results / name, model):
            written.append(name)
    for speed in _tagged(results, "speed"):
        name = f"decode_{speed.stem.removeprefix('speed_')}.png"
        decode_time(speed, results / name)
        written.append(name)
    if args.channels:
        channels(results / "channels.png")
        written.append("channels.png")
    print("wrote", ", ".join(written) or "nothing (no results yet)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
