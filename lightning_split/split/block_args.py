"""A block's arguments by meaning, not by one transformers release's names and positions.

The client's proxy receives exactly what the model passed its first server block:
``block(hidden, *args, **kwargs)``, positions and names as the installed transformers lays them
out (GPT-2 passes its cache and mask by position; a release renames ``past_key_values`` to
``cache``). On the wire they travel as a ``BlockArguments`` message (``split.proto``): the
arguments every decoder block shares have fields of their own (attention mask, positions, rotary
tables, cache position, the KV cache, use_cache) and anything else goes under its parameter name
in ``extra``. The server passes each to its own block under the name that block's signature gives
it, by keyword. So a client and a server that name these arguments differently, or lay them out
in another order, still agree; an argument the server's block has no place for is refused.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from lightning_split.wire.markers import KV_CACHE, KvCacheRef

# The shared arguments: the wire's field, then the parameter names blocks give it (first: ours).
NEUTRAL: dict[str, tuple[str, ...]] = {
    "attention_mask": ("attention_mask",),
    "position_ids": ("position_ids",),
    "rotary": ("position_embeddings",),
    "cache_position": ("cache_position",),
    "kv_cache": ("cache", "past_key_values", "past_key_value", "layer_past"),
    "use_cache": ("use_cache",),
}
MEANING = {name: field for field, names in NEUTRAL.items() for name in names}


class BlockArgumentError(ValueError):
    """Block arguments that the receiving block cannot take."""


@dataclass(frozen=True)
class BlockSignature:
    """The parameters of a block's ``forward`` after its hidden state, as plain data."""

    names: tuple[str, ...]  # positional-or-keyword and keyword-only, in order
    var_positional: bool = False
    var_keyword: bool = False

    @classmethod
    def of(cls, block: nn.Module) -> BlockSignature:
        params = list(inspect.signature(block.forward).parameters.values())[1:]  # [0]: the hidden state
        kinds = inspect.Parameter
        return cls(tuple(p.name for p in params if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)),
                   any(p.kind == kinds.VAR_POSITIONAL for p in params),
                   any(p.kind == kinds.VAR_KEYWORD for p in params))


def to_neutral(signature: BlockSignature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The client's call ``block(hidden, *args, **kwargs)`` as a ``BlockArguments`` body: every
    argument named, the shared ones under their fields; None arguments left out (absent = None)."""
    if len(args) > len(signature.names):
        raise BlockArgumentError(f"the block was called with {len(args)} positional arguments after the hidden "
                                 f"state; its signature names {len(signature.names)}")
    named = dict(zip(signature.names, args, strict=False))  # checked: no more args than names
    for name, value in kwargs.items():
        if name in named:
            raise BlockArgumentError(f"the block's argument {name!r} was given twice")
        named[name] = value
    body: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in named.items():
        if value is None:
            continue
        field = MEANING.get(name)
        if field == "kv_cache":
            if not isinstance(value, KvCacheRef):
                raise BlockArgumentError(f"the block's {name!r} is not the KV cache")
            body["kv_cache"] = True
        elif field is not None:
            body[field] = value
        else:
            extra[name] = value
    if extra:
        body["extra"] = extra
    return body


def from_neutral(signature: BlockSignature, body: dict[str, Any] | None) -> dict[str, Any]:
    """The keyword arguments of the server's block for a ``BlockArguments`` body (the KV cache as
    its marker, which the session replaces by its cache)."""
    body = dict(body or {})
    if not isinstance(body.get("extra", {}), dict):
        raise BlockArgumentError("block extra must be a map of parameter names")
    kwargs: dict[str, Any] = {}
    for field, names in NEUTRAL.items():
        value = body.pop(field, None)
        if field == "kv_cache":
            if value is not None and not isinstance(value, bool):
                raise BlockArgumentError("block kv_cache must be a bool")
            value = KV_CACHE if value else None
        if value is None:
            continue
        name = next((n for n in names if n in signature.names), None)
        if name is None and signature.var_keyword and field != "kv_cache":
            name = names[0]  # taken by the block's **kwargs, as transformers passes it on (GPT-2's positions)
        if name is None:  # a cache the blocks would not see would silently decode without it
            raise BlockArgumentError(f"the server's blocks take no {field.replace('_', ' ')}")
        kwargs[name] = value
    for name, value in (body.pop("extra", None) or {}).items():
        if name in MEANING:
            raise BlockArgumentError(f"block extra {name!r} has a field of its own ({MEANING[name]})")
        if name not in signature.names and not signature.var_keyword:
            raise BlockArgumentError(f"the server's blocks take no argument {name!r}")
        kwargs[name] = value
    if body:
        raise BlockArgumentError(f"unknown block arguments: {sorted(body)}")
    return kwargs
