"""The one exception type of the wire layer."""

from __future__ import annotations

import grpc

__all__ = ["WireError"]


class WireError(Exception):
    """A wire-format violation (or an unencodable value on the sending side).

    ``code`` is the :class:`grpc.StatusCode` the channel layer should answer with:
    ``INVALID_ARGUMENT`` for malformed data, ``RESOURCE_EXHAUSTED`` for sizes or counts over
    :class:`~lightning_split.wire.WireLimits`, ``DATA_LOSS`` for a fragment whose CRC-32 does not
    match. ``str(e)`` is the human-readable message (safe to send back to the peer: it names
    fields and numbers, never payload contents).
    """

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.code = code

    @property
    def message(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"WireError({str(self)!r}, {self.code})"


def invalid(message: str) -> WireError:
    return WireError(message, grpc.StatusCode.INVALID_ARGUMENT)


def exhausted(message: str) -> WireError:
    return WireError(message, grpc.StatusCode.RESOURCE_EXHAUSTED)
