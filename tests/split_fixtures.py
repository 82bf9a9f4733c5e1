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

    def _segment(remote: Any, server: Any = None) -> Any:
        """The SessionSegment of ``remote``'s session on ``server`` (default: the last one started)."""
        server = servers[-1] if server is None else server
        return server.sessions.snapshot()[remote.client.session_id].state["segment"]

    _start.servers = servers  # tests may look at the server's sessions
    _start.segment = _segment
    yield _start
    for server in servers:
        server.stop(grace=0)


_SERVE_SNIPPET = """
import json, sys, threading
from lightning_split.channel import ChannelServer, server_tls
from lightning_split.server.service import SplitService
from lightning_split.split.build import ModelSource
from lightning_split.split.spec import SplitSpec
args = json.loads(sys.argv[1])
service = SplitService(ModelSource.from_dict(args["source"]), SplitSpec.from_dict(args["spec"]), **args["service"])
server = ChannelServer(service, "127.0.0.1:0", tls=server_tls(args["pki"]))
print(server.start(), flush=True)
sys.stdin.read()  # serve until the test closes our stdin
server.stop(grace=0)
"""


@pytest.fixture
def split_server_process(pki: Path, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Like ``split_server``, but the server runs in its own process, as it would in deployment."""
    import json
    import subprocess
    import sys

    from lightning_split.channel import client_tls

    procs: list[subprocess.Popen] = []

    def _start(source: Any, spec: Any, **service_kw: Any) -> tuple[str, Callable]:
        service_kw.setdefault("state_dir", str(tmp_path / "server-state"))
        args = {"source": source.to_dict(), "spec": spec.to_dict(), "service": service_kw, "pki": str(pki)}
        proc = subprocess.Popen([sys.executable, "-c", _SERVE_SNIPPET, json.dumps(args)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        port = int(proc.stdout.readline())
        return f"127.0.0.1:{port}", lambda node_id: client_tls(pki, node_id)

    yield _start
    for proc in procs:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
