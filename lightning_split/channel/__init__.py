"""The secured channel (claims 5-7): mutual-TLS gRPC, handshake, sessions, client and server.

Layer 3 of lightning_split: it imports ``wire`` (the frame format) and nothing above it.
Names load lazily so that ``lightning-split certs`` does not import torch and gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .certs import TLSFiles, client_tls, make_certs, server_tls
    from .client import ChannelClient, RemoteError
    from .config import ChannelConfig
    from .server import ChannelServer
    from .session import HandlerError, Session, SessionHandler
    from .stats import TransportStats

_WHERE = {
    "TLSFiles": "certs", "client_tls": "certs", "make_certs": "certs", "server_tls": "certs",
    "ChannelClient": "client", "RemoteError": "client",
    "ChannelConfig": "config",
    "ChannelServer": "server",
    "HandlerError": "session", "Session": "session", "SessionHandler": "session",
    "TransportStats": "stats",
}

__all__ = [
    "ChannelClient", "ChannelConfig", "ChannelServer", "HandlerError", "RemoteError", "Session",
    "SessionHandler", "TLSFiles", "TransportStats", "client_tls", "make_certs", "server_tls",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
