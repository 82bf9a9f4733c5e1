"""Shared fixtures: a PKI made by our own CLI, and factories for channel servers and clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lightning_split import cli


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate and clients alice, bob, client and mallory, written by ``lightning-split certs``."""
    out = tmp_path_factory.mktemp("pki")
    rc = cli.main(["certs", "--out", str(out), "--client", "alice", "--client", "bob", "--client", "client",
                   "--client", "mallory"])
    assert rc == 0
    return out


@pytest.fixture
def start_server(pki: Path) -> Iterator[Callable[..., Any]]:
    """``start_server(handler, **kw)``: a started mTLS ChannelServer on 127.0.0.1:0 (stopped at teardown).

    ``kw`` goes to ChannelServer (``config=``, ``max_workers=``, ``tls=``...); the port is ``.port``.
    """
    from lightning_split.channel import ChannelServer, server_tls

    servers: list[Any] = []

    def _start(handler: Any, **kw: Any) -> Any:
        kw.setdefault("tls", None if kw.get("insecure") else server_tls(pki))
        server = ChannelServer(handler, kw.pop("address", "127.0.0.1:0"), **kw)
        server.start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop(grace=0)


@pytest.fixture
def connect(pki: Path) -> Iterator[Callable[..., Any]]:
    """``connect(port, node_id="alice", **kw)``: a ChannelClient over mTLS, handshaken (closed at teardown).

    ``kw`` goes to ChannelClient (``config=``, ``hello_extra=``, ``tls=``...); ``handshake=False``
    returns it unconnected.
    """
    from lightning_split.channel import ChannelClient, client_tls

    clients: list[Any] = []

    def _connect(port: int, node_id: str = "alice", handshake: bool = True, **kw: Any) -> Any:
        kw.setdefault("tls", None if kw.get("insecure") else client_tls(pki, node_id))
        client = ChannelClient(f"127.0.0.1:{port}", node_id, **kw)
        clients.append(client)
        if handshake:
            client.connect()
        return client

    yield _connect
    for client in clients:
        client.close()

pytest_plugins = ["tests.split_fixtures"]


@pytest.fixture
def exact_matmuls() -> Iterator[None]:
    """CUDA matmuls in true fp32 for the test: TF32 would make local and split differ by more than
    float tolerance."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
