"""Token eviction policies that ThinK stacks on: eviction picks the tokens, ThinK thins each kept token.

One small dataclass per policy, in the style of NVIDIA kvpress presses: the fields are the hyper-parameters,
the methods only score tokens. Which tokens are then kept, and the bookkeeping, belong to the cache layer.
To write your own policy, subclass `Policy` and implement `prompt_scores` (and `decode_scores` if it evicts
while decoding)::

    @dataclass
    class KeepNewest(Policy):
        budget: int = 512

        def prompt_scores(self, query, keys, real_keys, scaling):
            return torch.arange(keys.shape[-2], dtype=torch.float32).expand(*keys.shape[:2], -1)

Shapes: ``query (batch, q_heads, q_len, head_dim)``, ``keys (batch, kv_heads, tokens, head_dim)``, ``real_keys
(batch, tokens)`` bool (False at padding). Scores are ``(batch, kv_heads, tokens)`` float32; higher is kept.
On a model that caps its attention logits (Gemma 2), a ``prompt_scores`` with a ``softcap`` parameter receives the
cap to apply to the scaled logits (`window_attention` takes it); one without is called without it.
"""

from __future__ import annotations

import functools
from dataclasses import FrozenInstanceError, dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F

from ._checks import check_int
from .compact import cap_logits

__all__ = [
    "Policy",
    "SnapKV",
    "H2O",
    "StreamingLLM",
    "top_tokens",
    "keep_priority",
    "window_attention",
    "attention_and_token_weights",
    "check_policy",
    "checked_scores",
]


# ------------------------------------------------------------------------------------------- pure math
def top_tokens(
    scores: torch.Tensor,
    n_keep: int,
    always: torch.Tensor | None = None,
    never: torch.Tensor | None = None,
    prefer: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the ``n_keep`` tokens to keep per ``(batch, kv_head)``, ascending (so token order is kept).

    Priority, highest first: ``always`` tokens (the cache's full-width recent part, which must stay), then
    ``prefer`` tokens (a policy's sinks and newest tokens), then the others by score, and ``never`` tokens
    (padding) last, so a padded slot is kept only when there are fewer than ``n_keep`` real tokens. All masks
    broadcast to ``scores`` ``(B, H, T)``.
    """
    priority = keep_priority(scores, always, never, prefer)
    return torch.topk(priority, n_keep, dim=-1, sorted=False).indices.sort(dim=-1).values


def keep_priority(
    scores: torch.Tensor,
    always: torch.Tensor | None = None,
    never: torch.Tensor | None = None,
    prefer: torch.Tensor | None = None,
) -> torch.Tensor:
    """The order in which `top_tokens` keeps tokens, as float32 (higher is kept first): ``always`` tokens at +inf,
    ``prefer`` tokens at float32's largest value, ``never`` tokens at -inf, the others at their ``scores``."""
    s = scores.float()
    if prefer is not None:
        s = s.masked_fill(prefer, torch.finfo(torch.float32).max)
    if never is not None:
        s = s.masked_fill(never, float("-inf"))
    if always is not None:
        s = s.masked_fill(always, float("inf"))
    return s


#: The largest float32 logits block `window_attention` builds at once on the CPU, in elements (4 MiB), counted over
#: batch, the query group of one KV head, query rows and tokens: small enough for the CPU's caches, large enough
#: that the loop over blocks costs little.
QUERY_CHUNK_ELEMENTS = 2**20
#: The most query rows of a block on the CPU: a block computes each row's logits up to the block's last query, so
#: longer blocks waste more of the causal triangle on short prompts. On SmolLM2's shape (one thread), 128 rows were
#: the fastest or as fast as the fastest of 32 to 341 at 1k, 2k and 4k tokens.
QUERY_CHUNK_ROWS = 128
#: The same on a GPU (256 MiB, no row limit): a block per launch of a few kernels, so larger blocks mean fewer
#: launches.
GPU_QUERY_CHUNK_ELEMENTS = 2**26


def _query_chunk(
    rows: int, tokens: int, batch: int, group: int, budget: int | None = None, max_rows: int | None = None
) -> int:
    """How many query rows `window_attention` scores at once: as many as keep one KV head's ``(batch, group, chunk,
    tokens)`` block within ``budget`` elements (default `QUERY_CHUNK_ELEMENTS`), at least one, at most ``rows`` and
    ``max_rows`` (when given)."""
    budget = QUERY_CHUNK_ELEMENTS if budget is None else budget
    per_row = batch * group * tokens
    return max(1, min(rows, max_rows or rows, budget // max(per_row, 1)))


def _softmax_blocks(query, keys, real_keys, scaling, rows, mask=None, softcap=None):
    """The softmax of the last ``rows`` queries over ``keys``, a block of query rows of one KV head at a time (see
    `_query_chunk`).

    Yields ``(head, start, stop, probs)``: ``probs (batch, group * n, visible)`` float32 are the attention weights
    (rows sum to one) of queries ``start:stop`` of KV head ``head``'s query group, laid out group member by member,
    over the ``visible`` first keys (those up to the block's last query). Masked: ``mask`` (bool, True = attend,
    ``(batch | 1, 1, q_len, tokens)``) when given, else causal and ``real_keys`` padding; the logits are capped first
    under a ``softcap`` (Gemma 2). Every block is computed in one preallocated buffer (the logits matrix product
    writes into it and the softmax runs in place): ``probs`` is overwritten by the next block, and memory stays within
    one block however long the prompt.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, tokens = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    first = tokens - q_len  # the stored position of query 0
    k = keys.float().transpose(-1, -2)
    padded = None if mask is not None or bool(real_keys.all()) else ~real_keys
    if keys.device.type == "cuda":
        chunk = _query_chunk(rows, tokens, batch, group, GPU_QUERY_CHUNK_ELEMENTS)
    else:
        chunk = _query_chunk(rows, tokens, batch, group, QUERY_CHUNK_ELEMENTS, QUERY_CHUNK_ROWS)
    buffer = torch.empty(batch * group * chunk * tokens, dtype=torch.float32, device=keys.device)
    future = None  # causal: each block's later queries, built once (a given mask says it all)
    if mask is None:
        future = torch.ones(chunk, chunk, dtype=torch.bool, device=keys.device).triu_(1)
    lowest = torch.finfo(torch.float32).min
    for start in range(q_len - rows, q_len, chunk):
        stop = min(start + chunk, q_len)
        n, visible = stop - start, first + stop  # keys after the block's last query are masked for every row
        hidden = None  # the keys masked besides the causal future
        if mask is not None:
            hidden = ~mask[:, 0, None, start:stop, :visible]
        elif padded is not None:
            hidden = padded[:, None, None, :visible]
        for head in range(kv_heads):
            q = (query[:, head * group : (head + 1) * group, start:stop].float() * scaling).reshape(batch, -1, head_dim)
            logits = buffer[: batch * group * n * visible].view(batch, group * n, visible)
            cap_logits(torch.matmul(q, k[:, head, :, :visible], out=logits), softcap)
            blocks = logits.view(batch, group, n, visible)
            if future is not None:  # causal: only the last n keys are in some row's future
                blocks[..., visible - n :].masked_fill_(future[:n, :n], lowest)
            if hidden is not None:
                blocks.masked_fill_(hidden, lowest)
            yield head, start, stop, torch.softmax(logits, dim=-1, out=logits)


def _add_column_sums(total, probs, real_rows):
    """Add each key's attention weight, summed over a block's real query rows, to ``total (batch, visible)`` (a view
    of the sums of one KV head): ``probs (batch, group * n, visible)`` as `_softmax_blocks` yields them,
    ``real_rows (batch, n)`` float, 1 for a real query row and 0 for a padded one, the same for each group member."""
    per_row = real_rows.repeat(1, probs.shape[1] // real_rows.shape[1])
    total += torch.matmul(per_row.unsqueeze(-2), probs).squeeze(-2)


@torch.no_grad()  # scores choose tokens: no gradient flows through a choice (and the blocks are written in place)
def window_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    real_keys: torch.Tensor,
    scaling: float,
    rows: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention weights of the last ``rows`` queries over all keys, summed over those queries and each KV head's
    query group: ``(batch, kv_heads, tokens)`` float32. Causal and padding masks apply; padded query rows count 0.
    ``softcap``: the model's attention logit cap (Gemma 2), applied to the scaled logits before the masks.

    Computed a block of query rows at a time (`_softmax_blocks`), so memory stays within one block of
    `QUERY_CHUNK_ELEMENTS` floats however long the prompt: H2O scores every prompt query.
    """
    batch, q_len, tokens = query.shape[0], query.shape[2], keys.shape[2]
    rows = q_len if rows is None else min(rows, q_len)
    first = tokens - q_len
    total = torch.zeros(batch, keys.shape[1], tokens, dtype=torch.float32, device=keys.device)
    real_rows = real_keys[:, first:].float()
    for head, start, stop, probs in _softmax_blocks(query, keys, real_keys, scaling, rows, softcap=softcap):
        _add_column_sums(total[:, head, : probs.shape[-1]], probs, real_rows[:, start:stop])
    return total


def attention_and_token_weights(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    real_keys: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's attention and, from the same softmax, what `window_attention` gives H2O: one pass instead of two.

    ``query (batch, q_heads, q_len, head_dim)``, ``keys``/``values (batch, kv_heads, tokens, ...)`` with the queries
    the last ``q_len`` tokens, ``mask`` bool ``(batch | 1, 1, q_len, tokens)`` (True = attend) or None (causal),
    ``real_keys (batch, tokens)``. Returns the output ``(batch, q_len, q_heads, v_dim)`` in ``values.dtype`` (the
    layout of transformers' attention functions) and the weights each key received, summed over the real query
    rows of its group, ``(batch, kv_heads, tokens)`` float32. Memory: one block, as `window_attention`.
    """
    batch, q_heads, q_len, _ = query.shape
    kv_heads, tokens = keys.shape[1], keys.shape[2]
    group, first = q_heads // kv_heads, tokens - q_len
    out = values.new_empty(batch, kv_heads, group, q_len, values.shape[-1])
    total = torch.zeros(batch, kv_heads, tokens, dtype=torch.float32, device=keys.device)
    real_rows = real_keys[:, first:].float()
    for head, start, stop, probs in _softmax_blocks(query, keys, real_keys, scaling, q_len, mask):
        visible = probs.shape[-1]
        _add_column_sums(total[:, head, :visible], probs, real_rows[:, start:stop])
        # cast once normalised: unnormalised weights sum to up to `visible`, and times values overflow float16
        block = torch.matmul(probs.to(values.dtype), values[:, head, :visible])
        out[:, head, :, start:stop] = block.view(batch, group, stop - start, -1)
    return out.view(batch, q_heads, q_len, -1).transpose(1, 2).contiguous(), total


# -------------------------------------------------------------------------------------------- policies
@dataclass
class Policy:
    """Base class of a token policy.

    Attributes a subclass sets: ``budget`` (tokens kept per KV head, None for no limit), and the class flags
    ``evicts_while_decoding`` (keep the budget while generating, not only after the prompt) and
    ``accumulates_attention`` (the layer adds each step's attention weights to the tokens' scores).
    """

    budget: int | None = None

    evicts_while_decoding: ClassVar[bool] = False
    accumulates_attention: ClassVar[bool] = False
    #: How many first real tokens are always kept (attention sinks).
    sink = 0

    @property
    def protected_recent(self) -> int:
        """How many newest tokens are always kept."""
        return 0

    @property
    def observation_window(self) -> int:
        """How many of the prompt's last queries `prompt_scores` needs (the layer remembers them across the
        forwards of a chunked prompt). It receives the last ``max(observation_window, ThinKCache.window)``: a policy
        that scores with fewer takes the last rows it needs."""
        return 0

    def prompt_scores(
        self, query: torch.Tensor, keys: torch.Tensor, real_keys: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """Scores of the prompt's tokens at the end of the prompt ``(batch, kv_heads, tokens)``; higher is kept.

        ``query`` holds the prompt's last queries (the larger of `observation_window` and the cache's ``window``,
        or fewer in a shorter prompt; padded rows zeroed), the last positions of ``keys``. A policy with
        ``accumulates_attention`` also receives ``accumulated``: each token's attention weight summed over every
        query of the prompt, ``(batch, kv_heads, tokens)`` float32. On a model that caps its attention logits
        (Gemma 2), a ``softcap`` parameter, if there is one, receives the cap."""
        raise NotImplementedError(f"{type(self).__name__} must implement prompt_scores")

    def decode_scores(self, positions: torch.Tensor, accumulated: torch.Tensor | None) -> torch.Tensor:
        """Scores of stored tokens while decoding, from their logical ``positions`` and accumulated attention."""
        raise NotImplementedError(f"{type(self).__name__} does not evict while decoding")


def checked_scores(policy: Policy, method: str, scores: object, shape: tuple[int, ...]) -> torch.Tensor:
    """What a policy's ``method`` (``prompt_scores`` or ``decode_scores``) returned, checked to be a tensor of the
    tokens' ``shape`` ``(batch, kv_heads, tokens)``: a custom policy's mistake is named where it is made, not
    broadcast into other heads' choices nor raised deep inside ``topk``."""
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(shape):
        got = f"shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(
            f"{type(policy).__name__}.{method} returned {got}; it must return a tensor of scores shaped (batch, "
            f"kv_heads, tokens) = {tuple(shape)}"
        )
    return scores


def check_policy(policy: object) -> Policy | None:
    """``policy`` if it is None or a `Policy` whose ``budget`` is None or an int >= 1 (a subclass's own too), else
    a TypeError or ValueError saying what to pass."""
    if policy is None:
        return None
    if not isinstance(policy, Policy):
        raise TypeError(
            f"policy must be a think_cache Policy (SnapKV, H2O, StreamingLLM or a subclass), got "
            f"{type(policy).__name__}"
        )
    if policy.budget is not None:
        check_int("budget", policy.budget, 1, owner=type(policy).__name__)
    return policy


class _FixedSettings:
    """A built-in policy's settings are checked once, when it is built, and fixed from then on: caches share the
    policy object, and a field changed afterwards would skip the checks and leave derived values stale (make a new
    policy instead, e.g. ``dataclasses.replace(policy, budget=512)``). A subclass's own ``__post_init__`` may still
    set its fields: they are fixed once the most derived class's ``__post_init__`` returns."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        post_init = cls.__dict__.get("__post_init__")
        if post_init is None:
            return

        def checked_then_fixed(self, *args) -> None:
            post_init(self, *args)
            if type(self).__post_init__ is checked_then_fixed:  # the most derived class's checks ran
                self.__dict__["_fixed"] = True

        functools.update_wrapper(checked_then_fixed, post_init)
        cls.__post_init__ = checked_then_fixed

    def __setattr__(self, name: str, value: object) -> None:
        if self.__dict__.get("_fixed") and name in self.__dataclass_fields__:
            if not self.__dataclass_fields__[name].init:  # derived (StreamingLLM's budget): set through its sources
                settable = [spec.name for spec in fields(self) if spec.init]
                raise FrozenInstanceError(
                    f"{type(self).__name__}'s {name} follows from its settings ({', '.join(settable)}): make a new "
                    f"one with those, e.g. dataclasses.replace(policy, {settable[-1]}=...)"
                )
            raise FrozenInstanceError(
                f"{type(self).__name__}'s settings are fixed once it is built (its checks ran then, and caches may "
                f"share it): make a new one, e.g. dataclasses.replace(policy, {name}={value!r})"
            )
        object.__setattr__(self, name, value)


@dataclass
class SnapKV(_FixedSettings, Policy):
    """SnapKV (Li et al. 2024, arXiv 2404.14469): after the prompt, per KV head, keep the ``budget`` tokens most
    attended by the observation window, attention pooled along the sequence; the window itself is always kept.

    Parameters
    ----------
    budget:
        Prompt tokens kept per KV head (at least ``window``). Tokens generated afterwards are all kept.
    window:
        The last prompt queries whose attention scores the tokens (every query head of a KV head's group).
    kernel:
        Odd width of the pooling along the sequence, which keeps neighbours of attended tokens.
    pooling:
        ``"avg"`` or ``"max"``.
    """

    budget: int = 1024
    window: int = 32
    kernel: int = 7
    pooling: str = "avg"

    def __post_init__(self) -> None:
        self.window = check_int("window", self.window, 1, owner="SnapKV")
        self.budget = check_int("budget", self.budget, 1, owner="SnapKV")
        if self.budget < self.window:
            raise ValueError(
                f"SnapKV: budget ({self.budget}) is smaller than the window ({self.window}); the window is always "
                "kept, so the budget must be at least the window"
            )
        self.kernel = check_int("kernel", self.kernel, 1, owner="SnapKV")
        if self.kernel % 2 == 0:
            raise ValueError(f"SnapKV: kernel must be odd (centred pooling), got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"SnapKV: pooling must be 'avg' or 'max', got {self.pooling!r}")

    @property
    def protected_recent(self) -> int:
        return self.window

    @property
    def observation_window(self) -> int:
        return self.window

    def prompt_scores(
        self, query: torch.Tensor, keys: torch.Tensor, real_keys: torch.Tensor, scaling: float,
        softcap: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        scores = window_attention(query, keys, real_keys, scaling, rows=self.window, softcap=softcap)
        batch, heads, tokens = scores.shape
        flat = scores.reshape(batch * heads, 1, tokens)
        pad = self.kernel // 2
        if self.pooling == "avg":  # the mean over the real tokens around each one: a row's left padding, like the
            # prompt's edges, does not count (a padded row's first tokens scored 4/7, 5/7, 6/7 of the same row alone)
            real = real_keys.to(flat.dtype)[:, None].expand(batch, heads, tokens).reshape(batch * heads, 1, tokens)
            total = F.avg_pool1d(flat * real, self.kernel, stride=1, padding=pad, count_include_pad=True)
            count = F.avg_pool1d(real, self.kernel, stride=1, padding=pad, count_include_pad=True)
            pooled = total / count.clamp(min=1 / self.kernel)
        else:
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        return pooled.view(batch, heads, tokens)


@dataclass
class H2O(_FixedSettings, Policy):
    """Heavy-Hitter Oracle (Zhang et al. 2023, arXiv 2306.14048): keep the tokens with the largest accumulated
    attention plus the newest ``recent`` ones, ``budget`` per KV head after the prompt; while decoding the layer
    evicts once per fold block (32 tokens), back to the budget, so it holds between ``budget`` and ``budget + 32``
    tokens (a chat's later prompt is kept whole through its forward; the next fold, the first decoding step after a
    prompt of more than 32 tokens, evicts all that exceeds the budget).

    Parameters
    ----------
    budget:
        Tokens kept per KV head, while decoding too (plus at most a fold block of slack).
    recent:
        Newest tokens always kept (part of the budget).
    """

    budget: int = 1024
    recent: int = 32

    evicts_while_decoding: ClassVar[bool] = True
    accumulates_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.recent = check_int("recent", self.recent, 0, owner="H2O")
        self.budget = check_int("budget", self.budget, 1, owner="H2O")
        if self.budget <= self.recent:
            raise ValueError(
                f"H2O: budget ({self.budget}) must be larger than recent ({self.recent}), to leave room for heavy "
                "hitters"
            )

    @property
    def protected_recent(self) -> int:
        return self.recent

    def prompt_scores(
        self, query: torch.Tensor, keys: torch.Tensor, real_keys: torch.Tensor, scaling: float,
        accumulated: torch.Tensor | None = None, softcap: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        return accumulated

    def decode_scores(self, positions: torch.Tensor, accumulated: torch.Tensor | None) -> torch.Tensor:
        return accumulated


@dataclass
class StreamingLLM(_FixedSettings, Policy):
    """StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): keep the first ``sink`` tokens (attention sinks) and a
    sliding window of the newest ``recent`` tokens, after the prompt and while decoding (evicting once per fold
    block of 32 tokens, back to the budget: a layer holds between ``budget`` and ``budget + 32`` tokens; a chat's
    later prompt is kept whole through its forward, and the next fold evicts all that exceeds the budget).

    Parameters
    ----------
    sink:
        First real tokens always kept.
    recent:
        Newest tokens kept. The budget is ``sink + recent``.
    """

    sink: int = 4
    recent: int = 1020
    budget: int = field(init=False, repr=False)  # sink + recent: the repr shows what the constructor takes

    evicts_while_decoding: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.sink = check_int("sink", self.sink, 0, owner="StreamingLLM")
        self.recent = check_int("recent", self.recent, 1, owner="StreamingLLM")
        self.budget = self.sink + self.recent

    @property
    def protected_recent(self) -> int:
        return self.recent

    def prompt_scores(
        self, query: torch.Tensor, keys: torch.Tensor, real_keys: torch.Tensor, scaling: float,
        softcap: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        batch, heads, tokens = keys.shape[:3]
        return torch.arange(tokens, dtype=torch.float32, device=keys.device).expand(batch, heads, tokens)

    def decode_scores(self, positions: torch.Tensor, accumulated: torch.Tensor | None) -> torch.Tensor:
        return positions.float()
