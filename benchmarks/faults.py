"""Faults: how fast a split client notices a broken link, how fast it resumes, and that nothing
runs twice.

    .venv/bin/python benchmarks/faults.py            # 5 repetitions per fault, 20 training steps: ~2 minutes
    .venv/bin/python benchmarks/faults.py --quick    # 1 repetition, 6 training steps: ~30 s
    .venv/bin/python benchmarks/faults.py --kinds cut_up,cut_down --reps 20

Everything is real and on loopback: a mutual-TLS ChannelServer (certificates from ``make_certs``)
answering with tests/channel_util.EchoHandler, a ChannelClient (one connection) and, between them,
tests/fault_proxy.FaultProxy, which drops, stalls or refuses the TCP connections on demand.
Each repetition opens a fresh client (a fresh session), makes one warm-up request, then injects
the fault around one request in flight and measures, from the moment of the fault:

* detect: until the client notices: its first log record about the fault ("the server did not
  answer ..." from the keepalive health check, or "connection to ... lost; reconnecting"), kept
  per repetition in the JSON as ``detected_by``; ``reconnected_s``: until "reconnected to ...".
* resume: until the request in flight completes (its future resolves), after the reconnect,
  the resumed session and the request sent again.
* once: the server ran the request exactly once (in-process servers: the handler's runs of that
  sequence number in that session; the frozen subprocess server: its per-session request count);
  ok: the reply equals the request. Also the client's reconnect / resend counters and the
  server's answers from its reply record (``replayed``).

Fault kinds (``--kinds``):

1. cut_up:      the link reset (RST) after a seeded number of bytes of a 1 MiB request going up.
2. cut_down:    the link reset after a seeded number of bytes of its 1 MiB reply coming down: the
                request ran, so the re-sent one is answered from the server's record.
3. stall_ka5:   the link forwards nothing for 15 s (connections left open) while a small request
                waits, default keepalive (5 s + 5 s): the client's health check finds it after
                about 10 s; stall_ka1: the same with keepalive 1 s + 1 s (about 2 s).
   stall_ka5_1mib, stall_ka1_1mib: the same with a 1 MiB request, more than the socket buffers
                take: the sender's TCP then times out (gRPC sets TCP_USER_TIMEOUT to the keepalive
                timeout) after about keepalive_timeout_s, before the health check would.
4. unreachable: the server refuses connections and the live one is reset, for 2 s, mid-request.
5. freeze:      the server process (a subprocess, no proxy) is SIGSTOPped for 12 s mid-request,
                then SIGCONTinued; default keepalive.

The fault's moment: a cut's own time (the proxy's cut counter, timestamped as it changes), the
stall() call, the SIGSTOP. The slow kinds (stalls, freeze) mostly wait, so by default they run
concurrently, each in its own thread with its own server and proxy (``--serial``: one by one).

Training (``--steps``, 0 to skip): a small GPT-2 (tests/split_cases.GPT2, two-part split at
block 1, trainable tail, Adam, lr 3e-3) through SplitStrategy and a Lightning Trainer on CPU, the
link cut once in every step at a seeded byte count (as in tests/test_faults.py), against the same
split run without cuts and a local run of the whole model (lm_head untied, as the split has it).
Reported: cuts armed / happened, reconnects, requests re-sent, whether training finished with
the server's Adam having applied each step once, the largest weight difference (client and
server sides) versus the uncut split run (expected 0: bit-identical) and versus local (about
1e-6), and the step times with and without cuts.

Results: a table on stdout, JSON in benchmarks/results/faults_cpu.json (``--out``). The numbers
depend on a host shared with other jobs: on a loaded 2-core VM the millisecond figures move.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before torch: a shared 2-core host
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402

from lightning_split._proto import split_pb2 as pb  # noqa: E402
from lightning_split.channel import (  # noqa: E402
    ChannelClient,
    ChannelConfig,
    ChannelServer,
    RemoteError,
    client_tls,
    server_tls,
)
from lightning_split.channel.certs import make_certs  # noqa: E402
from tests.channel_util import EchoHandler  # noqa: E402
from tests.fault_proxy import FaultProxy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FORWARD = pb.FORWARD
FAST_KINDS = ("cut_up", "cut_down", "unreachable")
SLOW_KINDS = ("stall_ka5", "stall_ka1", "stall_ka5_1mib", "stall_ka1_1mib", "freeze")
KINDS = FAST_KINDS[:2] + SLOW_KINDS[:4] + FAST_KINDS[2:] + SLOW_KINDS[4:]
STALL_S, UNREACHABLE_S, FREEZE_S = 15.0, 2.0, 12.0
PAYLOAD = (256, 1024)  # 1 MiB of float32, up and (echoed) down


# -- observing the client --------------------------------------------------------------------------

class Events(logging.Handler):
    """Timestamps (monotonic) of the client's log records: when it noticed, when it reconnected."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[float, str]] = []
        self.mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.mutex:
            self.records.append((time.monotonic(), record.getMessage()))

    def first(self, address: str, after: float, *needles: str) -> tuple[float | None, str]:
        """The first record about ``address`` at or after ``after`` that contains one of ``needles``:
        (its time, its message)."""
        with self.mutex:
            for t, msg in self.records:
                if t >= after and address in msg and any(n in msg for n in needles):
                    return t, msg
        return None, ""


EVENTS = Events()
DETECTED = ("did not answer", "lost (")  # keepalive health check gave up / the reconnect starts
RECONNECTED = ("reconnected to",)


class TimedProxy(FaultProxy):
    """A FaultProxy that notes when each cut happens (its loop thread bumps ``cuts``)."""

    def __init__(self, target_port: int) -> None:
        self.cut_times: list[float] = []
        super().__init__(target_port)

    @property
    def cuts(self) -> int:
        return self._cuts

    @cuts.setter
    def cuts(self, value: int) -> None:
        if value:
            self.cut_times.append(time.monotonic())
        self._cuts = value


def finished_at(fut: Any) -> list[float]:
    """A list that gets the monotonic time at which ``fut`` resolves."""
    out: list[float] = []
    fut.add_done_callback(lambda _: out.append(time.monotonic()))
    return out


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.002)
    return bool(pred())


def rel(t: float | None, t0: float | None) -> float | None:
    return None if t is None or t0 is None else round(t - t0, 4)


# -- one fault kind ------------------------------------------------------------------------------

class Bench:
    """Certificates and the per-kind servers: an in-process echo server behind a proxy, or a
    subprocess echo server (the one to freeze)."""

    def __init__(self, pki: Path, seed: int) -> None:
        self.pki, self.seed = pki, seed
        self.cleanup: list[Callable[[], Any]] = []
        self.connect_failures: list[str] = []  # first connects that failed (and were retried)

    def in_process(self) -> tuple[EchoHandler, ChannelServer, TimedProxy]:
        handler = EchoHandler()
        server = ChannelServer(handler, "127.0.0.1:0", tls=server_tls(self.pki), config=ChannelConfig())
        server.start()
        proxy = TimedProxy(server.port)
        self.cleanup += [lambda: server.stop(grace=0), proxy.close]
        return handler, server, proxy

    def subprocess_server(self) -> tuple[subprocess.Popen, int]:
        code = f"""
import sys
from lightning_split.channel import ChannelServer, ChannelConfig, server_tls
from tests.channel_util import EchoHandler
s = ChannelServer(EchoHandler(), "127.0.0.1:0", tls=server_tls({str(self.pki)!r}), config=ChannelConfig())
print(s.start(), flush=True)
sys.stdin.read()
s.stop(grace=0)
"""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env, cwd=ROOT)

        def stop() -> None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGCONT)
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

        self.cleanup.append(stop)
        return proc, int(proc.stdout.readline())

    def client(self, port: int, **config: Any) -> tuple[ChannelClient, int]:
        """A connected client (a fresh session), and how many times its first connect was retried
        (no fault is injected yet then: a retry is itself worth reporting)."""
        for attempt in range(3):
            client = ChannelClient(f"127.0.0.1:{port}", "alice", tls=client_tls(self.pki, "alice"),
                                   config=ChannelConfig(connections=1, **config))
            try:
                client.connect()
                return client, attempt
            except RemoteError as e:
                client.close()
                if attempt == 2 or e.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.connect_failures.append(f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable")

    def close(self) -> None:
        for fn in reversed(self.cleanup):
            with contextlib.suppress(Exception):
                fn()


def runs_of(handler: EchoHandler, session_id: str, seq: int) -> int:
    with handler.lock:
        return sum(1 for s, q, _ in handler.seen if s == session_id and q == seq)


def replayed(server: ChannelServer, session_id: str) -> int | None:
    session = server.sessions.snapshot().get(session_id)
    return None if session is None or session.replies is None else session.replies.replayed


def measure(client: ChannelClient, fut: Any, done: list[float], t_fault: float | None, body: dict,
            runs: Callable[[int], int], timeout: float = 90.0) -> dict[str, Any]:
    """Wait for ``fut``; the repetition's measurements."""
    row: dict[str, Any] = {}
    try:
        reply = fut.result(timeout=timeout)
        row["ok"] = _equal(reply.body, body)
        row["runs"] = runs(reply.sequence)
    except Exception as e:  # noqa: BLE001 - a failed repetition is a result, not a crash
        row.update(ok=False, runs=None, error=f"{type(e).__name__}: {e}")
    wait_for(lambda: bool(done), 1.0)
    address = client.address
    row["fault_seen"] = t_fault is not None
    t_detect, why = EVENTS.first(address, t_fault or 0.0, *DETECTED)
    row["detect_s"] = rel(t_detect, t_fault)
    row["detected_by"] = why
    row["reconnected_s"] = rel(EVENTS.first(address, t_fault or 0.0, *RECONNECTED)[0], t_fault)
    row["resume_s"] = rel(done[0] if done else None, t_fault)
    row["once"] = row["runs"] == 1
    row["reconnects"], row["resent"] = client.stats.reconnects, client.stats.resent
    return row


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def repeat(reps: int, one: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """``one(rep)`` for each repetition; one that raises is recorded as such, and the rest still run."""
    rows = []
    for rep in range(reps):
        try:
            rows.append(one(rep))
        except Exception as e:  # noqa: BLE001 - a failed repetition is a result
            rows.append({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    return rows


def kind_cut(bench: Bench, reps: int, direction: str) -> list[dict[str, Any]]:
    """Reset the link after a seeded number of bytes of the request (up) or of its reply (down)."""
    handler, server, proxy = bench.in_process()
    g = torch.Generator().manual_seed(bench.seed)

    def one(rep: int) -> dict[str, Any]:
        x = torch.randn(*PAYLOAD, generator=g)
        nbytes = int(torch.randint(1, x.numel() * x.element_size(), (1,), generator=g))
        client, retries = bench.client(proxy.port)
        try:
            assert client.request(FORWARD, {"warm": rep}).body == {"warm": rep}
            body = {"i": rep, "x": x} if direction == "up" else {"i": rep, "x": x, "sleep": 0.2}
            cuts, seen = len(proxy.cut_times), len(handler.seen)
            if direction == "up":
                proxy.cut_after(nbytes, "up")
            fut = client.submit(FORWARD, body)
            done = finished_at(fut)
            if direction == "down":  # armed once it runs: the bytes counted are the reply's
                wait_for(lambda: len(handler.seen) > seen)
                proxy.cut_after(nbytes, "down")
            wait_for(lambda: len(proxy.cut_times) > cuts or fut.done(), 10.0)
            t_fault = proxy.cut_times[cuts] if len(proxy.cut_times) > cuts else None
            row = measure(client, fut, done, t_fault, body, lambda seq: runs_of(handler, client.session_id, seq))
            row.update(cut_after_bytes=nbytes, replayed=replayed(server, client.session_id), connect_retries=retries)
            return row
        finally:
            client.close()

    return repeat(reps, one)


def kind_stall(bench: Bench, reps: int, keepalive_s: float, big: bool = False) -> list[dict[str, Any]]:
    """The link carries nothing for STALL_S seconds, its connections left open. The request is
    small (a few bytes: it fits in the socket buffers), or ``big`` (1 MiB: it does not)."""
    handler, server, proxy = bench.in_process()

    def one(rep: int) -> dict[str, Any]:
        client, retries = bench.client(proxy.port, keepalive_time_s=keepalive_s, keepalive_timeout_s=keepalive_s)
        try:
            assert client.request(FORWARD, {"warm": rep}).body == {"warm": rep}
            body = {"i": rep, "x": torch.full(PAYLOAD, float(rep))} if big else {"i": rep}
            proxy.stall(STALL_S)
            t_fault = time.monotonic()
            fut = client.submit(FORWARD, body)
            done = finished_at(fut)
            row = measure(client, fut, done, t_fault, body, lambda seq: runs_of(handler, client.session_id, seq))
            row.update(stall_s=STALL_S, replayed=replayed(server, client.session_id), connect_retries=retries)
            return row
        finally:
            proxy.resume()
            client.close()

    return repeat(reps, one)


def kind_unreachable(bench: Bench, reps: int) -> list[dict[str, Any]]:
    """Mid-request, the live connection is reset and new ones refused for UNREACHABLE_S seconds."""
    handler, server, proxy = bench.in_process()

    def one(rep: int) -> dict[str, Any]:
        client, retries = bench.client(proxy.port)
        timer = threading.Timer(UNREACHABLE_S, proxy.refuse, (False,))
        try:
            assert client.request(FORWARD, {"warm": rep}).body == {"warm": rep}
            body = {"i": rep, "sleep": 0.3}
            seen, cuts = len(handler.seen), len(proxy.cut_times)
            fut = client.submit(FORWARD, body)
            done = finished_at(fut)
            wait_for(lambda: len(handler.seen) > seen)
            proxy.refuse(True)
            proxy.cut_now()
            timer.start()
            wait_for(lambda: len(proxy.cut_times) > cuts, 5.0)
            t_fault = proxy.cut_times[cuts] if len(proxy.cut_times) > cuts else None
            row = measure(client, fut, done, t_fault, body, lambda seq: runs_of(handler, client.session_id, seq))
            row.update(down_s=UNREACHABLE_S, replayed=replayed(server, client.session_id), connect_retries=retries)
            return row
        finally:
            if timer.is_alive():
                timer.join()
            proxy.refuse(False)
            client.close()

    return repeat(reps, one)


def kind_freeze(bench: Bench, reps: int) -> list[dict[str, Any]]:
    """The server process SIGSTOPped for FREEZE_S seconds while it runs a request, then SIGCONT."""
    proc, port = bench.subprocess_server()

    def one(rep: int) -> dict[str, Any]:
        client, retries = bench.client(port)
        timer = threading.Timer(FREEZE_S, proc.send_signal, (signal.SIGCONT,))
        try:
            assert client.request(FORWARD, {"warm": rep}).body == {"warm": rep}
            body = {"i": rep, "sleep": 0.2}
            fut = client.submit(FORWARD, body)
            done = finished_at(fut)
            time.sleep(0.05)  # on the server now, most likely inside the handler's sleep
            proc.send_signal(signal.SIGSTOP)
            t_fault = time.monotonic()
            timer.start()

            def runs(_seq: int) -> int:  # the session's handler runs: warm-up, this one, the count itself
                return int(client.request(FORWARD, {"count": True}).body["count"]) - 2

            row = measure(client, fut, done, t_fault, body, runs)
            row.update(frozen_s=FREEZE_S, connect_retries=retries)
            return row
        finally:
            if timer.is_alive():
                timer.join()
            proc.send_signal(signal.SIGCONT)
            client.close()

    return repeat(reps, one)


RUNNERS: dict[str, Callable[[Bench, int], list[dict[str, Any]]]] = {
    "cut_up": lambda b, n: kind_cut(b, n, "up"),
    "cut_down": lambda b, n: kind_cut(b, n, "down"),
    "stall_ka5": lambda b, n: kind_stall(b, n, 5.0),
    "stall_ka1": lambda b, n: kind_stall(b, n, 1.0),
    "stall_ka5_1mib": lambda b, n: kind_stall(b, n, 5.0, big=True),
    "stall_ka1_1mib": lambda b, n: kind_stall(b, n, 1.0, big=True),
    "unreachable": kind_unreachable,
    "freeze": kind_freeze,
}
DESCRIPTIONS = {
    "cut_up": "RST during a 1 MiB request's upload",
    "cut_down": "RST during its 1 MiB reply (ran: from the record)",
    "stall_ka5": f"link stalled {STALL_S:.0f} s, keepalive 5 s + 5 s",
    "stall_ka1": f"link stalled {STALL_S:.0f} s, keepalive 1 s + 1 s",
    "stall_ka5_1mib": "the same, 5 s + 5 s, a 1 MiB request",
    "stall_ka1_1mib": "the same, 1 s + 1 s, a 1 MiB request",
    "unreachable": f"reset + refused for {UNREACHABLE_S:.0f} s, mid-request",
    "freeze": f"server process SIGSTOP {FREEZE_S:.0f} s, mid-request",
}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def stats(key: str) -> dict[str, float] | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        if not vals:
            return None
        return {"median": round(statistics.median(vals), 4), "min": round(min(vals), 4), "max": round(max(vals), 4)}

    return {
        "reps": len(rows),
        "detect_s": stats("detect_s"),
        "reconnected_s": stats("reconnected_s"),
        "resume_s": stats("resume_s"),
        "exactly_once": sum(1 for r in rows if r.get("once")),
        "reply_ok": sum(1 for r in rows if r.get("ok")),
        "faults_seen": sum(1 for r in rows if r.get("fault_seen")),
        "reconnects": sum(r.get("reconnects", 0) for r in rows),
        "resent": sum(r.get("resent", 0) for r in rows),
        "replayed": sum(r.get("replayed") or 0 for r in rows),
        "errors": [r["error"] for r in rows if "error" in r],
    }


def run_kinds(bench: Bench, kinds: list[str], reps: int, serial: bool) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {}
    slow = [k for k in kinds if k in SLOW_KINDS]
    errors: dict[str, BaseException] = {}

    def one(kind: str) -> None:
        try:
            results[kind] = RUNNERS[kind](bench, reps)
        except BaseException as e:  # noqa: BLE001 - reported in the table
            errors[kind] = e
            results[kind] = [{"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}]

    threads = []
    if not serial:  # they mostly wait: overlap them, each with its own server, proxy and client
        threads = [threading.Thread(target=one, args=(k,), name=f"bench-{k}") for k in slow]
        for t in threads:
            t.start()
    for kind in kinds:
        if kind not in slow or serial:
            print(f"  {kind} ...", flush=True)
            one(kind)
    if threads:
        print(f"  waiting for {', '.join(slow)} (concurrent) ...", flush=True)
    for t in threads:
        t.join()
    return {k: results[k] for k in kinds}


# -- training through a link cut every step -----------------------------------------------------

def train_row(pki: Path, steps: int, seed: int) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_split import SplitSpec, SplitStrategy
    from lightning_split.examples.modules import CausalLM
    from lightning_split.server.service import SplitService
    from lightning_split.split.build import build_model
    from tests.split_cases import GPT2
    from tests.test_strategy import _gpt2_batches

    spec = SplitSpec(cut=1, shape="two_part")

    class StepTimer(Callback):
        """Each step's (start, end) monotonic time, and the bytes the proxy carried in it."""

        def __init__(self, proxy: FaultProxy | None = None) -> None:
            self.proxy = proxy
            self.spans: list[tuple[float, float]] = []
            self.bytes: list[int] = []
            self._t, self._b = 0.0, 0

        def _carried(self) -> int:
            return 0 if self.proxy is None else self.proxy.bytes_up + self.proxy.bytes_down

        def on_train_batch_start(self, *args: Any) -> None:
            self._t, self._b = time.monotonic(), self._carried()

        def on_train_batch_end(self, *args: Any) -> None:
            self.spans.append((self._t, time.monotonic()))
            self.bytes.append(self._carried() - self._b)

    class CutEveryStep(Callback):
        def __init__(self, proxy: FaultProxy, most: int) -> None:
            self.proxy, self.most = proxy, most
            self.g = torch.Generator().manual_seed(seed)

        def on_train_batch_start(self, *args: Any) -> None:
            self.proxy.cut_after(int(torch.randint(1, self.most, (1,), generator=self.g)))

    def fit(module: Any, strategy: Any = None, callbacks: tuple = (), proxy: FaultProxy | None = None) -> StepTimer:
        timer = StepTimer(proxy)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, strategy=strategy or "auto",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[timer, *callbacks])
        trainer.fit(module, _gpt2_batches(steps, seed=seed))
        return timer

    out: dict[str, Any] = {"steps": steps, "model": "tests.split_cases.GPT2", "spec": "cut=1, two_part",
                           "tail": "trainable", "optimizer": "Adam lr 3e-3",
                           "cut_most_bytes": 40_000}  # replaced by the uncut run's median bytes per step
    def untied_init() -> CausalLM:  # the split unties the output layer from the embedding: so does local
        module = CausalLM(lr=3e-3, optimizer="Adam")
        module.model = build_model(GPT2)
        module.model.lm_head.weight = torch.nn.Parameter(module.model.lm_head.weight.detach().clone())
        return module

    print("  training: local ...", flush=True)
    local = untied_init()
    out["local_step_s"] = [b - a for a, b in fit(local).spans]

    with tempfile.TemporaryDirectory() as state:
        service = SplitService(GPT2, spec, state_dir=Path(state))
        server = ChannelServer(service, "127.0.0.1:0", tls=server_tls(pki))
        server.start()
        proxy = TimedProxy(server.port)
        runs: dict[str, dict[str, Any]] = {}
        try:
            for name, cut in (("plain", False), ("cut", True)):
                print(f"  training: split, {'a cut every step' if cut else 'no cuts'} ...", flush=True)
                cuts0 = len(proxy.cut_times)
                strategy = SplitStrategy(address=f"127.0.0.1:{proxy.port}", node_id="alice",
                                         tls=client_tls(pki, "alice"), device="cpu", tail="trainable",
                                         channel=ChannelConfig(connections=1))
                module = CausalLM(lr=3e-3, optimizer="Adam")
                run: dict[str, Any] = {}
                try:
                    # The cut falls anywhere within a step: after 1 .. (the uncut run's median bytes per step).
                    cutter = (CutEveryStep(proxy, out["cut_most_bytes"]),) if cut else ()
                    timer = fit(module, strategy, cutter, proxy)
                    run["step_s"] = [b - a for a, b in timer.spans]
                    if not cut:
                        out["bytes_per_step"] = int(statistics.median(timer.bytes))
                        out["cut_most_bytes"] = max(2, out["bytes_per_step"])
                    else:  # the steps a cut fell in
                        hit = [any(a <= t <= b for t in proxy.cut_times[cuts0:]) for a, b in timer.spans]
                        run["cut_hit"] = hit
                    run["finished"] = True
                except Exception as e:  # noqa: BLE001 - a training that died is the result
                    run.update(finished=False, error=f"{type(e).__name__}: {e}")
                client = strategy.split.client
                segment = server.sessions.snapshot()[client.session_id].state["segment"]
                run.update(
                    adam_steps=sorted({int(s["step"]) for s in segment.optimizer.state.values()}),
                    client_params={n: p.detach().clone() for n, p in module.named_parameters()},
                    server_params={n: p.detach().clone() for n, p in segment.module.named_parameters()},
                )
                runs[name] = run
                # After close: a cut that fell after the last step's last reply is reconnected by the CLOSE.
                strategy.close()
                run.update(cuts=len(proxy.cut_times) - cuts0, reconnects=client.stats.reconnects,
                           resent=client.stats.resent)
        finally:
            proxy.close()
            server.stop(grace=0)

    plain, cut = runs["plain"], runs["cut"]
    local_params = dict(local.named_parameters())
    blocks = local.model.transformer.h
    tail = spec.resolve(local.model).tail

    def vs_local(run: dict[str, Any]) -> float:
        diffs = [(p - local_params[n]).abs().max().item() for n, p in run["client_params"].items()]
        for name, p in run["server_params"].items():  # blocks.<i>.<rest>: local block cut + i
            part, i, rest = name.split(".", 2)  # tail.<i>.<rest>: the local module of the spec's tail i
            local_part = blocks[spec.cut + int(i)] if part == "blocks" else local.model.get_submodule(tail[int(i)])
            diffs.append((p - local_part.get_parameter(rest)).abs().max().item())
        return max(diffs)

    def vs_run(a: dict[str, Any], b: dict[str, Any]) -> float:
        diffs = [(p - b[side][n]).abs().max().item() for side in ("client_params", "server_params")
                 for n, p in a[side].items()]
        return max(diffs)

    out.update(
        cuts_armed=steps, cuts=cut["cuts"], reconnects=cut["reconnects"], resent=cut["resent"],
        finished=cut["finished"], plain_finished=plain["finished"],
        survived=cut["finished"] and cut["adam_steps"] == [steps],
        adam_steps_cut=cut["adam_steps"], adam_steps_plain=plain["adam_steps"],
        max_abs_diff_vs_uncut=vs_run(cut, plain), max_abs_diff_vs_local=vs_local(cut),
        max_abs_diff_uncut_vs_local=vs_local(plain),
        server_tail=list(tail), server_params_compared=len(cut["server_params"]),
        client_params_compared=len(cut["client_params"]),
        split_step_s=plain.get("step_s"), split_cut_step_s=cut.get("step_s"),
        split_cut_step_hit=cut.get("cut_hit"), cuts_in_steps=sum(cut.get("cut_hit") or []),
        max_abs_update_local=max((p - q).abs().max().item() for p, q in zip(
            local.parameters(), untied_init().parameters(), strict=True)),
        errors=[r["error"] for r in (plain, cut) if "error" in r],
    )
    return out


def step_stats(times: list[float] | None) -> dict[str, float] | None:
    if not times:
        return None
    rest = times[1:] or times  # the first step also connects / warms up
    return {"median_s": statistics.median(rest), "mean_s": statistics.fmean(rest), "max_s": max(rest),
            "first_s": times[0]}


# -- output ---------------------------------------------------------------------------------------

def fmt(s: dict[str, float] | None) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    head = (f"{'fault':<14} {'what':<48} {'n':>2}  {'detect s: median (min-max)':<27} "
            f"{'resume s: median (min-max)':<27} {'once':>5} {'ok':>5} {'reconn':>6} {'resent':>6} {'replay':>6}")
    print(head)
    print("-" * len(head))
    for kind, s in summary.items():
        n = s["reps"]
        print(f"{kind:<14} {DESCRIPTIONS[kind]:<48} {n:>2}  {fmt(s['detect_s']):<27} {fmt(s['resume_s']):<27} "
              f"{s['exactly_once']:>2}/{n:<2} {s['reply_ok']:>2}/{n:<2} {s['reconnects']:>6} {s['resent']:>6} "
              f"{s['replayed']:>6}")
        for err in s["errors"]:
            print(f"{'':<14} error: {err}")


def print_training(t: dict[str, Any]) -> None:
    def ms(s: dict[str, float] | None) -> str:
        if s is None:
            return "-"
        return f"{1000 * s['median_s']:.1f} ms (mean {1000 * s['mean_s']:.1f}, max {1000 * s['max_s']:.1f})"

    print(f"\ntraining: {t['model']} ({t['spec']}, {t['tail']} tail, {t['optimizer']}), {t['steps']} steps, "
          f"a cut armed each step after 1..{t['cut_most_bytes']} bytes (seeded; the uncut run's median bytes per step)")
    print(f"  cuts armed / happened / of which within a step / reconnects / re-sent:  {t['cuts_armed']} / "
          f"{t['cuts']} / {t['cuts_in_steps']} / {t['reconnects']} / {t['resent']}")
    print(f"  survived (finished, server Adam at step {t['steps']}): {t['survived']}  "
          f"(Adam steps: cut {t['adam_steps_cut']}, uncut {t['adam_steps_plain']})")
    print(f"  max |w - w_uncut split|: {t['max_abs_diff_vs_uncut']:.3g}   max |w - w_local|: "
          f"{t['max_abs_diff_vs_local']:.3g} (uncut split vs local: {t['max_abs_diff_uncut_vs_local']:.3g}; "
          f"training moved local weights by up to {t['max_abs_update_local']:.3g})")
    print(f"  step time, median after the first: local {ms(t['local_step'])}")
    print(f"                                     split, no cuts {ms(t['split_step'])}")
    print(f"                                     split, a cut every step {ms(t['split_cut_step'])}")
    hits = (t.get("split_cut_step_hit") or [])[1:]
    if hits and not all(hits):
        hit = [dt for dt, h in zip(t["split_cut_step_s"][1:], hits, strict=True) if h]
        print(f"                                     of which the {len(hit)} a cut fell in: median "
              f"{1000 * statistics.median(hit):.1f} ms, max {1000 * max(hit):.1f} ms")
    for err in t["errors"]:
        print(f"  error: {err}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=None, help="repetitions per fault kind (default 5; --quick: 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps, 0: no training row (default 20; --quick: 6)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--quick", action="store_true", help="1 repetition, 6 training steps")
    p.add_argument("--serial", action="store_true", help="run the slow kinds one after another, not concurrently")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "faults_cpu.json")
    args = p.parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    steps = args.steps if args.steps is not None else (6 if args.quick else 20)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|val_dataloader|litlogger|num_workers).*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "lightning_split"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()
    client_log = logging.getLogger("lightning_split.channel.client")
    client_log.addHandler(EVENTS)  # also keeps its warnings off stderr (no last-resort handler)
    client_log.propagate = False

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp) / "pki"
        make_certs(pki, client_ids=["alice"])
        bench = Bench(pki, args.seed)
        print(f"faults: {len(kinds)} kinds x {reps} reps" + (f", training {steps} steps" if steps else ""),
              flush=True)
        try:
            rows = run_kinds(bench, kinds, reps, args.serial)
        finally:
            bench.close()
        fault_s = time.monotonic() - started
        training = train_row(pki, steps, args.seed) if steps else None
    summary = {k: summarize(r) for k, r in rows.items()}

    print()
    print_table(summary)
    if training is not None:
        for key in ("local", "split", "split_cut"):
            training[f"{key}_step"] = step_stats(training[f"{key}_step_s"])
        print_training(training)
    for failure in bench.connect_failures:
        print(f"note: a first connect (before any fault) failed and was retried: {failure}")
    total_s = time.monotonic() - started
    print(f"\ntotal {total_s:.0f} s (faults {fault_s:.0f} s)")

    result = {
        "benchmark": "faults",
        "host": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                 "cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
        "settings": {"reps": reps, "steps": steps, "kinds": kinds, "seed": args.seed, "serial": args.serial,
                     "stall_s": STALL_S, "unreachable_s": UNREACHABLE_S, "freeze_s": FREEZE_S,
                     "payload_bytes": PAYLOAD[0] * PAYLOAD[1] * 4, "client": "ChannelConfig(connections=1)",
                     "defaults": {k: getattr(ChannelConfig(), k) for k in (
                         "keepalive_time_s", "keepalive_timeout_s", "reconnect_deadline_s", "handshake_timeout_s")}},
        "descriptions": {k: DESCRIPTIONS[k] for k in kinds},
        "summary": summary,
        "reps": rows,
        "first_connect_failures": bench.connect_failures,
        "training": training,
        "total_s": round(total_s, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    bad = any(s["exactly_once"] < s["reps"] or s["reply_ok"] < s["reps"] for s in summary.values())
    return 1 if bad or (training is not None and not training["survived"]) else 0


if __name__ == "__main__":
    sys.exit(main())
