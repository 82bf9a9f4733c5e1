"""Shared helpers of ``benchmarks/train.py`` and ``benchmarks/generate.py``.

Model configs (GPT-2 tiny/small/medium, random init, nothing downloaded), command-line flags,
certificates, the split server in its own (spawned) process, CUDA-aware timing, tables and JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

# LS_SWITCH_INTERVAL=seconds: Python's GIL switch interval in the benchmark processes (client and
# the spawned server, which imports this module too); default 0.005. An experiment knob.
if os.environ.get("LS_SWITCH_INTERVAL"):
    sys.setswitchinterval(float(os.environ["LS_SWITCH_INTERVAL"]))
# LS_SYNC_DEBUG=warn|error: torch.cuda.set_sync_debug_mode in every benchmark process (client and
# server): each operation that makes the host wait for the GPU (``.item()``, a synchronize, a
# non_blocking copy from pageable memory) is reported with its stack. How to find the host-device
# sync that stalls a handler (see benchmarks/README.md, "same host").
# LS_SYNC_DEBUG_FILE=path: append each distinct stack that synchronised there (once, with its thread).
if os.environ.get("LS_SYNC_DEBUG") and torch.cuda.is_available():
    torch.cuda.set_sync_debug_mode(os.environ["LS_SYNC_DEBUG"])
    if os.environ.get("LS_SYNC_DEBUG_FILE"):
        import traceback
        import warnings

        _seen_sync_stacks: set[str] = set()
        _show_warning = warnings.showwarning

        def _record_sync(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if "synchroniz" not in str(message):
                return _show_warning(message, category, filename, lineno, file, line)
            stack = "".join(traceback.format_stack()[:-1])
            if stack not in _seen_sync_stacks:
                _seen_sync_stacks.add(stack)
                with open(os.environ["LS_SYNC_DEBUG_FILE"], "a") as out:
                    out.write(f"=== pid {os.getpid()} thread {threading.current_thread().name}: {message}\n{stack}\n")

        warnings.showwarning = _record_sync
        warnings.simplefilter("always", UserWarning)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_split.channel import ChannelServer, client_tls, make_certs, server_tls  # noqa: E402
from lightning_split.server.service import SplitService  # noqa: E402
from lightning_split.split.build import ModelSource  # noqa: E402
from lightning_split.split.connect import SplitModel, open_split  # noqa: E402
from lightning_split.split.spec import SplitSpec  # noqa: E402
from lightning_split.wire import Message, MessageType, Reassembler, message_to_frames  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def quiet() -> None:
    """Keep the benchmark's output readable: no per-model config notices, no Lightning banners."""
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|litlogger).*")


quiet()  # also in the spawned server and gloo processes, which import this module
CLIENT_ID = "bench"
# GPT-2's own sizes; dropout off so that every variant computes the same numbers from the same init.
GPT2_COMMON = dict(vocab_size=50257, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
MODELS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=8192, bos_token_id=8191, eos_token_id=8191),
    "small": dict(n_layer=12, n_embd=768, n_head=12),  # GPT-2 small, 124 M parameters
    "medium": dict(n_layer=24, n_embd=1024, n_head=16),  # GPT-2 medium, 355 M parameters
}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def model_source(name: str, dtype: str = "fp32") -> ModelSource:
    """The benchmark model as a ModelSource (the server builds it; the client checks its fingerprint)."""
    return ModelSource("transformers:GPT2LMHeadModel", {**GPT2_COMMON, **MODELS[name]}, seed=0,
                       dtype=TORCH_DTYPES[dtype])


# -- command line ------------------------------------------------------------------------------------

def base_parser(doc: str | None, models: list[str] | None = None) -> argparse.ArgumentParser:
    """The flags every benchmark takes; ``models``: the names ``--model`` takes (default: GPT-2's)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps (< 90 s on a 2-core CPU)")
    p.add_argument("--model", choices=models or list(MODELS), default=None,
                   help="default: tiny (--quick), else the benchmark's own")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="sequence (prompt) length")
    p.add_argument("--cut", type=int, default=2, help="first block on the server (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps / repeats after warm-up")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=list(TORCH_DTYPES), default=None,
                   help="default: bf16 on CUDA, else fp32")
    p.add_argument("--json", default=None,
                   help="result file (default: benchmarks/results/<bench>_<model>_<device>.json)")
    return p


def finish_args(args: argparse.Namespace, quick: dict[str, Any], full: dict[str, Any]) -> argparse.Namespace:
    """Fill the flags left unset from the --quick or the full defaults; pick device and dtype."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        args.device = "cuda:0"  # Lightning and the timing helpers want an explicit index
    if args.dtype is None:
        args.dtype = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    return args


def json_path(args: argparse.Namespace, bench: str) -> Path:
    if args.json:
        return Path(args.json)
    quick = "_quick" if args.quick else ""
    return RESULTS / f"{bench}_{args.model}_{torch.device(args.device).type}{quick}.json"


# -- timing ------------------------------------------------------------------------------------------

def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: str | torch.device) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``, with CUDA synchronised on both sides of the measurement."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def shared_cpu_threads() -> int:
    """Intra-op threads for each of two processes sharing this host's cores (client and server)."""
    return max(1, (os.cpu_count() or 1) // 2)


@contextlib.contextmanager
def split_threads(device: str | torch.device) -> Iterator[None]:
    """On a CPU, the split's client computes with half the cores (its server: ``SplitServer(...,
    cpu_threads=shared_cpu_threads())``). Two processes whose OpenMP threads each take every core
    spin against each other: on a 2-core host that made a generated token ~3x slower (--quick:
    6.8 vs 2.5 ms). Training, whose two sides mostly compute in turn, keeps every core on both."""
    if torch.device(device).type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(shared_cpu_threads())
    try:
        yield
    finally:
        torch.set_num_threads(old)


def split_train_step(split: Any, opt: torch.optim.Optimizer, i: int, ids: torch.Tensor,
                     amp: Callable[[], Any] = contextlib.nullcontext, lr: float | None = None) -> torch.Tensor:
    """One training step of a split causal LM, as SplitStrategy runs it without clipping: the
    server's optimizer step rides on the last backward (asked for on its own if none carried it).
    ``lr``, when given, is this step's learning rate on both sides (the strategy sends the client's)."""
    from lightning_split.wire import MessageType

    split.runner.step = i
    with amp():
        loss = split.model(input_ids=ids, labels=ids).loss
    body = {"step": i} if lr is None else {"step": i, "lr": lr}
    split.runner.pending_step = body
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if split.runner.pending_step is not None:  # not carried: ask explicitly
        split.runner.pending_step = None
        split.client.request(MessageType.OPTIMIZER_STEP, {k: v for k, v in body.items() if k != "step"}, step=i)
    return loss.detach()


def greedy(model: torch.nn.Module, ids: torch.Tensor, n: int, **extra: Any) -> torch.Tensor:
    """Greedy ``generate`` of exactly ``n`` tokens (``min_new_tokens``: a random model may emit EOS)."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, **extra)


def repeat_greedy(model: torch.nn.Module, ids: torch.Tensor, n: int, args: Any, split: bool,
                  after_timed: Callable[[], None] | None = None, **extra: Any) -> tuple[list[float], torch.Tensor]:
    """``greedy`` ``args.warmup + args.steps`` times: the seconds of the timed runs, and the last
    output. A split's client computes with its half of the cores (split_threads); ``after_timed``
    runs after each timed generation (to read its metrics)."""
    times: list[float] = []
    out = ids
    for r in range(args.warmup + args.steps):
        with split_threads(args.device) if split else contextlib.nullcontext():
            dt, out = timed(lambda: greedy(model, ids, n, **extra), args.device)
        if r >= args.warmup:
            times.append(dt)
            if after_timed is not None:
                after_timed()
    return times, out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def autocast(device: str | torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for --dtype bf16 (fp32 master weights), nothing for fp32."""
    if dtype == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def random_batches(n: int, batch: int, seq: int, vocab: int, device: str,
                   seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(n)]


# -- certificates and the split server in its own process --------------------------------------------

@contextlib.contextmanager
def pki_dir() -> Iterator[Path]:
    """A fresh CA, server certificate and one client certificate (CN ``bench``) in a temp dir."""
    with tempfile.TemporaryDirectory(prefix="ls-bench-pki-") as d:
        make_certs(d, client_ids=[CLIENT_ID])
        yield Path(d)


# busy = [seconds, requests, marks made, (start, end, busy seconds) x MARK_SLOTS]
MARKS_AT, MARK_SLOTS, MARK_WIDTH = 3, 64, 3


class _TimedService(SplitService):
    """SplitService that adds the time its handler spends to ``busy``: on CUDA the GPU time between
    two events around each request (read once they have completed, never by synchronising, which
    would stop the server from running ahead of the GPU), on CPU the wall time."""

    def __init__(self, *args: Any, busy: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._busy = busy
        self._device = torch.device(kwargs.get("device", "cpu"))
        self._cuda = self._device.type == "cuda"
        self._events: list[tuple[int, Any, Any]] = []
        self._lock = threading.Lock()
        if self._cuda:
            threading.Thread(target=self._drain_forever, daemon=True).start()

    def handle(self, session: Any, request: Any) -> Any:
        index = self._mark(0)
        try:
            return self._timed_handle(session, request, index)
        finally:
            self._mark(1)

    def _mark(self, which: int) -> int:
        """A handler's start (0) or end (1) on the host clock, for a client's step timeline (the
        same CLOCK_MONOTONIC as the client's perf_counter: one host); returns the request's index."""
        marks = self._busy
        with marks.get_lock():
            n = int(marks[2]) - which  # an end belongs to the last start
            marks[MARKS_AT + MARK_WIDTH * (n % MARK_SLOTS) + which] = time.perf_counter()
            if which == 0:
                marks[2] = n + 1
        return n

    def _timed_handle(self, session: Any, request: Any, index: int) -> Any:
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(self._device)  # the server's GPU, not this thread's current one
            start.record(stream)
            try:
                return super().handle(session, request)
            finally:
                end.record(stream)
                with self._lock:
                    self._events.append((index, start, end))
        t0 = time.perf_counter()
        try:
            return super().handle(session, request)
        finally:
            self._add(time.perf_counter() - t0, index)

    def _add(self, seconds: float, index: int) -> None:
        with self._busy.get_lock():
            self._busy[0] += seconds
            self._busy[1] += 1
            self._busy[MARKS_AT + MARK_WIDTH * (index % MARK_SLOTS) + 2] = seconds

    def _drain_forever(self) -> None:
        while True:
            time.sleep(0.02)
            with self._lock:
                flags = [end.query() for _, _, end in self._events]
                done = [item for item, ok in zip(self._events, flags, strict=True) if ok]
                self._events = [item for item, ok in zip(self._events, flags, strict=True) if not ok]
            for index, start, end in done:
                self._add(start.elapsed_time(end) / 1e3, index)


def _profile_stream_workers(path: str) -> None:
    """cProfile each stream's worker thread (receive, decode, handler, encode) into ``path``.N."""
    import cProfile

    from lightning_split.channel.server_stream import ServerStream

    serve, count = ServerStream.serve, [0]

    def profiled(self: Any, *args: Any) -> None:
        count[0] += 1
        prof = cProfile.Profile()
        try:
            prof.runcall(serve, self, *args)
        finally:
            prof.dump_stats(f"{path}.{count[0]}")

    ServerStream.serve = profiled


def _serve(pki: str, source: dict, spec: dict, device: str, ready: Any, stop: Any, busy: Any,
           threads: int | None) -> None:
    # LS_SERVER_PROFILE=path: cProfile the server's stream workers into path.1, path.2, ...
    if os.environ.get("LS_SERVER_PROFILE"):
        _profile_stream_workers(os.environ["LS_SERVER_PROFILE"])
    if threads:
        torch.set_num_threads(threads)
    try:
        service = _TimedService(ModelSource.from_dict(source), SplitSpec.from_dict(spec), device=device,
                                busy=busy)
        server = ChannelServer(service, "127.0.0.1:0", tls=server_tls(pki))
        ready.put(server.start())
    except BaseException as e:  # tell the parent instead of leaving it waiting
        ready.put(f"{type(e).__name__}: {e}")
        raise
    stop.wait()
    server.stop(grace=0)


class SplitServer:
    """A SplitService behind a mutual-TLS ChannelServer on loopback, in a spawned process.

    The SplitService is timed: ``busy()`` is the server's handler time (compute, not transport).
    """

    def __init__(self, pki: Path, source: ModelSource, spec: SplitSpec, device: str,
                 cpu_threads: int | None = None) -> None:
        """``cpu_threads``: the server process's intra-op threads (default: torch's, every core)."""
        ctx = mp.get_context("spawn")
        self.pki = pki
        self._ready, self._stop = ctx.Queue(), ctx.Event()
        self._busy = ctx.Array("d", MARKS_AT + MARK_WIDTH * MARK_SLOTS)
        self._proc = ctx.Process(
            target=_serve, name="split-server", daemon=True,
            args=(str(pki), source.to_dict(), spec.to_dict(), device, self._ready, self._stop, self._busy,
                  cpu_threads),
        )
        self._proc.start()
        self._address: str | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` once the server listens (waits for it: servers may start in parallel)."""
        if self._address is None:
            deadline = time.monotonic() + 600
            while True:
                try:
                    port = self._ready.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._proc.is_alive() or time.monotonic() > deadline:
                        raise RuntimeError("the split server process did not start") from None
            if isinstance(port, str):
                self.close()
                raise RuntimeError(f"the split server failed to start: {port}")
            self._address = f"127.0.0.1:{port}"
        return self._address

    def busy(self) -> tuple[float, int]:
        """(seconds spent in the service's handler, requests handled) so far."""
        with self._busy.get_lock():
            return self._busy[0], int(self._busy[1])

    def marks_since(self, t0: float) -> list[tuple[float, float, float]]:
        """(start, end) host times of the handler calls that started after ``t0`` (the last 64),
        with each call's busy seconds (GPU time between its events on CUDA, else wall time)."""
        with self._busy.get_lock():
            n = int(self._busy[2])
            slots = [MARKS_AT + MARK_WIDTH * (i % MARK_SLOTS) for i in range(max(0, n - MARK_SLOTS), n)]
            marks = [(self._busy[j], self._busy[j + 1], self._busy[j + 2]) for j in slots]
        return [m for m in marks if m[0] >= t0]

    def connect(self, source: ModelSource, spec: SplitSpec, device: str, tail: dict[str, Any] | None = None,
                **kwargs: Any) -> SplitModel:
        """``open_split`` as a benchmark client: mutual TLS, own source and split (fingerprint checked)."""
        return open_split(self.address, CLIENT_ID, client_tls(self.pki, CLIENT_ID), source=source, spec=spec,
                          tail=tail, device=device, **kwargs)

    def close(self) -> None:
        self._stop.set()
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(10)

    def __enter__(self) -> SplitServer:
        self.address  # noqa: B018 - wait until it listens
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def channel_rtt_ms(split: SplitModel, n: int = 50) -> float:
    """Median round trip of a tiny request (``CACHE info``) over the connected channel."""
    times = []
    for _ in range(n + 5):
        t0 = time.perf_counter()
        split.client.request(MessageType.CACHE, {"op": "info"})
        times.append(time.perf_counter() - t0)
    return 1e3 * median(times[5:])


# -- what one step sends ------------------------------------------------------------------------------

def record_one_step(split: SplitModel, run: Callable[[], Any]) -> list[tuple[int, Any, Any]]:
    """(type, request body, reply body) of every request ``run()`` makes through the split's client."""
    client, seen = split.client, []
    original = client.submit  # request() goes through submit() too

    def recording(type_: int, body: Any = None, step: int = 0, timeout: float | None = None, **options: Any) -> Any:
        future = original(type_, body, step, timeout, **options)  # options: adaptive compression's
        seen.append((type_, body, future))
        return future

    client.submit = recording  # this instance only, for one step
    try:
        run()
    finally:
        del client.submit
    return [(type_, body, future.result().body) for type_, body, future in seen]


def step_timeline(split: SplitModel, server: SplitServer, run: Callable[[], Any], device: str) -> dict[str, Any]:
    """One step's requests as the client and the server saw them, ms from the step's start: when
    each was submitted, when the server's handler started and returned (host time; on a GPU its
    kernels may still run), when its reply was in; and when the step ended (synchronised)."""
    client, seen = split.client, []
    original = client.submit

    def stamping(type_: int, body: Any = None, step: int = 0, timeout: float | None = None, **options: Any) -> Any:
        entry = {"type": MessageType.Name(type_), "submit": time.perf_counter()}
        future = original(type_, body, step, timeout, **options)
        future.add_done_callback(lambda _f: entry.__setitem__("reply", time.perf_counter()))
        seen.append(entry)
        return future

    sync(device)
    t0 = time.perf_counter()
    client.submit = stamping
    try:
        run()
        sync(device)
        end = time.perf_counter()
    finally:
        del client.submit
    time.sleep(0.2)  # the last (unawaited) replies and the server's marks
    for entry, (start, stop, busy) in zip(seen, server.marks_since(t0), strict=False):
        entry["handler_start"], entry["handler_end"] = start, stop
        entry["handler_busy_ms"] = round(1e3 * busy, 2)
    ms = [{k: (round(1e3 * (v - t0), 2) if isinstance(v, float) and k != "handler_busy_ms" else v)
           for k, v in e.items()} for e in seen]
    return {"requests": ms, "step_end": round(1e3 * (end - t0), 2)}


def _to(body: Any, device: str | torch.device) -> Any:
    if isinstance(body, torch.Tensor):
        return body.to(device)
    if isinstance(body, dict):
        return {k: _to(v, device) for k, v in body.items()}
    if isinstance(body, (list, tuple)):
        return type(body)(_to(v, device) for v in body)
    return body


def codec_seconds(messages: list[tuple[int, Any, Any]], device: str, repeats: int = 3,
                  compression: tuple[Any, Any] = (None, None)) -> float:
    """Encode + frame + reassemble + decode of one step's requests and replies, device copies included.
    ``compression``: the CompressionConfig of the requests and of the replies (None: none)."""
    bodies = [(t, _to(b, device), cfg) for t, req, rep in messages
              for b, cfg in ((req, compression[0]), (rep, compression[1]))]
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for type_, body, cfg in bodies:
            reassembler, msg = Reassembler(), None
            for frame in message_to_frames(Message(type=type_, body=body, node_id="bench", sequence=1), cfg):
                msg = reassembler.add(frame)
            _to(msg.body, device)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


# -- output ------------------------------------------------------------------------------------------

def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    for line in [headers, *cells]:
        cols = enumerate(zip(line, widths, strict=True))
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in cols))


def environment(device: str) -> dict[str, Any]:
    env = {"device": device, "torch": torch.__version__, "cpus": os.cpu_count(),
           "platform": platform.platform(), "python": platform.python_version()}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_json(path: Path, args: Any, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"args": vars(args), "environment": environment(args.device), **payload}
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path
