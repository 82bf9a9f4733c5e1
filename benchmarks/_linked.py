"""A benchmark's split server across an emulated link (link.py): its process serves from the
link's server namespace, and clients dial it through the link."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from _common import SplitServer
from link import Link, enter_netns

from lightning_split.split.build import ModelSource
from lightning_split.split.spec import SplitSpec


def _serve_in_netns(netns: str, host: str, *args: Any) -> None:
    """_common._serve, from the link's server namespace and bound to the server's address there."""
    import _common

    enter_netns(netns)
    channel_server = _common.ChannelServer
    _common.ChannelServer = lambda service, _address, **kw: channel_server(service, f"{host}:0", **kw)
    _common._serve(*args)


class LinkedServer(SplitServer):
    """A SplitServer whose process serves across ``link`` (clients dial ``address``, TLS name ``server_name``)."""

    def __init__(self, link: Link, pki: Path, source: ModelSource, spec: SplitSpec, device: str) -> None:
        import _common

        self.link, serve = link, _common._serve
        _common._serve = functools.partial(_serve_in_netns, link.server_ns_path, link.server_host)
        try:  # SplitServer spawns _common._serve: this one, for this server only
            super().__init__(pki, source, spec, device)
        finally:
            _common._serve = serve

    @property
    def address(self) -> str:
        return self.link.client_addr(int(super().address.rsplit(":", 1)[1]))

    @property
    def server_name(self) -> str:
        return self.link.server_name

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        return super().connect(*args, server_name_override=self.link.server_name, **kwargs)
