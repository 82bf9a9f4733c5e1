"""The server worker's gap between two pipelined requests: from one handler's end to the next's start.

    python benchmarks/tools/worker_gap.py [MiB] [connections]      # defaults: 4 MiB, 4 connections

Two requests of MiB float32 each are submitted back to back over a bonded mutual-TLS channel on
loopback; the handler sleeps 20 ms (the GPU's share of a micro-batch: the GIL released, the worker
busy). What the worker does between the two handlers (send the first reply, receive and reassemble
the second request) is the gap: the server's pipeline stalls for it on every micro-batch.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning_split.channel as channel  # noqa: E402
from lightning_split.wire import MessageType  # noqa: E402

marks: list[tuple[float, float]] = []


class SleepingHandler:
    def open_session(self, session, hello):  # noqa: ANN001, ANN201
        return {}

    def close_session(self, session):  # noqa: ANN001, ANN201
        pass

    def handle(self, session, request):  # noqa: ANN001, ANN201
        t0 = time.perf_counter()
        time.sleep(request.body["sleep"])
        marks.append((t0, time.perf_counter()))
        return {"ok": True}


def main() -> None:
    mib = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    connections = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    pki = Path(tempfile.mkdtemp())
    channel.make_certs(pki, client_ids=["alice"])
    config = channel.ChannelConfig(connections=connections)
    server = channel.ChannelServer(SleepingHandler(), "127.0.0.1:0", tls=channel.server_tls(pki), config=config)
    client = channel.ChannelClient(f"127.0.0.1:{server.start()}", "alice", tls=channel.client_tls(pki, "alice"),
                                   config=config)
    client.connect()
    x = torch.randn(int(mib * (1 << 18)))
    gaps = []
    for i in range(25):
        marks.clear()
        first = client.submit(MessageType.INFER, {"sleep": 0.02, "x": x})
        second = client.submit(MessageType.INFER, {"sleep": 0.02, "x": x})
        first.result(30), second.result(30)
        if i >= 5:
            gaps.append((marks[1][0] - marks[0][1]) * 1e3)
    print(f"{mib:g} MiB, {connections} connections: handler end -> next handler start, median "
          f"{statistics.median(gaps):.2f} ms (min {min(gaps):.2f}, 20 pairs)")
    client.close()
    server.stop(0)


if __name__ == "__main__":
    main()
