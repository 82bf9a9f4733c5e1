"""Markers: places in a block's arguments that the server fills (``Value.marker`` in split.proto).

They are values of their own on the wire, not strings, so that any string argument travels as
itself and a client in another language writes them from the .proto alone.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KvCacheRef", "GradInputRef", "KV_CACHE"]


@dataclass(frozen=True)
class KvCacheRef:
    """Where the client's block received its KV-cache object: the server puts the session's own
    cache for its layers there."""


@dataclass(frozen=True)
class GradInputRef:
    """A block argument that needs a gradient: the tensor travels in the body's ``grad_inputs`` at
    ``index``, and its gradient comes back in ``grad_extra`` at the same index."""

    index: int


KV_CACHE = KvCacheRef()
