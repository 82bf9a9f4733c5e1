"""The application-level handshake (claim 7), on top of the mutual-TLS one.

TLS has already authenticated both ends and agreed the keys; this step agrees what the two ends
will *say*: the protocol version, the chunk size, the compression per direction and the limits.

hello (client -> server, the body of a HANDSHAKE, a ``Hello`` in split.proto)::

    {"protocol_version": 2, "node_id": "alice",
     "capabilities": {"lossless": [...], "lossy": [...], "chunk_size": int, "max_payload_bytes": int,
                      "checksum": bool, "connections": int},
     "compression": {"client_to_server": {...}, "server_to_client": {...}},
     "session_id": "..." (optional: resume), the split protocol's "tail" and "fingerprint",
     **a handler's own keys (Hello.extensions)}

welcome (server -> client, the body of the RESULT, a ``Welcome``)::

    {"session_id", "protocol_version", "chunk_size", "checksum", "compression": {...}, "limits": {...},
     "resumed": bool, "lossy_modes": [...], "typed_bodies": bool, **handler extras}
    + {"connections": K, "bond_token": str} when the stream is bonded over K > 1 connections (bond.py)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grpc

from lightning_split.wire import PROTOCOL_VERSION, CompressionConfig

from .config import LOSSLESS_MODES, LOSSY_MODES, ChannelConfig
from .session import HandlerError

SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})
_HELLO_KEYS = ("protocol_version", "node_id", "capabilities", "compression", "session_id", "join", "index")


def build_hello(config: ChannelConfig, node_id: str, extra: dict[str, Any] | None = None,
                session_id: str = "", checksum: bool = True) -> dict[str, Any]:
    hello: dict[str, Any] = dict(extra or {})
    clash = set(hello) & set(_HELLO_KEYS)
    if clash:
        raise ValueError(f"hello_extra may not set the channel's own keys {sorted(clash)}")
    hello.update(
        protocol_version=PROTOCOL_VERSION,
        node_id=node_id,
        capabilities={
            "lossless": [m for m in LOSSLESS_MODES if m in config.allow_lossless],
            "lossy": [m for m in LOSSY_MODES if m in config.allow_lossy],
            "chunk_size": config.chunk_size,
            "max_payload_bytes": int(limits_dict(config)["max_payload_bytes"]),
            "checksum": checksum,
            "connections": config.wanted_connections(),
        },
        compression={
            "client_to_server": config.client_to_server.to_dict(),
            "server_to_client": config.server_to_client.to_dict(),
        },
    )
    if session_id:
        hello["session_id"] = session_id
    return hello


def limits_dict(config: ChannelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config.limits)


def _bad(msg: str) -> HandlerError:
    return HandlerError(grpc.StatusCode.INVALID_ARGUMENT, "bad HANDSHAKE: " + msg)


def _names(value: Any, what: str) -> set[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"capabilities.{what} must be a list of names")
    return set(value)


def _grant(requested: Any, fallback: CompressionConfig, allow_lossless: set[str],
           allow_lossy: set[str]) -> CompressionConfig:
    """The requested compression, each stage downgraded to "none" where it is not allowed."""
    if requested is None:
        cfg = fallback
    elif isinstance(requested, dict):
        try:
            cfg = CompressionConfig.from_dict(requested)
        except (TypeError, ValueError, KeyError) as e:
            raise _bad(f"compression {requested!r}: {e}") from None
    else:
        raise _bad("compression settings must be dicts")
    return dataclasses.replace(
        cfg,
        lossless=cfg.lossless if cfg.lossless in allow_lossless else "none",
        lossy=cfg.lossy if cfg.lossy in allow_lossy else "none",
        # The peer picks how hard *we* work: keep it within reason.
        level=min(max(int(cfg.level), 0), 9),
        nthreads=min(max(int(cfg.nthreads), 1), os.cpu_count() or 1),
    )


def negotiate(hello: Any, identity: str, config: ChannelConfig, checksum: bool) -> dict[str, Any]:
    """Check a hello against the authenticated identity and agree the session's parameters.

    ``checksum`` is the server's own wish: CRCs are on if either end wants them. Returns
    ``{"connections", "chunk_size", "checksum", "client_to_server", "server_to_client"}`` (the
    latter two CompressionConfig; ``connections``: how many the stream is bonded over, bond.py).
    Raises HandlerError: FAILED_PRECONDITION for a protocol version we do not
    speak, PERMISSION_DENIED for a hello naming another node, INVALID_ARGUMENT for malformed ones.
    """
    if not isinstance(hello, dict):
        raise _bad("the body must be a dict")
    try:
        return _negotiate(hello, identity, config, checksum)
    # A field of the wrong kind: a tensor where a number goes is a RuntimeError ("Boolean value of
    # Tensor ... is ambiguous"), infinity where an int goes an OverflowError.
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError, OverflowError) as e:
        raise _bad(f"{type(e).__name__}: {e}") from None


def _negotiate(hello: dict[str, Any], identity: str, config: ChannelConfig, checksum: bool) -> dict[str, Any]:
    version = hello.get("protocol_version")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise HandlerError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"protocol version {version!r} is not supported (server speaks {sorted(SUPPORTED_VERSIONS)})",
        )
    if hello.get("node_id", identity) != identity:
        raise HandlerError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"hello names node {hello.get('node_id')!r} but the certificate says {identity!r}",
        )
    caps = hello.get("capabilities", {})
    if not isinstance(caps, dict):
        raise _bad("capabilities must be a dict")
    chunk = caps.get("chunk_size", config.chunk_size)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 4096:
        raise _bad(f"chunk_size {chunk!r} must be an int >= 4096")
    peer_crc = caps.get("checksum", True)
    if not isinstance(peer_crc, bool):
        raise _bad(f"checksum {peer_crc!r} must be a bool")
    comp = hello.get("compression") or {}
    if not isinstance(comp, dict):
        raise _bad("compression must be a dict")
    allow_lossless, allow_lossy = set(config.allow_lossless), set(config.allow_lossy)
    # Replies are decoded by the client: never send it a stage it did not list.
    peer_lossless = _names(caps.get("lossless", ["none"]), "lossless") | {"none"}
    peer_lossy = _names(caps.get("lossy", ["none"]), "lossy") | {"none"}
    connections = caps.get("connections", 1)
    if not isinstance(connections, int) or isinstance(connections, bool) or connections < 1:
        raise _bad(f"connections {connections!r} must be an int >= 1")
    return {
        "connections": min(connections, config.max_connections),
        "chunk_size": min(chunk, config.chunk_size),
        "checksum": peer_crc or checksum,
        "client_to_server": _grant(comp.get("client_to_server"), config.client_to_server,
                                   allow_lossless, allow_lossy),
        "server_to_client": _grant(comp.get("server_to_client"), config.server_to_client,
                                   allow_lossless & peer_lossless, allow_lossy & peer_lossy),
        # What a request may ask its reply to use instead (Header.reply_encoding).
        "reply_lossy": frozenset(allow_lossy & peer_lossy),
    }


def welcome(session_id: str, agreed: dict[str, Any], config: ChannelConfig,
            extras: dict[str, Any] | None, resumed: bool, typed_bodies: bool = False) -> dict[str, Any]:
    body = dict(extras or {})
    # The channel's own keys win over a handler extra of the same name.
    body.update(
        session_id=session_id,
        protocol_version=PROTOCOL_VERSION,
        chunk_size=agreed["chunk_size"],
        checksum=agreed["checksum"],
        compression={
            "client_to_server": agreed["client_to_server"].to_dict(),
            "server_to_client": agreed["server_to_client"].to_dict(),
        },
        limits=limits_dict(config),
        resumed=resumed,
        # Lossy modes a request may use and ask its reply to use (adaptive compression).
        lossy_modes=sorted(agreed["reply_lossy"]),
        typed_bodies=typed_bodies,
    )
    return body
