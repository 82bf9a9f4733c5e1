"""What one request costs the server's host in CPU, beside its model: the server (its own process,
mutual TLS) holds one block of a nano Llama; the client here sends tiny requests (``CACHE info``) and
then generates. Prints, per kind, the round trip and the server process's CPU ms per request (every
thread's: Python's and gRPC's own), then the stream thread's CPU per request in each part of the
request's path (``time.thread_time`` around the server's own functions, patched in its process):
the whole ``on_frame``, receiving (``Reassembler.add``), handling, the segment's step (the model),
encoding the reply; "outside the model" is the whole less the step.

    python benchmarks/tools/server_cpu.py [requests] [tokens]
"""
import collections
import importlib
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_load import LLAMA, source_for, spec_for  # noqa: E402

PARTS = {  # what is timed: (module, the class holding it or None for the module's own, function), by name
    "on_frame (all)": ("lightning_split.channel.server_stream", "ServerStream", "on_frame"),
    "receive (Reassembler.add)": ("lightning_split.wire.chunking", "Reassembler", "add"),
    "handle": ("lightning_split.server.service", "SplitService", "handle"),
    "model step (StaticDecoder._eager_step)": ("lightning_split.server.fast_decode", "StaticDecoder", "_eager_step"),
    "encode the reply (encode_frames)": ("lightning_split.channel.server_stream", None, "encode_frames"),
}


def _meter(parts: dict) -> dict:  # noqa: ANN001
    """Patch each part to add its calls' thread CPU seconds to [calls, seconds]."""
    spent: dict = collections.defaultdict(lambda: [0, 0.0])
    for name, (module, cls_name, function) in parts.items():
        owner = importlib.import_module(module)
        if cls_name is not None:
            owner = getattr(owner, cls_name)
        original = getattr(owner, function)

        def timed(*a, _original=original, _name=name, **k):  # noqa: ANN002, ANN003, ANN202
            c0 = time.thread_time()
            try:
                return _original(*a, **k)
            finally:
                spent[_name][0] += 1
                spent[_name][1] += time.thread_time() - c0

        setattr(owner, function, timed)
    return spent


def _serve(pki: str, ready, control, answers) -> None:  # noqa: ANN001
    from lightning_split.channel import ChannelServer, server_tls
    from lightning_split.server.service import SplitService

    spent = _meter(PARTS)
    torch.set_num_threads(1)
    args = type("A", (), {"model": "nano", "dtype": "fp32"})
    service = SplitService(source_for(args), spec_for(args), device="cpu", fast_decode=True)
    server = ChannelServer(service, "127.0.0.1:0", tls=server_tls(pki))
    ready.put(server.start())
    while control.get() == "read":  # the figures so far, then zeroed
        answers.put({k: tuple(v) for k, v in spent.items()})
        spent.clear()
    server.stop(grace=0)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, clock ticks


def main() -> None:
    from lightning_split.channel import client_tls, make_certs
    from lightning_split.split.connect import open_split
    from lightning_split.wire import MessageType

    n, tokens = (int(a) for a in (sys.argv[1:] + ["2000", "400"])[:2])
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as pki:
        make_certs(pki, client_ids=["c0"])
        ready, control, answers = ctx.Queue(), ctx.Queue(), ctx.Queue()
        proc = ctx.Process(target=_serve, args=(pki, ready, control, answers), daemon=True)
        proc.start()
        port = ready.get(timeout=300)
        args = type("A", (), {"model": "nano", "dtype": "fp32"})
        split = open_split(f"127.0.0.1:{port}", "c0", client_tls(pki, "c0"), source=source_for(args),
                           spec=spec_for(args), device="cpu")
        for _ in range(50):
            split.client.request(MessageType.CACHE, {"op": "info"})
        c0, t0 = cpu_s(proc.pid), time.perf_counter()
        for _ in range(n):
            split.client.request(MessageType.CACHE, {"op": "info"})
        wall, cpu = time.perf_counter() - t0, cpu_s(proc.pid) - c0
        print(f"CACHE info: {1e3 * wall / n:.3f} ms round trip, server CPU {1e3 * cpu / n:.3f} ms/request")
        model = split.model.eval()
        _read(control, answers)
        ids = torch.randint(3, LLAMA["nano"]["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
        kw = {"do_sample": False, "pad_token_id": 0}
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
            c0, t0 = cpu_s(proc.pid), time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        wall, cpu = time.perf_counter() - t0, cpu_s(proc.pid) - c0
        print(f"decode: {1e3 * wall / tokens:.3f} ms/token, server CPU {1e3 * cpu / tokens:.3f} ms/token")
        spent = _read(control, answers)
        print("the stream thread's CPU per decode request, us:")
        for name, (calls, seconds) in spent.items():
            print(f"  {name:42s} {1e6 * seconds / max(calls, 1):8.1f}  ({calls} calls)")
        whole, step = spent.get("on_frame (all)", (1, 0.0)), spent.get(next(k for k in PARTS if "model" in k), (1, 0.0))
        print(f"  {'outside the model':42s} {1e6 * (whole[1] - step[1]) / max(whole[0], 1):8.1f}")
        split.close()
        control.put(None)
        proc.join(30)


def _read(control, answers) -> dict:  # noqa: ANN001
    control.put("read")
    return answers.get(timeout=60)


if __name__ == "__main__":
    main()
