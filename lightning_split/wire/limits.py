"""Receiver-side limits: every size, count and depth read from the wire is checked against these
*before* anything is allocated, parsed further or decompressed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["WireLimits"]


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds for one received message.

    ``max_meta_bytes`` and ``max_decoded_bytes`` are additions to the fields the brief listed:
    the first bounds the protobuf parse (a huge PayloadMeta of tiny Values costs far more memory
    parsed than on the wire), the second bounds what a body may expand to (blosc2 zero chunks,
    int8->fp64 dequantisation), so a small payload cannot make the receiver allocate gigabytes.
    """

    max_payload_bytes: int = 1 << 30  # data part of one message (meta + buffers)
    max_fragments: int = 4096  # fragments of one message
    max_tensor_elements: int = 2**31  # elements of one tensor
    max_rank: int = 8  # dimensions of one tensor
    max_values: int = 100_000  # Value nodes in one body (containers, leaves, tensors)
    max_depth: int = 32  # container nesting; the root body is depth 0
    max_string_bytes: int = 1 << 20  # one str (UTF-8), bytes value or dict key
    max_meta_bytes: int = 64 << 20  # the serialized PayloadMeta
    max_decoded_bytes: int = 4 << 30  # sum of the decoded tensors' nbytes in one body

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"WireLimits.{f.name} must be a non-negative int, got {v!r}")
        if self.max_fragments < 1:
            raise ValueError("WireLimits.max_fragments must be >= 1")

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> WireLimits:
        """Build from a mapping (e.g. a Hydra config node); unknown keys are an error."""
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown WireLimits keys: {unknown}")
        return cls(**{k: int(v) for k, v in d.items()})
