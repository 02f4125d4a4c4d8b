"""Plots of what a ThinKCache kept. matplotlib is optional: ``pip install think-cache[plot]``."""

from __future__ import annotations

from numbers import Integral
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .cache import ThinKCache

__all__ = ["channel_map", "plot_channels"]


def channel_map(cache, batch_index: int = 0) -> torch.Tensor:
    """``(layers * kv_heads, head_dim)`` float: 1 where a key channel is kept, 0 where pruned, for one batch row.

    Rows are ordered layer by layer, KV head by KV head (attention layers only, in a hybrid model). Where layers
    differ in head size (Gemma 4's global layers are wider), every row is as wide as the widest and a narrower
    layer's rows end in NaN. A layer that prunes must have been compacted (its channels chosen): ``generate``
    compacts at the prompt's end; after plain forwards, call ``cache.compact()`` first.
    """
    return torch.cat(list(_layer_maps(cache, batch_index).values()))


def _layer_maps(cache, batch_index: int) -> dict[int, torch.Tensor]:
    """Each initialized attention layer's ``(kv_heads, widest head_dim)`` map, by layer index."""
    maps = {}
    for index, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is None:  # not initialized, or a hybrid model's linear-attention layer
            continue
        if layer.prunes and not layer.is_compacted:
            raise ValueError(
                "the cache has not chosen its channels yet (it does at the end of a prompt, which generate marks): "
                "after plain forwards over a prompt, call cache.compact() before mapping its channels"
            )
        batch, heads, head_dim = layer.keys.shape[0], layer.keys.shape[1], layer.keys.shape[-1]
        if isinstance(batch_index, bool) or not isinstance(batch_index, Integral) or not -batch <= batch_index < batch:
            raise ValueError(f"batch_index must be an int in [-{batch}, {batch}) (the cache holds {batch} rows), got "
                             f"{batch_index!r}")  # fmt: skip
        kept = torch.ones(heads, head_dim)
        if layer.key_channels is not None:
            kept = torch.zeros(heads, head_dim)
            kept.scatter_(-1, layer.key_channels[batch_index].long().cpu(), 1.0)
        maps[index] = kept
    if not maps:
        raise ValueError("the cache is empty: run the model with it first")
    width = max(kept.shape[-1] for kept in maps.values())
    return {
        i: torch.nn.functional.pad(kept, (0, width - kept.shape[-1]), value=float("nan")) for i, kept in maps.items()
    }


def plot_channels(cache: ThinKCache, batch_index: int = 0, ax: Axes | None = None, title: str | None = None) -> Figure:
    """Heat map of the kept key channels per layer and KV head (rows) and channel (columns).

    Returns the matplotlib Figure. In a notebook it displays by itself; elsewhere ``fig.savefig("channels.png")``.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plot_channels needs matplotlib: pip install 'think-cache[plot]'") from error
    maps = _layer_maps(cache, batch_index)
    data = torch.cat(list(maps.values())).numpy()
    starts, row = [], 0  # the first row of each layer (layers may differ in KV heads)
    for kept in maps.values():
        starts.append(row)
        row += kept.shape[0]
    heads = {kept.shape[0] for kept in maps.values()}
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, max(3.0, 0.12 * data.shape[0])))
    else:
        fig = ax.figure
    ax.imshow(data, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0, vmax=1)
    step = max(1, len(starts) // 10)
    layers = list(maps)
    ax.set_yticks(starts[::step], [str(i) for i in layers[::step]])
    ax.set_ylabel(f"layer ({'/'.join(str(h) for h in sorted(heads))} KV heads each)")
    ax.set_xlabel("key channel")
    ratio = 1 - float(torch.nanmean(torch.from_numpy(data)))
    ax.set_title(title or f"kept key channels (blue), {ratio:.0%} pruned, batch row {batch_index}")
    fig.tight_layout()
    return fig
