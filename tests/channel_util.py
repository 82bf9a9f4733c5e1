"""Helpers for the channel tests: a trivial echo SessionHandler and a raw-frame gRPC stream."""

from __future__ import annotations

import queue
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import grpc
import torch

from lightning_split._proto import split_pb2 as pb
from lightning_split._proto import split_pb2_grpc as pb_grpc
from lightning_split.channel import ChannelConfig, HandlerError, Session, TLSFiles, client_tls
from lightning_split.channel.handshake import build_hello
from lightning_split.wire import CompressionConfig, Message, Reassembler, WireError, encode_body, message_to_frames


class EchoHandler:
    """Replies with the request body. Control bodies: {"fail": "handler"|"boom"}, {"sleep": s},
    {"count": True} (requests seen by this session)."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.hellos: list[dict[str, Any]] = []
        self.seen: list[tuple[str, int, int]] = []  # (session, sequence, step)
        self.lock = threading.Lock()

    def open_session(self, session: Session, hello: dict[str, Any]) -> dict[str, Any]:
        if hello.get("refuse"):
            raise HandlerError(grpc.StatusCode.PERMISSION_DENIED, "this handler refuses you")
        with self.lock:
            self.opened.append(session.id)
            self.hellos.append(hello)
        session.state["count"] = 0
        return {"echo": True, "greeting": f"hello {session.node_id}"}

    def handle(self, session: Session, request: Message) -> Any:
        session.state["count"] += 1
        with self.lock:
            self.seen.append((session.id, request.sequence, request.step))
        body = request.body
        if isinstance(body, dict):
            if body.get("fail") == "handler":
                raise HandlerError(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
            if body.get("fail") == "boom":
                raise ValueError("boom")
            if "sleep" in body:
                time.sleep(body["sleep"])
            if body.get("count"):
                return {"count": session.state["count"], "node": session.node_id}
        return body

    def close_session(self, session: Session) -> None:
        with self.lock:
            self.closed.append(session.id)


def wait_for(pred: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def secure_channel(port: int, tls: TLSFiles | None = None, ca: Path | None = None,
                   no_client_cert: bool = False) -> grpc.Channel:
    assert tls is not None or ca is not None
    root = Path(ca or tls.ca).read_bytes()  # type: ignore[union-attr]
    if no_client_cert:
        creds = grpc.ssl_channel_credentials(root_certificates=root)
    else:
        assert tls is not None
        creds = grpc.ssl_channel_credentials(root, tls.key.read_bytes(), tls.cert.read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=ChannelConfig().client_options())


class RawStream:
    """A hand-driven Exchange stream: push pb.Frames, read reassembled replies, see the final status."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self._out: queue.SimpleQueue[pb.Frame | None] = queue.SimpleQueue()
        self._call = pb_grpc.SplitStub(channel).Exchange(self._gen(), timeout=20)
        self._replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._reasm = Reassembler(checksum=False)  # replies carry CRCs only if we asked
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _gen(self) -> Any:
        while (frame := self._out.get()) is not None:
            yield frame

    def _read(self) -> None:
        try:
            for frame in self._call:
                msg = self._reasm.add(frame)
                if msg is not None:
                    self._replies.put(msg)
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details() or ""
        self._replies.put(None)

    def send(self, *frames: pb.Frame) -> None:
        for f in frames:
            self._out.put(f)

    def send_message(self, msg: Message, compression: CompressionConfig | None = None,
                     chunk_size: int = 1 << 20) -> None:
        self.send(*message_to_frames(msg, compression, chunk_size=chunk_size))

    def send_any(self, msg: Message) -> None:
        """``msg`` with its typed body, or, where no typed message can say it (a hostile hello), its
        body as an untyped Value tree, as a hostile client could send it."""
        try:
            self.send_message(msg)
        except WireError:
            meta, buffers = encode_body(msg.body)
            data = meta + b"".join(bytes(b) for b in buffers)
            header = pb.Header(protocol_version=msg.protocol_version, type=msg.type, node_id=msg.node_id,
                               session_id=msg.session_id, sequence=msg.sequence)
            self.send(pb.Frame(header=header, fragment_index=0, fragment_count=1, payload_bytes=len(data),
                               meta_bytes=len(meta), crc32=zlib.crc32(data), data=data))

    def reply(self, timeout: float = 10.0) -> Message | None:
        return self._replies.get(timeout=timeout)

    def handshake(self, node_id: str = "alice", config: ChannelConfig | None = None,
                  session_id: str = "") -> dict[str, Any]:
        """Open a session, or resume ``session_id``; the welcome."""
        config = config or ChannelConfig()
        if config.connections is None:  # one hand-driven call: never ask for a bond by the host's cores
            config = config.replace(connections=1)
        hello = build_hello(config, node_id) | ({"session_id": session_id} if session_id else {})
        self.send_message(Message(type=pb.HANDSHAKE, body=hello, node_id=node_id, sequence=1))
        welcome = self.reply()
        assert welcome is not None, (self.code, self.details)
        return welcome.body

    def finish(self, timeout: float = 10.0) -> tuple[grpc.StatusCode | None, str]:
        """Half-close and wait for the status."""
        self._out.put(None)
        self._reader.join(timeout)
        return self.code, self.details

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()
        self.channel.close()


def open_raw(port: int, pki: Path, node_id: str = "alice") -> RawStream:
    return RawStream(secure_channel(port, client_tls(pki, node_id)))


def sample_body(scale: int = 1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(64 * scale, 1024, generator=g),
        "ids": torch.arange(1000 * scale, dtype=torch.int64),
        "mask": torch.rand(300, generator=g) > 0.5,
        "nested": [torch.randn(8, 16, generator=g).to(torch.bfloat16),
                   (1, 2.5, "text", None, b"\x00\xffraw", True)],
        "empty": torch.empty(0, 3),
    }
