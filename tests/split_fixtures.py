"""Fixtures for split tests: a SplitService behind a real mTLS ChannelServer on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def split_server(pki: Path, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``split_server(source, spec, **service_kw) -> (address, tls_for)``; ``tls_for(node_id)`` gives client TLS."""
    from lightning_split.channel import ChannelServer, client_tls, server_tls
    from lightning_split.server.service import SplitService

    servers: list[Any] = []

    def _start(source: Any, spec: Any, config: Any = None, **service_kw: Any) -> tuple[str, Callable]:
        service_kw.setdefault("state_dir", tmp_path / "server-state")
        service = SplitService(source, spec, **service_kw)
        kw = {"config": config} if config is not None else {}
        server = ChannelServer(service, "127.0.0.1:0", tls=server_tls(pki), **kw)
        port = server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", lambda node_id: client_tls(pki, node_id)

    _start.servers = servers  # tests may look at the server's sessions
    yield _start
    for server in servers:
        server.stop(grace=0)
