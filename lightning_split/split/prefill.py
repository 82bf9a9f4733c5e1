"""A long prompt's prefill in chunks along the sequence, all in flight at once.

Over a slow link a prompt's hidden state takes a while to cross, and in a U-shaped split the
server's output comes back the same size. Sent whole, the server starts when the last byte is in,
and the client when the last byte is back. Cut into chunks of the sequence, chunk j + 1 travels
while the server computes chunk j, and chunk j's output comes back while chunk j + 1 goes out.

Each chunk is an ordinary cached INFER: ``past`` = the tokens before it, ``new`` = its length;
the server keeps the keys and values of the earlier chunks in the session's cache, so chunk j
attends to every token before it, as in one prefill. The block arguments are cut with it, by
their shapes: the attention mask's query rows (and key columns up to the chunk's end), position
ids and cache positions along their last dimension, rotary tables along their sequence dimension.
A call with an argument of the sequence's length that fits none of these goes whole.

Where only the last positions' result is read (generation's ``logits_to_keep`` or ``keep_last``),
the earlier chunks ask for one position and their replies are dropped; otherwise the chunks'
outputs are joined along the sequence.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_split.split.surgery import map_leaves

MAX_CHUNKS = 8
MIN_CHUNK_TOKENS = 16


class _Uncuttable(Exception):
    """A block argument of the sequence's length whose sequence dimension is not known."""


def plan(body: dict[str, Any], chunk_bytes: int | None) -> list[dict[str, Any]] | None:
    """The chunk requests for a prefill ``body`` (an INFER with ``past`` 0), or None to send it whole."""
    hidden, cache = body.get("hidden"), body.get("cache")
    if (not chunk_bytes or not isinstance(cache, dict) or cache.get("past") != 0 or cache.get("reorder") is not None
            or body.get("labels") is not None or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3):
        return None
    tokens = hidden.shape[1]
    size = hidden.numel() * hidden.element_size()
    chunks = min(MAX_CHUNKS, tokens // MIN_CHUNK_TOKENS, math.ceil(size / chunk_bytes))
    if chunks < 2:
        return None
    bounds = [round(i * tokens / chunks) for i in range(chunks + 1)]
    last = bounds[-1] - bounds[-2]
    earlier = _earlier_asks(body, last)
    if earlier is False:
        return None
    try:
        requests = []
        for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
            block = map_leaves(lambda v, a=a, b=b: _cut(v, tokens, a, b), body["block"])
            request = {**body, "hidden": hidden[:, a:b], "block": block,
                       "cache": {"past": a, "new": b - a}}
            requests.append(request if i == chunks - 1 or earlier is None else {**request, **earlier})
    except _Uncuttable:
        return None
    return requests


def _earlier_asks(body: dict[str, Any], last: int) -> dict[str, Any] | None | bool:
    """What the chunks before the last ask for when only the last one's result is read (one
    position); None: every chunk's result is kept; False: chunking would change the result."""
    if "result" not in body:  # a U-shaped middle: its hidden state, or its last keep_last positions
        keep = int(body.get("keep_last") or 0)
        return None if keep == 0 else ({"keep_last": 1} if keep <= last else False)
    result, keep = body.get("result"), int(body.get("logits_to_keep") or 0)
    if result == "topk":  # the last position's best logits
        return {}
    if result in (None, "auto", "logits"):
        return None if keep == 0 else ({"logits_to_keep": 1} if keep <= last else False)
    return None if result == "hidden_states" else False


def join(requests: list[dict[str, Any]], replies: list[dict[str, Any]], whole: dict[str, Any]) -> dict[str, Any]:
    """The reply the whole prefill would have had, from its chunks' replies."""
    if _earlier_asks(whole, requests[-1]["cache"]["new"]) is not None:
        return replies[-1]
    return {k: torch.cat([r[k] for r in replies], dim=-2) for k in replies[-1]}


def _cut(value: Any, tokens: int, a: int, b: int) -> Any:
    """One block argument of a prefill of ``tokens`` positions, for the chunk [a, b)."""
    if not isinstance(value, torch.Tensor) or tokens not in value.shape:
        return value
    if value.dim() == 4 and tuple(value.shape[-2:]) == (tokens, tokens):
        return value[..., a:b, :b]  # an attention mask: the chunk's queries, the keys up to its end
    if value.dim() <= 2 and value.shape[-1] == tokens:
        return value[..., a:b]  # position ids, cache positions
    if value.dim() == 3 and value.shape[-2] == tokens:
        return value[..., a:b, :]  # rotary cos/sin tables (batch, tokens, head dim)
    raise _Uncuttable(tuple(value.shape))
