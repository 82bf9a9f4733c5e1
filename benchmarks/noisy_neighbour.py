"""Noisy neighbour: one tenant floods the server, another trains beside it as if alone.

    python benchmarks/noisy_neighbour.py --quick     # tiny GPT-2, one combined flood, ~1 minute
    python benchmarks/noisy_neighbour.py             # GPT-2 "mini", each flood kind alone, then all: ~5 minutes
    python benchmarks/noisy_neighbour.py --kinds all --repeats 3   # the combined flood three times

The claim measured: while one certificate ("mallory") floods the server (sessions over its cap,
over and over; streams over its per-node stream cap, idle and silent ones held open; memory:
payloads up to and over its memory budget, partial messages that stall mid-way, sessions hoarding
saved activations and KV cache up to its budget), another tenant's ("alice") training step time
stays within 1.5x of its quiet figure, and alice's results equal, exactly, those of her solo run.

Parts, all real: a SplitService of a GPT-2 (random init from a transformers GPT2Config, two-part
split, trainable tail) behind a mutual-TLS ChannelServer in its own process, configured by the
ChannelConfig printed in the table; certificates from ``make_certs`` for alice and mallory.

* alice (this process): ``open_split`` with a trainable tail (AdamW on both sides), N training
  steps (forward, loss, backward, the server's step riding on the last backward, the client's
  step), each timed, then an evaluation loss on a fixed batch (which reads the server's final
  weights too). Every phase is a fresh session from the same seed and batches.
* mallory (a spawned process, idle but alive during the quiet phases): threads that flood, each
  counting how every attempt was answered (status and the server's reason), so the table shows
  the flood was refused at the caps rather than not happening. Real ChannelClients and
  ``open_split`` clients, and hand-made frames on raw gRPC streams.

Phases: quiet (alice's timing), reference (quiet again, same seed: the exact results to match,
and the run-to-run noise), one flood phase per kind (``--kinds``; each after a quiet phase of its
own with ``--interleave``, the default without --quick: this shared VM drifts), then all kinds at
once, then after (quiet again once mallory has stopped); ``--repeats`` runs the floods again.
Per phase: alice's median and p90 step time and their ratio to the first quiet phase (and to the
quiet phase just before), whether her losses, evaluation loss and client weights equal the
reference's bit for bit, the CPU each process used while alice ran (and everything else on the
host: other users' jobs), and the server's RSS (``/proc/PID/status``, sampled every 0.1 s).
The server process is the benchmark's own, so it also answers probes on its stdin: the budget's
bytes, sessions and streams per node by its own count, and its RSS after ``gc.collect()`` and
``malloc_trim(0)`` (freed heap given back to the OS: what RSS then shows is live). Every phase
starts from a trimmed heap; at each flood's end mallory's charge, sessions and streams are read,
and again 1 s after the phase (everything of mallory's should be gone by then).

Flood kinds (mallory's flood threads mostly wait on the network or on the server's answers):

* sessions: open cap+4 sessions (ChannelClient handshakes), hold them 1 s, close them; repeat.
* streams:  cap+8 Exchange streams multiplexed on one TLS connection: two in three bind to a
  session with one request and then idle, one in three never says anything; each is reopened
  0.2 s after the server ends it (idle / handshake watchdog) or refuses it.
* payloads: 3 threads, each sending one message (CACHE info carrying a junk tensor as its unused beam_idx) per stream,
  cycling through 0.3, 0.6, 0.9 and 1.25 x the node's memory budget, 2 s pause after each.
* stalls:   6 streams, each binds to a session, then sends the first 2 fragments of a message of
  0.2 x the node's budget and nothing more (the stall watchdog should end it); reopened at once.
* hoard:    4 sessions keep FORWARD graphs (saved activations, no BACKWARD ever) and 4 sessions
  grow a KV cache (INFER with a cache) until refused, then retry once a second.
* tails:    (not in "all") cap sessions with a *trainable* tail (each a copy of the server's
  segment plus AdamW state after one step), held open: memory the budget may not count.

On this 2-core VM every process computes with one thread (``torch.set_num_threads(1)``,
OMP_NUM_THREADS=1), so that no process's OpenMP threads spin against another's; mallory's
process competing for the cores is not the server's fault, hence its CPU share in the table.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch: also for the spawned processes
    os.environ.setdefault(_var, "1")

import grpc  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    GPT2_COMMON,
    RESULTS,
    ROOT,
    median,
    print_table,
    random_batches,
    split_train_step,
    write_json,
)
from _common import MODELS as COMMON_MODELS  # noqa: E402

from lightning_split._proto import split_pb2 as pb  # noqa: E402
from lightning_split.channel import ChannelClient, ChannelConfig, RemoteError, client_tls, make_certs  # noqa: E402
from lightning_split.channel.framing import encode_frames, identity, passthrough, split_frame  # noqa: E402
from lightning_split.channel.server import EXCHANGE_METHOD  # noqa: E402
from lightning_split.split.build import ModelSource  # noqa: E402
from lightning_split.split.connect import open_split  # noqa: E402
from lightning_split.split.spec import SplitSpec  # noqa: E402
from lightning_split.wire import Message, MessageType, Reassembler  # noqa: E402
from lightning_split.wire.markers import KV_CACHE  # noqa: E402

MIB = 1 << 20
LR = 1e-4
MODELS: dict[str, dict[str, int]] = {
    "tiny": COMMON_MODELS["tiny"],  # 4 x 128, vocabulary 8192
    "mini": dict(n_layer=6, n_embd=256, n_head=4, vocab_size=8192, bos_token_id=8191, eos_token_id=8191),
    "small": COMMON_MODELS["small"],  # GPT-2 small, 124 M parameters (for a GPU host)
}
ALL_KINDS = ("sessions", "streams", "payloads", "stalls", "hoard")
KINDS = (*ALL_KINDS, "tails", "all")
QUICK = dict(model="tiny", batch=4, seq=64, steps=12, warmup=2, flood_s=12.0, ramp_s=2.0, kinds=["all"])
FULL = dict(model="mini", batch=4, seq=128, steps=30, warmup=3, flood_s=16.0, ramp_s=3.0,
            kinds=[*ALL_KINDS, "tails", "all"])
CLAIM_RATIO = 1.5


# -- the server, in its own process -------------------------------------------------------------------

_SERVE = r"""
import json, logging, sys
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(args["threads"])
import transformers
transformers.logging.set_verbosity_error()
logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
from lightning_split.channel import ChannelConfig, ChannelServer, server_tls
from lightning_split.server.service import SplitService
from lightning_split.split.build import ModelSource
from lightning_split.split.spec import SplitSpec
service = SplitService(ModelSource.from_dict(args["source"]), SplitSpec.from_dict(args["spec"]),
                       device=args["device"])
server = ChannelServer(service, "127.0.0.1:0", tls=server_tls(args["pki"]),
                       config=ChannelConfig.from_dict(args["config"]))
print(server.start(), flush=True)


def probe(trim):
    # The server's own view (budget, sessions, streams per node) and its RSS; trim: first collect
    # garbage and give freed heap back to the OS, so that what RSS still shows is really held.
    import collections, ctypes, gc
    if trim:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))
    sessions = collections.Counter(s.node_id for s in server.sessions.snapshot().values())
    return {"budget_bytes": server.budget.usage(), "budget_used": server.budget.used,
            "sessions": dict(sessions), "streams": server.streams.counts(), "rss_kb": rss}


for line in sys.stdin:  # serve until the benchmark closes our stdin; answer its probes meanwhile
    if line.strip() in ("usage", "trim"):
        print(json.dumps(probe(line.strip() == "trim")), flush=True)
server.stop(grace=0)
"""


class ServerProcess:
    """``python -c _SERVE``: a SplitService behind a mutual-TLS ChannelServer; its log to a file."""

    def __init__(self, pki: Path, source: ModelSource, spec: SplitSpec, config: dict[str, Any], device: str,
                 threads: int, log_path: Path) -> None:
        payload = {"source": source.to_dict(), "spec": spec.to_dict(), "config": config, "pki": str(pki),
                   "device": device, "threads": threads}
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in close()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVE, json.dumps(payload)], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the server did not start; its log:\n{log_path.read_text()[-3000:]}")
        self.address = f"127.0.0.1:{int(line)}"
        self.pid = self.proc.pid

    def probe(self, trim: bool = False) -> dict[str, Any]:
        """The server's own accounting, read in its process (``_SERVE``'s ``probe``): budget bytes,
        sessions and streams per node, RSS (after a gc and ``malloc_trim(0)`` if ``trim``)."""
        try:
            self.proc.stdin.write("trim\n" if trim else "usage\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())
        except (OSError, ValueError) as e:
            return {"error": f"{type(e).__name__}: {e}"}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> int | None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


# -- /proc --------------------------------------------------------------------------------------------

def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in kB (0 if it is gone)."""
    return _status_kb(pid, "VmRSS")


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return float("nan")


def host_cpu_s() -> tuple[float, float]:
    """(busy CPU seconds of the whole host, all cores; steal seconds) from /proc/stat."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = vals
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


class RssSampler:
    """The server's RSS every 0.1 s, in a thread of this process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append((time.monotonic(), rss_kb(self.pid)))

    def between(self, t0: float, t1: float) -> list[int]:
        return [kb for t, kb in list(self.samples) if t0 <= t <= t1 and kb]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


# -- mallory's statuses -------------------------------------------------------------------------------

# (pattern in the server's details, reason); the first that matches names the refusal.
REASONS = (
    (r"maximum of \d+ sessions", "session cap"),
    (r"the server holds its maximum", "server session cap"),
    (r"maximum of \d+ streams", "stream cap"),
    (r"memory budget of node", "node memory budget"),
    (r"server memory budget", "server memory budget"),
    (r"stalled", "stall watchdog"),
    (r"idle for", "idle watchdog"),
    (r"no HANDSHAKE", "handshake watchdog"),
    (r"KV cache limit", "KV cache limit"),
    (r"read no reply", "reply window"),
    (r"Concurrent RPC limit", "gRPC concurrent-RPC limit"),
)
EXPECTED = {
    "OK",
    "RESOURCE_EXHAUSTED (session cap)",
    "RESOURCE_EXHAUSTED (stream cap)",
    "RESOURCE_EXHAUSTED (node memory budget)",
    "RESOURCE_EXHAUSTED (KV cache limit)",
    "DEADLINE_EXCEEDED (stall watchdog)",
    "DEADLINE_EXCEEDED (idle watchdog)",
    "DEADLINE_EXCEEDED (handshake watchdog)",
    "CANCELLED (by mallory, at the end of the phase)",
}


def classify(code: Any, details: str = "") -> str:
    name = code if isinstance(code, str) else getattr(code, "name", str(code))
    for pattern, reason in REASONS:
        if re.search(pattern, details or ""):
            return f"{name} ({reason})"
    if name == "OK" or not details:
        return name
    return f"{name} ({details[:90]})"


class RawStream:
    """A hand-driven Exchange call (no deadline): raw frames out, reassembled replies in, the status.

    Several may share one grpc.Channel (HTTP/2 streams on one TLS connection)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        method = channel.stream_stream(EXCHANGE_METHOD, request_serializer=passthrough,
                                       response_deserializer=identity)
        self.call = method(self._requests())
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.ended = threading.Event()
        self._reasm = Reassembler(checksum=False)
        threading.Thread(target=self._read, name="raw-reader", daemon=True).start()

    def _requests(self) -> Any:
        while (item := self._out.get()) is not None:
            if isinstance(item, bytes):
                yield item
            else:
                yield from item

    def _read(self) -> None:
        try:
            for raw in self.call:
                msg = self._reasm.add(*split_frame(raw))
                if msg is not None:
                    self.replies.put(msg)
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            self.code, self.details = e.code(), e.details() or ""
        except Exception as e:  # a malformed reply: ours to report, not to hide
            self.code, self.details = grpc.StatusCode.UNKNOWN, f"client side: {type(e).__name__}: {e}"
        self.ended.set()
        self.replies.put(None)

    def send(self, msg: Message) -> None:
        self._out.put(encode_frames(msg, None, 1 << 20, False))  # fragments cut lazily by gRPC's thread

    def send_raw(self, frames: list[bytes]) -> None:
        for f in frames:
            self._out.put(f)

    def request(self, msg: Message, timeout: float) -> Message | None:
        """Send ``msg`` and wait for its reply; None if the stream ended first (see code/details)."""
        self.send(msg)
        try:
            return self.replies.get(timeout=timeout)
        except queue.Empty:
            return None

    def cancel(self) -> None:
        self._out.put(None)
        self.call.cancel()


def _message(type_: int, body: Any, sid: str, seq: int) -> Message:
    return Message(type=type_, body=body, session_id=sid, node_id="mallory", sequence=seq, typed=True)


class Flood:
    """Mallory's flood threads for one phase, and the statuses they met."""

    def __init__(self, conf: dict[str, Any], kinds: list[str]) -> None:
        self.conf = conf
        self.kinds = kinds
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.hist: dict[str, Counter] = defaultdict(Counter)
        self.unexpected: list[tuple[str, str, str]] = []
        self.notes: list[str] = []
        self.bytes_accepted = 0
        self.bytes_attempted = 0
        self.close_failures = 0
        self.started = time.monotonic()
        self.tls = client_tls(conf["pki"], "mallory")
        self.threads: list[threading.Thread] = []
        self._raws: set[RawStream] = set()
        self._channels: list[grpc.Channel] = []
        self._clients: list[Any] = []
        budget = conf["node_memory_bytes"]
        self.junk = None
        if "payloads" in kinds:  # one buffer, sliced: mallory's own memory is not the point
            self.junk = torch.rand(int(1.25 * budget) // 4 + 1)
        self.stall_junk = torch.zeros(int(0.2 * budget) // 4) if "stalls" in kinds else None
        targets = {
            "sessions": [self._sessions],
            "streams": [self._streams],
            "payloads": [lambda i=i: self._payloads(i) for i in range(3)],
            "stalls": [self._stalls],
            "hoard": [lambda i=i: self._hoard_activations(i) for i in range(4)]
            + [lambda i=i: self._hoard_kv(i) for i in range(4)],
            "tails": [lambda i=i: self._tails(i) for i in range(conf["max_sessions_per_node"])],
        }
        for kind in kinds:
            for fn in targets[kind]:
                self._spawn(kind, fn)

    # -- bookkeeping -----------------------------------------------------------------------------
    def _spawn(self, kind: str, fn: Any) -> None:
        def run() -> None:
            try:
                fn()
            except Exception as e:  # a bug of ours, or of the library's client: say so
                self.record(kind, "FLOOD THREAD CRASHED", f"{type(e).__name__}: {e}")
        t = threading.Thread(target=run, name=f"flood-{kind}", daemon=True)
        self.threads.append(t)
        t.start()

    def record(self, kind: str, code: Any, details: str = "") -> str:
        label = classify(code, details)
        with self.lock:
            self.hist[kind][label] += 1
            if label not in EXPECTED and len(self.unexpected) < 40:
                self.unexpected.append((kind, label, (details or "")[:300]))
        return label

    def record_error(self, kind: str, e: BaseException) -> str:
        if isinstance(e, RemoteError):
            return self.record(kind, e.code, e.message)
        if isinstance(e, grpc.RpcError):
            return self.record(kind, e.code(), e.details() or "")
        return self.record(kind, "CLIENT EXCEPTION", f"{type(e).__name__}: {e}")

    def channel(self) -> grpc.Channel:
        ca, cert, key = self.tls.read()
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        ch = grpc.secure_channel(self.conf["address"], creds, options=ChannelConfig().client_options())
        with self.lock:
            self._channels.append(ch)
        return ch

    def raw(self, channel: grpc.Channel) -> RawStream:
        r = RawStream(channel)
        with self.lock:
            self._raws.add(r)
        return r

    def forget(self, r: RawStream) -> None:
        r.cancel()
        with self.lock:
            self._raws.discard(r)

    def client(self, tail: str = "frozen") -> ChannelClient:
        c = ChannelClient(self.conf["address"], "mallory", tls=self.tls,
                          config=ChannelConfig(connections=1, handshake_timeout_s=10),
                          hello_extra={"tail": {"mode": tail}})
        with self.lock:
            self._clients.append(c)
        return c

    def close_client(self, c: Any) -> None:
        try:
            c.close()
        except Exception:
            with self.lock:
                self.close_failures += 1

    def session(self, kind: str, tail: str = "frozen") -> ChannelClient | None:
        """A connected ChannelClient (its session), retried once a second until granted or stopped."""
        while not self.stop.is_set():
            c = self.client(tail)
            try:
                c.connect()
                self.record(kind, "OK")
                return c
            except Exception as e:
                self.record_error(kind, e)
                self.close_client(c)
            self.stop.wait(1.0)
        return None

    def wait_end(self, r: RawStream) -> str:
        """Wait until the server ends ``r`` ("ended"), or the phase does ("stopped": we cancel it)."""
        while not r.ended.wait(0.2):
            if self.stop.is_set():
                r.cancel()
                r.ended.wait(5)
                return "stopped"
        if self.stop.is_set() and r.code == grpc.StatusCode.CANCELLED:
            return "stopped"  # finish() cancelled it
        return "ended"

    def server_rss_over_ceiling(self) -> bool:
        return rss_kb(self.conf["server_pid"]) > self.conf["rss_ceiling_kb"]

    # -- sessions ----------------------------------------------------------------------------------
    def _sessions(self) -> None:
        cap = self.conf["max_sessions_per_node"]
        while not self.stop.is_set():
            held = []
            for _ in range(cap + 4):
                if self.stop.is_set():
                    break
                c = self.client()
                try:
                    c.connect()
                    held.append(c)
                    self.record("sessions", "OK")
                except Exception as e:
                    self.record_error("sessions", e)
                    self.close_client(c)
            self.stop.wait(1.0)
            for c in held:
                self.close_client(c)  # CLOSE: the server frees the session now
            self.stop.wait(0.2)

    # -- streams -----------------------------------------------------------------------------------
    def _streams(self) -> None:
        anchor = self.session("streams")
        if anchor is None:
            return
        channel = self.channel()
        slots = self.conf["max_streams_per_node"] + 8
        workers = [threading.Thread(target=self._stream_slot, args=(channel, anchor.session_id, i % 3 == 2),
                                    daemon=True) for i in range(slots)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        self.close_client(anchor)

    def _stream_slot(self, channel: grpc.Channel, sid: str, silent: bool) -> None:
        while not self.stop.is_set():
            r = self.raw(channel)
            if not silent:  # binds to the session with one request, then idles
                r.request(_message(pb.CACHE, {"op": "info"}, sid, 1), timeout=15)
            if self.wait_end(r) == "stopped":
                self.record("streams", "CANCELLED (by mallory, at the end of the phase)")
            else:
                self.record("streams", r.code, r.details)
            self.forget(r)
            self.stop.wait(0.2)

    # -- payloads ----------------------------------------------------------------------------------
    def _payloads(self, i: int) -> None:
        anchor = self.session("payloads")
        if anchor is None:
            return
        budget = self.conf["node_memory_bytes"]
        channel = self.channel()
        fractions = (0.3, 0.6, 0.9, 1.25)
        for k in itertools.count(i):
            if self.stop.is_set():
                break
            n = int(fractions[k % len(fractions)] * budget) // 4
            r = self.raw(channel)
            with self.lock:
                self.bytes_attempted += 4 * n
            reply = r.request(_message(pb.CACHE, {"op": "info", "beam_idx": self.junk[:n]}, anchor.session_id, 1),
                              timeout=120)
            if reply is not None and reply.type != pb.ERROR:
                self.record("payloads", "OK")
                with self.lock:
                    self.bytes_accepted += 4 * n
            elif reply is not None:
                self.record("payloads", grpc.StatusCode.UNKNOWN if not reply.code else _status(reply.code),
                            str(reply.body))
            else:
                r.ended.wait(5)
                if self.stop.is_set() and r.code in (None, grpc.StatusCode.CANCELLED):
                    self.record("payloads", "CANCELLED (by mallory, at the end of the phase)")
                else:
                    self.record("payloads", r.code or "NO REPLY", r.details)
            self.forget(r)
            self.stop.wait(2.0)
        self.close_client(anchor)

    # -- stalls ------------------------------------------------------------------------------------
    def _stalls(self) -> None:
        anchor = self.session("stalls")
        if anchor is None:
            return
        channel = self.channel()
        sid = anchor.session_id
        big = encode_frames(_message(pb.CACHE, {"op": "info", "beam_idx": self.stall_junk}, sid, 2), None, 1 << 20,
                            False)
        first = [big.frame(0), big.frame(1)]  # fragments of a message that never completes
        workers = [threading.Thread(target=self._stall_slot, args=(channel, sid, first), daemon=True)
                   for _ in range(6)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        self.close_client(anchor)

    def _stall_slot(self, channel: grpc.Channel, sid: str, first: list[bytes]) -> None:
        while not self.stop.is_set():
            r = self.raw(channel)
            # A complete first message binds the stream to the session (past the handshake
            # watchdog), then the partial one: the stall watchdog's case.
            reply = r.request(_message(pb.CACHE, {"op": "info"}, sid, 1), timeout=15)
            if reply is None:
                if not self.stop.is_set():
                    r.ended.wait(5)
                    self.record("stalls", r.code or "NO REPLY", r.details)
                self.forget(r)
                self.stop.wait(0.5)
                continue
            r.send_raw(first)
            if self.wait_end(r) == "stopped":
                self.record("stalls", "CANCELLED (by mallory, at the end of the phase)")
            else:
                self.record("stalls", r.code, r.details)
            self.forget(r)
            self.stop.wait(0.1)

    # -- hoarding sessions -------------------------------------------------------------------------
    def _hoard_activations(self, i: int) -> None:
        c = self.session("hoard: activations", self.conf["hoard_tail"])
        if c is None:
            return
        width, seq = self.conf["n_embd"], self.conf["hoard_seq"]
        for k in itertools.count():
            if self.stop.is_set():
                break
            if self.server_rss_over_ceiling():
                self.notes.append("hoard (activations) stopped at the RSS safety ceiling")
                break
            body = {"hidden": torch.randn(1, seq, width), "id": k, "args": (), "kwargs": {}, "training": True,
                    "result": "hidden_states"}
            try:
                c.request(MessageType.FORWARD, body, timeout=120)  # its graph is kept: no BACKWARD ever
                self.record("hoard: activations", "OK")
                self.stop.wait(0.05)
            except Exception as e:
                self.record_error("hoard: activations", e)
                self.stop.wait(1.0)
        self.close_client(c)

    def _hoard_kv(self, i: int) -> None:
        c = self.session("hoard: KV cache", self.conf["hoard_tail"])
        if c is None:
            return
        width, new, batch = self.conf["n_embd"], self.conf["kv_new"], self.conf["kv_batch"]
        past = 0
        while not self.stop.is_set():
            if self.server_rss_over_ceiling():
                self.notes.append("hoard (KV cache) stopped at the RSS safety ceiling")
                break
            positions = torch.arange(past, past + new).unsqueeze(0)
            body = {"hidden": torch.randn(batch, new, width), "args": [KV_CACHE, None, None],
                    "kwargs": {"encoder_attention_mask": None, "use_cache": True, "position_ids": positions},
                    "training": False, "result": "hidden_states", "cache": {"past": past, "new": new}}
            try:
                c.request(MessageType.INFER, body, timeout=120)
                past += new
                self.record("hoard: KV cache", "OK")
                self.stop.wait(0.05)
            except Exception as e:
                self.record_error("hoard: KV cache", e)  # a refused step allocated nothing: same past again
                self.stop.wait(1.0)
        self.close_client(c)

    def _tails(self, i: int) -> None:
        """A session with a trainable tail (the server copies its segment), one step (AdamW state), held."""
        kind = "tails"
        source, spec = ModelSource.from_dict(self.conf["source"]), SplitSpec.from_dict(self.conf["spec"])
        while not self.stop.is_set():
            try:
                split = open_split(self.conf["address"], "mallory", self.tls, source=source, spec=spec,
                                   tail={"mode": "trainable", "optimizer": {"name": "AdamW", "lr": LR}},
                                   config=ChannelConfig(connections=1, handshake_timeout_s=10))
            except Exception as e:
                self.record_error(kind, e)
                self.stop.wait(1.0)
                continue
            with self.lock:
                self._clients.append(split)
            try:
                ids = torch.randint(0, self.conf["vocab"], (1, 16))
                split.runner.pending_step = {"step": 0}
                split.model.train()(input_ids=ids, labels=ids).loss.backward()
                split.runner.confirm()
                self.record(kind, "OK")
            except Exception as e:
                self.record_error(kind, e)
            self.stop.wait()
            self.close_client(split)
            return

    # -- the end of the phase ----------------------------------------------------------------------
    def finish(self, timeout: float = 60.0) -> dict[str, Any]:
        """Stop: raw streams first (so that the node's stream cap has room for the CLOSEs that
        end mallory's sessions), then the threads, which close their clients, then the rest."""
        self.stop.set()
        for _ in range(5):
            with self.lock:
                raws = list(self._raws)
            for r in raws:
                r.cancel()
            time.sleep(0.2)
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, end - time.monotonic()))
        hung = [t.name for t in self.threads if t.is_alive()]
        with self.lock:
            raws, channels, clients = list(self._raws), list(self._channels), list(self._clients)
        for r in raws:
            r.cancel()
        for c in clients:
            self.close_client(c)
        for ch in channels:
            ch.close()
        wall = time.monotonic() - self.started
        return {
            "kinds": self.kinds,
            "statuses": {k: dict(v) for k, v in self.hist.items()},
            "unexpected": self.unexpected,
            "notes": sorted(set(self.notes)) + ([f"threads still running after {timeout:.0f} s: {hung}"]
                                                if hung else []),
            "payload_MB_accepted": self.bytes_accepted / 1e6,
            "payload_MB_attempted": self.bytes_attempted / 1e6,  # refused ones included
            "payload_MB_per_s_accepted": self.bytes_accepted / 1e6 / wall,
            "close_failures": self.close_failures,
            "wall_s": wall,
        }


def _status(value: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == int(value)), grpc.StatusCode.UNKNOWN)


class _CloseFailures:
    """Counts the ChannelClient's "CLOSE failed" debug records (a session it could not end: the
    server keeps it until its idle TTL), by reason."""

    def __init__(self) -> None:
        import logging

        self.reasons: Counter = Counter()
        self.handler = logging.Handler(logging.DEBUG)
        self.handler.emit = self._emit  # type: ignore[method-assign]
        logger = logging.getLogger("lightning_split.channel.client")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self.handler)

    def _emit(self, record: Any) -> None:
        msg = record.getMessage()
        if "CLOSE failed" in msg:
            self.reasons[classify(msg.split(": ", 1)[-1].split(":", 1)[0], msg)] += 1

    def take(self) -> dict[str, int]:
        out, self.reasons = dict(self.reasons), Counter()
        return out


def mallory_main(conf: dict[str, Any], conn: Any) -> None:
    """Mallory's process: waits for ``("start", kinds)`` / ``("stop",)`` / ``("quit",)``."""
    import logging

    torch.set_num_threads(conf["threads"])
    for name in ("lightning_split", "grpc"):  # its refusals are counted, not logged
        logging.getLogger(name).setLevel(logging.CRITICAL)
    close_failures = _CloseFailures()
    flood: Flood | None = None
    conn.send("ready")
    while True:
        cmd = conn.recv()
        if cmd[0] == "start":
            close_failures.take()
            kinds = list(ALL_KINDS) if cmd[1] == ["all"] else cmd[1]
            flood = Flood(conf, kinds)
            conn.send("started")
        elif cmd[0] == "stop":
            report = flood.finish() if flood is not None else {}
            report["CLOSE_failed"] = close_failures.take()  # sessions mallory could not end (they idle out)
            conn.send(report)
            flood = None
        else:
            conn.send("bye")
            return


class MalloryProcess:
    def __init__(self, conf: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=mallory_main, args=(conf, child), name="mallory", daemon=True)
        self.proc.start()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("mallory's process did not start")
        self.pid = self.proc.pid

    def start(self, kinds: list[str]) -> None:
        self.conn.send(("start", kinds))
        self.conn.recv()

    def stop(self, timeout: float = 120.0) -> dict[str, Any]:
        self.conn.send(("stop",))
        if not self.conn.poll(timeout):
            return {"error": f"mallory did not report within {timeout:.0f} s"}
        return self.conn.recv()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(("quit",))
            self.conn.poll(10)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


# -- alice ---------------------------------------------------------------------------------------------

def run_alice(address: str, pki: Path, source: ModelSource, spec: SplitSpec, batches: list[torch.Tensor],
              eval_batch: torch.Tensor, device: str = "cpu") -> dict[str, Any]:
    """A fresh session, every batch a training step (timed), then an evaluation loss; the client's weights."""
    out: dict[str, Any] = {"times": [], "losses": [], "error": None}
    split = open_split(address, "alice", client_tls(pki, "alice"), source=source, spec=spec,
                       tail={"mode": "trainable", "optimizer": {"name": "AdamW", "lr": LR}},
                       config=ChannelConfig(connections=1), device=device)
    cuda = torch.device(device).type == "cuda"
    batches, eval_batch = [b.to(device) for b in batches], eval_batch.to(device)
    try:
        model = split.model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=LR)

        def step(i: int, ids: torch.Tensor) -> torch.Tensor:
            return split_train_step(split, opt, i, ids)

        try:
            for i, ids in enumerate(batches):
                t0 = time.perf_counter()
                loss = step(i, ids)
                if cuda:
                    torch.cuda.synchronize(device)
                out["times"].append(time.perf_counter() - t0)
                out["losses"].append(float(loss))
            split.runner.confirm()
            model.eval()
            with torch.no_grad():  # reads the server's weights after its last step, too
                out["eval_loss"] = float(model(input_ids=eval_batch, labels=eval_batch).loss)
            out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
    finally:
        split.close()
    return out


def same_results(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, str]:
    """Bitwise: every step's loss, the evaluation loss, every client tensor."""
    if a.get("error") or b.get("error"):
        return False, "a run failed"
    if a["losses"] != b["losses"]:
        diff = max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))
        return False, f"losses differ (max |diff| {diff:.3g})"
    if a["eval_loss"] != b["eval_loss"]:
        return False, f"eval loss differs ({a['eval_loss']!r} vs {b['eval_loss']!r})"
    for k, v in a["state"].items():
        if not torch.equal(v, b["state"][k]):
            return False, f"client tensor {k} differs"
    return True, "identical"


def p90(xs: list[float]) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=10, method="inclusive")[8]


# -- the run ---------------------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny GPT-2, few steps, one combined flood")
    p.add_argument("--model", choices=list(MODELS), default=None, help="default: tiny (--quick), mini")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--cut", type=int, default=2, help="first block on the server (default 2)")
    p.add_argument("--steps", type=int, default=None, help="alice's timed steps per phase (after warm-up)")
    p.add_argument("--warmup", type=int, default=None, help="alice's untimed first steps per phase")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=None,
                   help=f"flood phases, in order (default: all of them alone, then 'all'; --quick: all). "
                        f"'all' = {', '.join(ALL_KINDS)} at once")
    p.add_argument("--repeats", type=int, default=1, help="run the flood phases this many times")
    p.add_argument("--flood-s", type=float, default=None, help="least seconds each flood phase lasts")
    p.add_argument("--ramp-s", type=float, default=None, help="seconds of flood before alice starts")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="a quiet phase before each flood phase after the first (default: on, off with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each process (default 1)")
    p.add_argument("--device", default="cpu", help="the server's and alice's device: cpu (default) or cuda")
    p.add_argument("--node-memory-mib", type=int, default=256)
    p.add_argument("--memory-mib", type=int, default=1024)
    p.add_argument("--max-sessions-per-node", type=int, default=8)
    p.add_argument("--max-streams-per-node", type=int, default=16)
    p.add_argument("--stall-s", type=float, default=5.0, help="stream_stall_timeout_s")
    p.add_argument("--idle-s", type=float, default=8.0, help="stream_idle_timeout_s")
    p.add_argument("--handshake-s", type=float, default=8.0, help="handshake_timeout_s")
    p.add_argument("--hoard-tail", choices=["frozen", "trainable"], default="frozen",
                   help="tail mode of mallory's hoarding sessions")
    p.add_argument("--server-log", default=None, help="also copy the server's log (WARNING and up) here")
    p.add_argument("--json", default=None,
                   help="result file (default benchmarks/results/noisy_neighbour.json, _quick with --quick)")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device == "cuda":
        args.device = "cuda:0"
    if args.interleave is None:
        args.interleave = not args.quick
    if args.json is None:
        args.json = str(RESULTS / f"noisy_neighbour{'_quick' if args.quick else ''}.json")
    return args


def server_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_sessions_per_node": args.max_sessions_per_node,
        "max_streams_per_node": args.max_streams_per_node,
        "stream_stall_timeout_s": args.stall_s,
        "stream_idle_timeout_s": args.idle_s,
        "handshake_timeout_s": args.handshake_s,
        "node_memory_bytes": args.node_memory_mib * MIB,
        "memory_bytes": args.memory_mib * MIB,
        "connections": 1,
    }


LOG_PATTERNS = (
    (r"refused mallory", "refused mallory"),
    (r"stream of mallory ended", "watchdog ended mallory's stream"),
    (r"refused alice", "refused alice"),
    (r"stream of alice ended", "watchdog ended alice's stream"),
    (r"dropping the autograd graph", "graphs dropped (max_graphs)"),
)


_NUMBERS = re.compile(r"[0-9a-f]{8,}|\d+")
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ([\w.]+): ?(.*)$")


def log_summary(text: str) -> dict[str, Any]:
    """What the server logged: refusals and watchdog ends per node, and, grouped, anything that looks
    like a bug (ERROR records, tracebacks, anything about alice), each group with one full example."""
    records: list[list[str]] = []
    for line in text.splitlines():
        if _RECORD.match(line) or not records:
            records.append([line])
        else:
            records[-1].append(line)
    counts: Counter = Counter()
    groups: dict[str, dict[str, Any]] = {}
    for rec in records:
        head = rec[0]
        for pattern, name in LOG_PATTERNS:
            if re.search(pattern, head):
                counts[name] += 1
        m = _RECORD.match(head)
        level, logger, msg = m.groups() if m else ("?", "?", head)
        traceback = len(rec) > 1
        if level in ("ERROR", "CRITICAL") or traceback or "alice" in head:
            last = rec[-1].strip() if traceback else ""
            shape = _NUMBERS.sub("#", msg)[:100]  # refs, ids and counts vary: group by the message's shape
            key = f"{level} {logger}: {shape} | {last[:160]}"
            group = groups.setdefault(key, {"count": 0, "example": "\n".join(rec)[:4000]})
            group["count"] += 1
    suspicious = sorted(({"signature": k, **v} for k, v in groups.items()), key=lambda g: -g["count"])
    return {"counts": dict(counts), "suspicious": suspicious,
            "suspicious_count": sum(g["count"] for g in suspicious)}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    config = server_config(args)
    source = ModelSource("transformers:GPT2LMHeadModel", {**GPT2_COMMON, **MODELS[args.model]}, seed=0)
    spec = SplitSpec(cut=args.cut, shape="two_part")
    vocab, width = source.config["vocab_size"], source.config["n_embd"]
    batches = random_batches(args.warmup + args.steps, args.batch, args.seq, vocab, "cpu")
    eval_batch = random_batches(1, args.batch, args.seq, vocab, "cpu", seed=2)[0]
    server_layers = source.config["n_layer"] - args.cut
    node_budget = config["node_memory_bytes"]
    # A KV step adds ~1/16 of the node budget: batch x new tokens x (layers x keys+values x width x fp32).
    kv_new = 64
    kv_batch = max(1, node_budget // 16 // (kv_new * server_layers * 2 * width * 4))
    print(f"noisy neighbour: GPT-2 {args.model} ({source.config['n_layer']} x {width}, vocab {vocab}), "
          f"two-part cut {args.cut}, batch {args.batch} x {args.seq}, {args.steps} timed steps after "
          f"{args.warmup} per phase, {args.threads} torch thread(s) per process", flush=True)
    print("  server config: " + ", ".join(f"{k}={v}" for k, v in config.items()), flush=True)

    phases: list[dict[str, Any]] = []
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ls-noisy-") as tmp:
        pki = Path(tmp) / "pki"
        make_certs(pki, client_ids=["alice", "mallory"])
        server = ServerProcess(pki, source, spec, config, args.device, args.threads, Path(tmp) / "server.log")
        sampler = RssSampler(server.pid)
        mallory = None
        try:
            start_view = server.probe(trim=True)
            rss_start = rss_kb(server.pid)
            mallory = MalloryProcess({
                "address": server.address, "pki": str(pki), "server_pid": server.pid, "threads": args.threads,
                "node_memory_bytes": node_budget, "max_sessions_per_node": args.max_sessions_per_node,
                "max_streams_per_node": args.max_streams_per_node, "hoard_tail": args.hoard_tail,
                "n_embd": width, "vocab": vocab, "hoard_seq": min(256, source.config["n_positions"]),
                "kv_new": kv_new, "kv_batch": kv_batch, "source": source.to_dict(), "spec": spec.to_dict(),
                # Never let a budget that does not hold take this host down: hoarders stop here.
                "rss_ceiling_kb": rss_start + 6 * (1 << 20),
            })

            def cpus() -> tuple[float, ...]:
                return (cpu_s(server.pid), cpu_s(mallory.pid), time.process_time(), *host_cpu_s())

            def phase(name: str, kinds: list[str] | None) -> dict[str, Any]:
                # Every phase starts from a trimmed heap (the server's freed memory given back to the OS).
                start = server.probe(trim=True)
                t0, c0 = time.monotonic(), cpus()
                rss0 = rss_kb(server.pid)
                if kinds:
                    mallory.start(kinds)
                    time.sleep(args.ramp_s)
                ta, ca = time.monotonic(), cpus()
                try:
                    run = run_alice(server.address, pki, source, spec, batches, eval_batch, args.device)
                except Exception as e:  # alice could not even open her session
                    run = {"times": [], "losses": [], "error": f"{type(e).__name__}: {e}"}
                tb, cb = time.monotonic(), cpus()
                flood: dict[str, Any] = {}
                peak: dict[str, Any] = {}
                if kinds:
                    time.sleep(max(0.0, t0 + args.flood_s - time.monotonic()))
                    peak = server.probe()  # what mallory holds by the server's own count, flood still on
                    # and what RSS holds then once freed heap is given back: live memory, not retention
                    peak["rss_kb_trimmed"] = server.probe(trim=True).get("rss_kb", 0)
                    flood = mallory.stop()
                t1 = time.monotonic()
                time.sleep(1.0)  # mallory's cancelled streams are released (asynchronously) by now
                # No trim here: malloc_trim makes the next phase's first allocations fault pages in again.
                settled = server.probe()
                c1 = cpus()
                during_alice = sampler.between(ta, tb)
                rss_phase = sampler.between(t0, t1)
                timed = run["times"][args.warmup:]
                rec = {
                    "name": name, "kinds": kinds or [], "wall_s": t1 - t0,
                    "alice_error": run.get("error"),
                    "median_ms": 1e3 * median(timed), "p90_ms": 1e3 * p90(timed),
                    "step_ms": [round(1e3 * t, 2) for t in run["times"]],
                    "losses": run["losses"], "eval_loss": run.get("eval_loss"),
                    # CPU, % of one core, while alice ran (session, steps, evaluation) and over the phase
                    "server_cpu_pct": 100 * (cb[0] - ca[0]) / (tb - ta),
                    "mallory_cpu_pct": 100 * (cb[1] - ca[1]) / (tb - ta),
                    "alice_cpu_pct": 100 * (cb[2] - ca[2]) / (tb - ta),
                    # everything else on this host (other users' jobs: this VM is shared), and VM steal
                    "others_cpu_pct": 100 * ((cb[3] - ca[3]) - sum(cb[i] - ca[i] for i in range(3))) / (tb - ta),
                    "steal_pct": 100 * (cb[4] - ca[4]) / (tb - ta),
                    "load_avg": Path("/proc/loadavg").read_text().split()[:3],
                    # the flood's ramp, before alice starts: what mallory alone costs the server
                    "ramp_server_cpu_pct": 100 * (ca[0] - c0[0]) / (ta - t0) if kinds else None,
                    "ramp_mallory_cpu_pct": 100 * (ca[1] - c0[1]) / (ta - t0) if kinds else None,
                    "phase_server_cpu_pct": 100 * (c1[0] - c0[0]) / (t1 - t0),
                    "phase_mallory_cpu_pct": 100 * (c1[1] - c0[1]) / (t1 - t0),
                    "server_rss_mib_start": rss0 / 1024,  # after the trim
                    "server_view_at_start": start,
                    "server_rss_mib_max": max(rss_phase, default=0) / 1024,
                    "server_rss_mib_max_while_alice": max(during_alice, default=0) / 1024,
                    "server_rss_mib_end": rss_kb(server.pid) / 1024,
                    "flood": flood,
                    "server_view_at_flood_end": peak,
                    "server_view_after": settled,
                }
                runs[name] = run
                phases.append(rec)
                print(f"  {name:<18} median {rec['median_ms']:7.1f} ms  p90 {rec['p90_ms']:7.1f} ms  "
                      f"server RSS max {rec['server_rss_mib_max']:6.0f} MiB  server CPU {rec['server_cpu_pct']:4.0f}%  "
                      f"mallory CPU {rec['mallory_cpu_pct']:4.0f}%" + (f"  ERROR {run['error']}" if run.get("error")
                                                                      else ""), flush=True)
                if not server.alive():
                    raise RuntimeError(f"the server process died (exit {server.proc.returncode})")
                return rec

            phase("quiet", None)
            phase("reference", None)
            rss_before = rss_kb(server.pid)
            sequence = [(r, kind) for r in range(args.repeats) for kind in args.kinds]
            for i, (r, kind) in enumerate(sequence):
                if args.interleave and i:  # a quiet run just before each flood: this shared VM drifts
                    phase(f"quiet {i + 1}", None)
                phase(f"flood: {kind}" + (f" #{r + 1}" if args.repeats > 1 else ""), [kind])
            time.sleep(1.0)
            rss_after_flood = rss_kb(server.pid)
            phase("after", None)
            rss_end, hwm = rss_kb(server.pid), _status_kb(server.pid, "VmHWM")
            end_view = server.probe(trim=True)  # what RSS still holds once freed heap goes back to the OS
        finally:
            if mallory is not None:
                mallory.close()
            sampler.close()
            exit_code = server.close()
        log_text = server.log_path.read_text()
        server_log = log_summary(log_text)
        if args.server_log:
            Path(args.server_log).write_text(log_text)

    # -- results ------------------------------------------------------------------------------------
    quiet, ref = phases[0], runs["reference"]
    rows = []
    last_quiet = quiet
    for rec in phases:
        same, why = same_results(runs[rec["name"]], ref) if rec["name"] != "reference" else (True, "-")
        rec["same_as_solo"], rec["same_detail"] = same, why
        rec["x_quiet_median"] = rec["median_ms"] / quiet["median_ms"]
        rec["x_quiet_p90"] = rec["p90_ms"] / quiet["p90_ms"]
        # against the quiet run just before it (the reference for the first flood), for drift
        rec["x_prev_quiet_median"] = rec["median_ms"] / last_quiet["median_ms"]
        if not rec["kinds"]:
            last_quiet = rec
        rows.append([rec["name"], rec["median_ms"], rec["p90_ms"], rec["x_quiet_median"], rec["x_quiet_p90"],
                     rec["x_prev_quiet_median"] if rec["kinds"] else "",
                     "yes" if same else f"NO: {why}" if rec["name"] != "reference" else "(ref)",
                     f"{rec['server_cpu_pct']:.0f}", f"{rec['mallory_cpu_pct']:.0f}", f"{rec['alice_cpu_pct']:.0f}",
                     f"{max(0.0, rec['others_cpu_pct']):.0f}", rec["server_rss_mib_start"], rec["server_rss_mib_max"]])
    print_table(f"alice's training step, GPT-2 {args.model}, batch {args.batch} x {args.seq} "
                f"({args.steps} timed steps per phase; CPU: % of one core while alice ran; others: every other "
                f"process on this shared VM)",
                ["phase", "median ms", "p90 ms", "x quiet", "x quiet p90", "x prev quiet", "same as solo",
                 "server CPU%", "mallory CPU%", "alice CPU%", "others CPU%", "server RSS start MiB",
                 "max MiB"], rows)

    status_rows = []
    for rec in phases:
        flood = rec["flood"]
        for kind, hist in sorted(flood.get("statuses", {}).items()):
            for label, n in sorted(hist.items(), key=lambda kv: -kv[1]):
                status_rows.append([rec["name"], kind, label, n, "" if label in EXPECTED else "UNEXPECTED"])
    if status_rows:
        print_table("mallory's attempts, by how the server answered", ["phase", "flood", "answer", "count", ""],
                    status_rows)
    for rec in phases:
        flood = rec["flood"]
        if flood.get("payload_MB_attempted"):
            print(f"  {rec['name']}: payloads {flood['payload_MB_accepted']:.0f} MB accepted of "
                  f"{flood['payload_MB_attempted']:.0f} MB attempted "
                  f"({flood['payload_MB_per_s_accepted']:.0f} MB/s accepted)")
        for note in flood.get("notes", []):
            print(f"  {rec['name']}: NOTE {note}")
        if flood.get("close_failures") or flood.get("CLOSE_failed"):
            print(f"  {rec['name']}: mallory's CLOSEs that failed: {flood.get('CLOSE_failed')} "
                  f"(+{flood.get('close_failures', 0)} close() exceptions)")
        if flood.get("error"):
            print(f"  {rec['name']}: MALLORY {flood['error']}")

    def mib(view: dict[str, Any], node: str) -> str:
        return f"{view.get('budget_bytes', {}).get(node, 0) / MIB:.1f}" if view else "-"

    def per_node(view: dict[str, Any], key: str) -> str:
        got = view.get(key, {}) if view else {}
        return ", ".join(f"{k} {v}" for k, v in sorted(got.items())) or "none"

    acct_rows = [[rec["name"], f"{rec['ramp_server_cpu_pct']:.0f}", f"{rec['ramp_mallory_cpu_pct']:.0f}",
                  mib(rec["server_view_at_flood_end"], "mallory"),
                  per_node(rec["server_view_at_flood_end"], "sessions"),
                  per_node(rec["server_view_at_flood_end"], "streams"),
                  rec["server_rss_mib_start"], rec["server_view_at_flood_end"]["rss_kb_trimmed"] / 1024,
                  mib(rec["server_view_after"], "mallory"), per_node(rec["server_view_after"], "sessions"),
                  per_node(rec["server_view_after"], "streams")]
                 for rec in phases if rec["kinds"]]
    print_table("mallory by the server's own count (read in its process) at the flood's end, 1 s after the phase; "
                "CPU % of one core in the ramp (mallory alone); RSS trimmed (heap given back: live memory only)",
                ["phase", "ramp server CPU%", "ramp mallory CPU%", "mallory MiB charged", "sessions", "streams",
                 "RSS at start MiB", "RSS at end MiB", "after: mallory MiB", "after: sessions",
                 "after: streams"], acct_rows)

    rss = {"start (trimmed)": rss_start / 1024, "before_flood": rss_before / 1024,
           "max_during_flood": max((r["server_rss_mib_max"] for r in phases if r["kinds"]), default=0),
           "after_flood": rss_after_flood / 1024, "end": rss_end / 1024,
           "end (trimmed)": end_view.get("rss_kb", 0) / 1024, "peak_VmHWM": hwm / 1024}
    print("\nserver RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()) +
          f"  (node budget {args.node_memory_mib} MiB, server budget {args.memory_mib} MiB)")
    print("server log: " + (", ".join(f"{k}: {v}" for k, v in server_log["counts"].items()) or "nothing")
          + f"; suspicious lines: {server_log['suspicious_count']}; exit code {exit_code}")
    for group in server_log["suspicious"][:8]:
        print(f"    {group['count']} x {group['signature']}")

    floods = [r for r in phases if r["kinds"]]
    worst_med = max((r["x_quiet_median"] for r in floods), default=float("nan"))
    worst_p90 = max((r["x_quiet_p90"] for r in floods), default=float("nan"))
    exact = all(r["same_as_solo"] for r in phases)
    unexpected = [u for r in floods for u in r["flood"].get("unexpected", [])]
    met = worst_med <= CLAIM_RATIO and worst_p90 <= CLAIM_RATIO and exact and not unexpected
    print(f"\nclaim (every flood phase: median and p90 within {CLAIM_RATIO}x quiet; results identical to the solo "
          f"run; every refusal at a cap): {'MET' if met else 'NOT MET'} -- worst median {worst_med:.2f}x, worst p90 "
          f"{worst_p90:.2f}x, identical: {exact}, unexpected answers: {len(unexpected)}; "
          f"worst median against the quiet run just before: "
          f"{max((r['x_prev_quiet_median'] for r in floods), default=float('nan')):.2f}x; quiet run-to-run: "
          + ", ".join(f"{r['x_quiet_median']:.2f}x" for r in phases[1:] if not r["kinds"]) + " of quiet's median")
    for r in floods:
        if r["x_quiet_median"] > CLAIM_RATIO or r["x_quiet_p90"] > CLAIM_RATIO:
            print(f"    over {CLAIM_RATIO}x: {r['name']} ({r['x_quiet_median']:.2f}x / p90 {r['x_quiet_p90']:.2f}x) "
                  f"while other processes on this VM took {max(0.0, r['others_cpu_pct']):.0f}% of a core")
    for kind, label, details in unexpected[:10]:
        print(f"    unexpected: {kind}: {label}: {details}")
    print("notes: every process computes with one torch thread on this host's "
          f"{os.cpu_count()} cores; mallory's process competes for them too (its CPU% above). "
          f"Hoarding sessions' tail: {args.hoard_tail}; KV steps of {kv_batch} x {kv_new} tokens.")

    out = write_json(Path(args.json), argparse.Namespace(**{**vars(args), "device": args.device}), {
        "server_config": config, "server_view_at_start": start_view, "server_view_at_end": end_view,
        "phases": phases, "rss_mib": rss,
        "server_log": server_log,
        "server_exit_code": exit_code, "claim": {"ratio": CLAIM_RATIO, "met": met, "worst_median_x": worst_med,
                                                 "worst_p90_x": worst_p90, "identical": exact,
                                                 "unexpected": unexpected},
        "seconds": time.perf_counter() - t_start,
    })
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
