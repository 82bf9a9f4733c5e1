"""Restart: what a server crash and restart costs a split client, with the server's sessions on disk.

    .venv/bin/python benchmarks/restart.py            # 3 repetitions of each fault kind
    .venv/bin/python benchmarks/restart.py --quick    # 1 repetition

Real processes, mutual TLS on loopback, CPU: the split server (tiny GPT-2, two-part split at block
1, ``persist_sessions_s=0``) runs in a subprocess, is SIGKILLed and started again in the background
(the client is not told) on the same port and state folder; the client reconnects with backoff,
resumes its session and re-sends what the restarted server lost (channel/resume.py, journal.py).

1. train-kill-between-steps: Trainer.fit, 8 steps, trainable tail, Adam; killed between steps 3 and 4.
2. train-kill-in-step: the server hangs in the fused BACKWARD of step 3 and is killed there.
3. generate-kill-at-token-5: greedy generate, 20 tokens, frozen tail; killed between tokens 5 and 6.

Per rep: correctness against an uninterrupted local run (client and server-saved weights; tokens);
from our timestamps and the client's ``lightning_split.channel.resume`` records: ``restart_s``
(server spawned to "ready"), ``detect_s`` (kill to the client's first reconnect record),
``resume_s`` (server ready to "reconnected ... resumed"), ``replayed`` (requests re-sent), and the
wall time against the same split run without a fault (after an untimed warm-up run per kind).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _common import RESULTS, ROOT, environment, median, print_table
from lightning.pytorch.callbacks import Callback
from transformers.generation.streamers import BaseStreamer

from lightning_split import ModelSource, SplitSpec, SplitStrategy
from lightning_split.channel import ChannelConfig, client_tls, make_certs
from lightning_split.examples.modules import CausalLM
from lightning_split.server.state_store import StateStore
from lightning_split.split.build import build_model
from lightning_split.split.connect import open_split
from lightning_split.wire import MessageType

GPT2 = ModelSource("transformers:GPT2LMHeadModel", dict(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), seed=3)
SPEC = SplitSpec(cut=1, shape="two_part")
NODE, STEPS, KILL_STEP, TOKENS, KILL_TOKEN, PROMPT = "alice", 8, 3, 20, 5, 7
RESOLVED = SPEC.resolve(build_model(GPT2))  # where its blocks and tail are
COLS = ("restart_s", "detect_s", "resume_s", "replayed", "wall_s", "baseline_wall_s", "extra_s",
        "client_max_abs_diff", "server_max_abs_diff")  # medians in the summary
KINDS = ("train-kill-between-steps", "train-kill-in-step", "generate-kill-at-token-5")

SERVE = textwrap.dedent("""
    import json, sys, threading
    from pathlib import Path
    import torch
    from lightning_split import ModelSource, SplitSpec
    from lightning_split.channel import ChannelConfig, ChannelServer, server_tls
    from lightning_split.server.service import SplitService
    from lightning_split.wire import MessageType
    port, pki, state, threads, source, spec, stuck = sys.argv[1:8]
    torch.set_num_threads(int(threads))  # the client's: the same sums in the same order
    service = SplitService(ModelSource.from_dict(json.loads(source)), SplitSpec.from_dict(json.loads(spec)),
                           device="cpu", state_dir=state, persist_sessions_s=0.0)
    if stuck:  # "TYPE:N": hang (once) in the request of that type and step, until SIGKILL
        kind, number = stuck.split(":")
        once, handle = Path(state) / "stuck-once", service.handle
        def stuck_handle(session, request):
            if request.type == MessageType.Value(kind) and request.step == int(number) and not once.exists():
                once.touch()
                print("stuck", flush=True)
                threading.Event().wait()
            return handle(session, request)
        service.handle = stuck_handle
    server = ChannelServer(service, f"127.0.0.1:{port}", tls=server_tls(pki), config=ChannelConfig())
    server.start()
    print("ready", flush=True)
    threading.Event().wait()  # until SIGKILL
""")


class Server:
    """The split server in its own process, fixed port and state folder; the times of its starts and kill."""

    def __init__(self, pki: Path, tmp: Path, stuck: str = "") -> None:
        self.state = state = Path(tempfile.mkdtemp(dir=tmp, prefix="state-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.args = [str(self.port), str(pki), str(state), str(torch.get_num_threads()),
                     json.dumps(GPT2.to_dict()), json.dumps(SPEC.to_dict()), stuck]
        self.starts: list[tuple[float, float]] = []  # (spawned, ready)
        self.kills: list[float] = []
        self.proc: subprocess.Popen | None = None
        self.restarter: threading.Thread | None = None
        self.log = state.parent / f"{state.name}.log"  # the server's stderr

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        spawned = time.monotonic()
        with open(self.log, "a") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", SERVE, *self.args], stdout=subprocess.PIPE,
                                         stderr=err, text=True, env=env, cwd=ROOT)
        assert self.proc.stdout is not None
        if (line := self.proc.stdout.readline().strip()) != "ready":
            raise RuntimeError(f"the server did not start ({line!r}): {self.log.read_text()[-2000:]}")
        self.starts.append((spawned, time.monotonic()))

    def kill(self) -> None:
        assert self.proc is not None
        self.kills.append(time.monotonic())
        self.proc.kill()  # SIGKILL
        self.proc.wait(timeout=30)

    def crash(self, when_stuck: bool = False) -> None:
        """SIGKILL now (``when_stuck``: once it hangs in its request), start it again in the background."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        if not when_stuck:
            self.kill()

        def restart() -> None:
            if when_stuck:
                if proc.stdout.readline().strip() != "stuck":
                    return
                self.kill()
            self.start()

        self.restarter = threading.Thread(target=restart, daemon=True)
        self.restarter.start()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.restarter is not None:
            self.restarter.join(timeout=60)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


class Events(logging.Handler):
    """Monotonic timestamps of the client's resume log records (as benchmarks/faults.py's)."""

    records: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.monotonic(), record.getMessage()))

    def first(self, after: float, needle: str = "") -> float | None:
        return next((t for t, msg in list(self.records) if t >= after and needle in msg), None)


EVENTS = Events()


class CrashAtStep(Callback):
    """Between two steps (the last one's fused step answered: nothing in flight), crash the server."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == KILL_STEP and not self.server.kills:
            trainer.strategy.split.runner.confirm()
            self.server.crash()


class CrashAtToken(BaseStreamer):
    """Crash the server once the prompt and KILL_TOKEN tokens are out."""

    def __init__(self, server: Server) -> None:
        self.server, self.puts = server, 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == KILL_TOKEN + 1:
            self.server.crash()

    def end(self) -> None:
        pass


def batches() -> torch.utils.data.DataLoader:
    ids = torch.randint(0, 128, (2 * STEPS, 12), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)


def fit(module: L.LightningModule, strategy: Any = "auto", callbacks: tuple = ()) -> float:
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=list(callbacks))
    t0 = time.monotonic()
    trainer.fit(module, batches())
    return time.monotonic() - t0


def local_training() -> dict[str, torch.Tensor]:
    """The uninterrupted local run's weights (output layer untied, as the split has it)."""
    local = CausalLM(lr=3e-3, optimizer="Adam")
    local.model = build_model(GPT2)
    local.model.lm_head.weight = torch.nn.Parameter(local.model.lm_head.weight.detach().clone())
    fit(local)
    return {n: p.detach().clone() for n, p in local.named_parameters()}


def server_name(name: str) -> str:
    """The local name of a server parameter: ``blocks.i.x`` is block ``cut + i``, ``tail.j.x`` the j-th tail module."""
    where, i, rest = name.split(".", 2)
    if where == "blocks":
        return f"model.{RESOLVED.blocks}.{RESOLVED.cut + int(i)}.{rest}"
    return f"model.{RESOLVED.tail[int(i)]}.{rest}"


def compare(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, bool]:
    """(max abs difference, all close as assert_close's rtol=1e-5, atol=1e-6 would have them)."""
    diff = max((float((p - expected[n]).abs().max()) for n, p in got.items()), default=float("nan"))
    return diff, bool(got) and all(torch.allclose(p, expected[n], rtol=1e-5, atol=1e-6) for n, p in got.items())


def outcome(server: Server, kind: str | None, wall: float, stats: Any) -> dict[str, Any]:
    """Wall time, client counters; for a fault restart_s, detect_s, resume_s and the records around the kill."""
    row = {"wall_s": round(wall, 3), "replayed": stats.replayed, "reconnects": stats.reconnects,
           "faulted": kind is None or (len(server.kills) == 1 and len(server.starts) == 2 and stats.reconnects >= 1)}
    if kind is None or not row["faulted"]:
        return row
    kill, (spawned, ready) = server.kills[0], server.starts[1]
    detect, resumed = EVENTS.first(kill), EVENTS.first(kill, "reconnected to")
    log = [(t, m) for t, m in EVENTS.records if t >= kill] + [(spawned, "server spawned"), (ready, "server ready")]
    return {**row, "restart_s": round(ready - spawned, 3),
            "detect_s": None if detect is None else round(detect - kill, 3),
            "resume_s": None if resumed is None else round(resumed - ready, 3),
            "log": [f"{t - kill:+.3f} s after the kill: {m}" for t, m in sorted(log)]}


def train_run(pki: Path, tmp: Path, kind: str | None, local: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One split fit with the fault ``kind`` (None: uninterrupted); its weights against ``local``."""
    with Server(pki, tmp, stuck=f"BACKWARD:{KILL_STEP}" if kind == "train-kill-in-step" else "") as server:
        if kind == "train-kill-in-step":
            server.crash(when_stuck=True)
        strategy = SplitStrategy(address=f"127.0.0.1:{server.port}", node_id=NODE, tls=client_tls(pki, NODE),
                                 device="cpu", tail="trainable", channel=ChannelConfig(connections=1))
        module = CausalLM(lr=3e-3, optimizer="Adam")
        wall = fit(module, strategy, (CrashAtStep(server),) if kind == "train-kill-between-steps" else ())
        stats = strategy.split.client.stats
        strategy._request(MessageType.STATE, {"op": "save", "tag": "final"})
        strategy.close()
    saved = StateStore(server.state).load(NODE, "final")
    client_diff, client_ok = compare({n: p.detach() for n, p in module.named_parameters()}, local)
    server_diff, server_ok = compare(saved["params"], {n: local[server_name(n)] for n in saved["params"]})
    return {**outcome(server, kind, wall, stats), "server_last_step": saved["last_step"], "client_max_abs_diff":
            client_diff, "server_max_abs_diff": server_diff, "server_params": len(saved["params"]),
            "correct": client_ok and server_ok and saved["last_step"] == STEPS - 1}


def prompt() -> torch.Tensor:
    return torch.randint(0, GPT2.config["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(3))


def generate_run(pki: Path, tmp: Path, kind: str | None, expected: torch.Tensor) -> dict[str, Any]:
    """One split greedy generate with the fault ``kind`` (None: uninterrupted); its tokens against ``expected``."""
    with Server(pki, tmp) as server:
        remote = open_split(f"127.0.0.1:{server.port}", NODE, client_tls(pki, NODE), source=GPT2, spec=SPEC,
                            config=ChannelConfig(connections=1))
        t0 = time.monotonic()
        got = remote.model.eval().generate(prompt(), max_new_tokens=TOKENS, do_sample=False, pad_token_id=0,
                                           streamer=CrashAtToken(server) if kind else None)
        wall, stats = time.monotonic() - t0, remote.client.stats
        remote.close()
    same = got.shape == expected.shape and bool(torch.equal(got, expected))
    return {**outcome(server, kind, wall, stats), "tokens_equal": same, "correct": same}


def run_kind(kind: str, reps: int, pki: Path, tmp: Path) -> list[dict[str, Any]]:
    if kind.startswith("train"):
        reference: Any = local_training()
        one = train_run
    else:
        reference = build_model(GPT2).eval().generate(prompt(), max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
        one = generate_run
    warmup = one(pki, tmp, None, reference)  # the first split run in a process (kind) is slower
    rows = []
    for rep in range(reps):
        try:
            baseline = one(pki, tmp, None, reference)
            row = {"rep": rep, **one(pki, tmp, kind, reference), "baseline_wall_s": baseline["wall_s"],
                   "baseline_correct": baseline["correct"], "warmup_wall_s": warmup["wall_s"]}
            row["extra_s"] = round(row["wall_s"] - row["baseline_wall_s"], 3)
            row["correct"] = row["correct"] and row["faulted"]
        except Exception as e:  # a rep that failed is reported, the others still run
            row = {"rep": rep, "correct": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        print(f"  {kind} rep {rep}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("trace", "log")),
              flush=True)
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(median([r[key] for r in rows if r.get(key) is not None]), 4)

    return {"reps": len(rows), "correct": sum(bool(r["correct"]) for r in rows), **{k: med(k) for k in COLS}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repetition per kind")
    p.add_argument("--reps", type=int, default=None, help="repetitions per kind (default 3; --quick: 1)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/restart_cpu[_quick].json")
    args = p.parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    out = args.out or RESULTS / f"restart_cpu{'_quick' if args.quick else ''}.json"
    resume_log = logging.getLogger("lightning_split.channel.resume")
    resume_log.addHandler(EVENTS)  # also keeps its warnings off stderr
    resume_log.propagate = False

    started = time.monotonic()
    print(f"restart: {len(args.kinds)} kinds x {reps} reps, torch threads {torch.get_num_threads()} (client and "
          f"server), {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="ls-restart-") as d:
        make_certs(Path(d) / "pki", client_ids=[NODE])
        results = {kind: run_kind(kind, reps, Path(d) / "pki", Path(d)) for kind in args.kinds}
    summary = {k: summarize(rows) for k, rows in results.items()}

    headers = ["kind", "ok", "max|dw| cl/srv", *COLS[:-2]]
    table = [[k, f"{s['correct']}/{s['reps']}", "tokens" if k.startswith("generate") else
              f"{s['client_max_abs_diff']:.1g}/{s['server_max_abs_diff']:.1g}", *(s[c] for c in COLS[:-2])]
             for k, s in summary.items()]
    print_table(f"server SIGKILL + restart, median of {reps} (seconds)", headers, table)
    total = time.monotonic() - started
    print(f"\ntotal {total:.0f} s")

    doc = {"benchmark": "restart",
           "environment": {**environment("cpu"), "torch_threads": torch.get_num_threads(),
                           "loadavg_end": os.getloadavg()},
           "settings": {"reps": reps, "kinds": args.kinds, "model": GPT2.to_dict(), "spec": SPEC.to_dict(),
                        "steps": STEPS, "kill_step": KILL_STEP, "tokens": TOKENS, "kill_token": KILL_TOKEN,
                        "persist_sessions_s": 0.0, "client": "ChannelConfig(connections=1)"},
           "summary": summary, "reps": results, "total_s": round(total, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0 if all(s["correct"] == s["reps"] for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
