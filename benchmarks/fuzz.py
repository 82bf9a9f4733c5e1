"""Mutation fuzzing of a real split server by a hostile client with a valid certificate.

The server runs in its own process (this script with ``--serve``): a SplitService of a tiny GPT-2
per server kind (``two_part``: the deployment defaults; ``u_shape``: CRC-checking, static-cache
decoder), each behind a mutual-TLS ChannelServer with certificates from ``make_certs`` in a temp
dir, logging at INFO to a file. The fuzzer (tests/fuzz_core.py, shared with tests/test_fuzz.py)
records a corpus of valid requests from a real ``open_split`` client, warms the server up with a
few hundred valid requests, then sends mutated frame sequences over ``--workers`` concurrent
streams and records:

* statuses: every reply's code and every stream end's status, as a histogram;
* hangs: a case with neither its probe's reply nor the stream's end within ``--deadline``;
* crashes: the server process gone (checked after each batch; the last cases of every worker
  are saved next to the JSON, and the server is restarted);
* findings: INTERNAL/UNKNOWN replies and statuses (unhandled exceptions), malformed replies;
* tracebacks in the server log, grouped by where they were raised;
* the server's RSS after warm-up, during the run, and after the run plus ``--idle`` seconds.

Target: >= 100,000 cases, 0 crashes, 0 hangs, no traceback in the server log, the server's RSS
back within 10 % of its post-warm-up value.

    python benchmarks/fuzz.py --quick                 # ~3,000 cases
    python benchmarks/fuzz.py --cases 100000 --workers 4 --server-log /tmp/fuzz_server.log
    python benchmarks/fuzz.py --replay benchmarks/results/fuzz_crash1.json   # replay saved cases
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import faulthandler
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import fuzz_core as fc  # noqa: E402 - the fuzzing core, shared with tests/test_fuzz.py

# The core's entry points, for use from here: corpus, mutator, case runner.
build_corpus, mutate, run_cases = fc.build_corpus, fc.mutate, fc.run_cases

RESULTS = ROOT / "benchmarks" / "results"
TARGET = {"cases": 100_000, "crashes": 0, "hangs": 0, "tracebacks": 0, "rss_growth_pct": 10.0}


# -- the server process ------------------------------------------------------------------------------

def serve(config: dict[str, Any]) -> None:
    """``--serve``: start one server per kind, print their ports as JSON, serve until stdin closes."""
    logging.basicConfig(filename=config["log"], level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
    log = logging.getLogger("fuzz.server")
    # lightning_split logs an internal error as one ERROR line and its traceback at DEBUG.
    logging.getLogger("lightning_split").setLevel(config.get("ls_level", "DEBUG"))

    def thread_hook(args: threading.ExceptHookArgs) -> None:  # a dying thread's traceback goes to the log
        log.error("unhandled exception in thread %s", getattr(args.thread, "name", "?"),
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    threading.excepthook = thread_hook
    import torch
    import transformers

    from lightning_split.channel.server import release_freed_heap

    transformers.logging.set_verbosity_error()
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    def release_memory(*_: Any) -> None:
        """SIGUSR2: collect garbage and hand freed heap back to the OS (glibc malloc_trim), so that
        the fuzzer can tell memory still referenced from memory the allocator merely keeps."""
        import gc

        gc.collect()
        release_freed_heap()
        # Live Python objects by type: two of these lines, diffed, show what a leak is made of.
        counts = Counter(type(o).__name__ for o in gc.get_objects())
        log.info("OBJECTS %s", json.dumps(dict(counts.most_common(300))))

    servers: dict[str, Any] = {}
    if os.environ.get("LS_FUZZ_TRACEMALLOC"):  # frames per traceback; each SIGUSR2 logs the top growth
        import tracemalloc

        tracemalloc.start(int(os.environ["LS_FUZZ_TRACEMALLOC"]))
    baseline: list[Any] = []

    def census() -> None:
        """What a leak could be made of besides Python objects (logged as one CENSUS line)."""
        import gc
        import warnings

        smaps: Counter = Counter()  # RSS in KiB by kind of mapping (anonymous ones by size)
        heaps = 0
        with contextlib.suppress(OSError):
            region = "?"
            for line in Path("/proc/self/smaps").read_text().splitlines():
                head = line.split()
                if head and "-" in head[0] and not head[0].endswith(":"):
                    path = head[5] if len(head) > 5 else ""
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    size = hi - lo
                    region = path if path.startswith("[") else "torch" if "torch" in path else \
                        "grpc" if "grpc" in path else "file" if path else \
                        "anon:1MiB" if size == 1 << 20 else "anon:64MiB-aligned" if lo % (64 << 20) == 0 else \
                        "anon:8MiB" if size in (8 << 20, (8 << 20) + 4096) else \
                        "anon:<1MiB" if size < 1 << 20 else "anon:other"
                    if region == "anon:64MiB-aligned":
                        heaps += 1  # glibc's arenas other than the main one: one 64 MiB heap or more each
                elif head and head[0] == "Rss:":
                    smaps[region] += int(head[1])
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        # glibc malloc, all arenas: bytes in use, free inside the heap, mmapped blocks.
        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        malloc: dict[str, float] = {}
        with contextlib.suppress(OSError, AttributeError):
            fn = ctypes.CDLL("libc.so.6").mallinfo2
            fn.restype = MallInfo2
            mi = fn()
            malloc = {"heap_mib": mib(mi.arena), "in_use_mib": mib(mi.uordblks), "free_mib": mib(mi.fordblks),
                      "mmapped_mib": mib(mi.hblkhd), "mmapped_blocks": mi.hblks}
        pymalloc: dict[str, int] = {}
        with tempfile.TemporaryFile("w+") as f:  # sys._debugmallocstats writes to C's stderr
            saved = os.dup(2)
            os.dup2(f.fileno(), 2)
            try:
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            f.seek(0)
            for line in f:
                if line.startswith(("# arenas allocated current", "# bytes in allocated blocks")):
                    pymalloc[line[2:].split("=")[0].strip()] = int(line.split("=")[1].replace(",", ""))
        storages: dict[int, int] = {}
        with warnings.catch_warnings():  # isinstance() on torch's deprecated aliases warns
            warnings.simplefilter("ignore")
            for o in gc.get_objects():
                if isinstance(o, torch.Tensor) and not o.is_meta:
                    with contextlib.suppress(Exception):
                        st = o.untyped_storage()
                        storages[st.data_ptr()] = st.nbytes()
        out: dict[str, Any] = {
            "rss_mib": int(status["VmRSS"].split()[0]) // 1024, "threads": int(status["Threads"]),
            "py_threads": threading.active_count(), "fds": len(os.listdir("/proc/self/fd")),
            "smaps_rss_mib": {k: round(v / 1024, 1) for k, v in smaps.most_common()},
            "malloc": malloc | {"arena_heaps": heaps}, "pymalloc": pymalloc,
            "torch_storages": len(storages), "torch_storage_mib": mib(sum(storages.values())),
            "thread_names": dict(Counter(re.sub(r"[-_]?\d+$", "", t.name) for t in threading.enumerate())),
        }
        for kind, srv in servers.items():
            out[kind] = {"sessions": len(srv.sessions), "streams": srv.streams.counts(),
                         "bonds": len(srv.bonds), "budget_used": srv.budget.used,
                         "budget_usage": srv.budget.usage()}
        import tracemalloc

        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot()
            out["tracemalloc_mib"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 1)
            if baseline:
                top = snap.compare_to(baseline[0], "traceback")[:15]
                out["tracemalloc_growth"] = [
                    f"{st.size_diff / 1024:+.0f} KiB {st.count_diff:+d} blocks: "
                    + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in st.traceback[:6])
                    for st in top]
            else:
                baseline.append(snap)
        log.info("CENSUS %s", json.dumps(out))

    def on_usr2(*_: Any) -> None:
        release_memory()
        census()
        release_freed_heap()  # what the census itself allocated

    signal.signal(signal.SIGUSR2, on_usr2)
    servers.update({kind: fc.make_server(kind, config["pki"], config["state_dir"]) for kind in config["kinds"]})
    ports = {kind: server.start() for kind, server in servers.items()}
    log.info("fuzz servers up: %s (pid %d)", ports, os.getpid())
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # until the fuzzer closes our stdin
    for server in servers.values():
        server.stop(grace=0)


class ServerProcess:
    """The servers in a child process (``sys.executable benchmarks/fuzz.py --serve CONFIG``)."""

    def __init__(self, pki: Path, state_dir: Path, log: Path, kinds: list[str], threads: int | None,
                 ls_level: str = "DEBUG") -> None:
        config = {"pki": str(pki), "state_dir": str(state_dir), "log": str(log), "kinds": kinds,
                  "threads": threads, "ls_level": ls_level}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the server process failed to start; see {log}")
        self.ports: dict[str, int] = json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        """Resident set size in bytes (psutil if installed, else /proc/PID/status VmRSS)."""
        try:
            import psutil

            return int(psutil.Process(self.proc.pid).memory_info().rss)
        except ImportError:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except Exception:  # noqa: BLE001 - the process is gone
            return 0
        return 0

    def objects(self, log: Path, timeout: float = 20.0) -> dict[str, int]:
        """Ask the server to collect garbage, trim its heap and log its live objects by type (see
        ``serve``); returns those counts (empty if they did not come)."""
        if not self.alive():
            return {}
        before = log.read_text(errors="replace").count(" OBJECTS ") if log.exists() else 0
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [line for line in log.read_text(errors="replace").splitlines() if " OBJECTS " in line]
            if len(lines) > before:
                return json.loads(lines[-1].split(" OBJECTS ", 1)[1])
            time.sleep(0.2)
        return {}

    def stop(self) -> int | None:
        if self.alive():
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


# -- the run ------------------------------------------------------------------------------------------

def mib(n: int) -> float:
    return round(n / 2**20, 1)


def _targets(server: ServerProcess, pki: Path, corpora: dict[str, fc.Corpus]) -> list[fc.Target]:
    return [fc.Target(kind, f"127.0.0.1:{port}", pki, corpora[kind],
                      bool(fc.KINDS[kind].channel.get("checksum"))) for kind, port in server.ports.items()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lightning_split.channel import client_tls, make_certs

    torch.set_num_threads(1)  # the client only builds frames; leave the cores to the server
    json_path = Path(args.json)
    tmp = tempfile.TemporaryDirectory(prefix="ls-fuzz-")
    work = Path(tmp.name)
    pki, state = work / "pki", work / "state"
    make_certs(pki, client_ids=fc.client_ids(args.workers))
    log_path = Path(args.server_log) if args.server_log else work / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():
        log_path.unlink()
    kinds = args.kinds.split(",")
    t_start = time.monotonic()
    server = ServerProcess(pki, state, log_path, kinds, args.server_threads, args.ls_log_level)
    rss: dict[str, Any] = {"boot": server.rss()}
    print(f"server pid {server.proc.pid} on {server.ports}; log {log_path}", flush=True)
    corpora = {kind: fc.build_corpus(f"127.0.0.1:{port}", client_tls(pki, fc.NODE), kind)
               for kind, port in server.ports.items()}
    for kind, corpus in corpora.items():
        print(f"corpus {kind}: {len(corpus.scenarios)} scenarios, {dict(corpus.types())}", flush=True)

    # Warm-up: valid requests only (every scenario, compression and tail mode): imports, first
    # allocations and per-shape caches are not leaks.
    warm = fc.Fuzzer(_targets(server, pki, corpora), seed=args.seed + 1, workers=args.workers,
                     deadline_s=args.deadline, p_valid=1.0, p_hello=0.05, p_resume=0.05, p_half_close=0.0)
    warm.run(args.warmup)
    warm.close()
    requests = warm.stats.statuses.get("reply:OK", 0)
    time.sleep(1.0)
    rss["start"] = server.rss()
    objects_start = server.objects(log_path)
    print(f"warm-up: {args.warmup} valid cases ({requests} OK replies); RSS {mib(rss['start'])} MiB", flush=True)

    refs = fc.LogRefs().follow(log_path)  # short INTERNAL replies -> what the server logged
    corpora, where_p = only_scenarios(corpora, args.scenarios)
    fuzzer = fc.Fuzzer(_targets(server, pki, corpora), seed=args.seed, workers=args.workers,
                       deadline_s=args.deadline, resolver=refs, **where_p)
    stats = fuzzer.stats
    crashes: list[dict[str, Any]] = []
    samples: list[tuple[int, float]] = []
    t0, last_print = time.monotonic(), 0.0
    done = 0
    # Until that many cases ran (a case the fuzzer failed to build is not counted: its error is
    # in harness_errors), giving up after 10 % more attempts.
    while stats.cases < args.cases and done < args.cases * 1.1 + args.batch:
        n = min(args.batch, args.cases - stats.cases)
        try:
            fuzzer.run(n)
        except RuntimeError as e:  # a worker could not open a session: the server may be gone
            print(f"batch failed: {e}", flush=True)
        done += n
        if not server.alive():
            code = server.proc.returncode
            crash_file = json_path.with_name(f"{json_path.stem}_crash{len(crashes) + 1}.json")
            crash_file.parent.mkdir(parents=True, exist_ok=True)
            history = fuzzer.history()
            crash_file.write_text(json.dumps({"exit_code": code, "cases_before": done, "last_cases": history},
                                             indent=1))
            crashes.append({"exit_code": code, "after_cases": done, "file": str(crash_file)})
            print(f"CRASH: the server exited with {code} after ~{done} cases; last cases saved to {crash_file}",
                  flush=True)
            fuzzer.stop_event.set()
            fuzzer.close()
            if len(crashes) >= args.max_crashes:
                break
            next_log = log_path.with_name(f"{log_path.stem}.{len(crashes)}.log")
            server = ServerProcess(pki, state, next_log, kinds, args.server_threads, args.ls_log_level)
            restarted = fc.Fuzzer(_targets(server, pki, corpora), seed=args.seed, workers=args.workers,
                                  deadline_s=args.deadline, resolver=fc.LogRefs().follow(next_log), **where_p)
            restarted.stats, restarted.next_index = stats, fuzzer.next_index
            fuzzer = restarted
            continue
        samples.append((stats.cases, mib(server.rss())))
        if args.census_every and stats.cases // args.census_every > (stats.cases - n) // args.census_every:
            server.objects(log_path)  # gc + malloc_trim + a CENSUS line in the server log (diagnostic)
        now = time.monotonic()
        if now - last_print > args.progress or stats.cases >= args.cases:
            last_print = now
            rate = stats.cases / max(now - t0, 1e-9)
            top = ", ".join(f"{k} {v}" for k, v in stats.statuses.most_common(5))
            print(f"{stats.cases:>7} cases {rate:6.1f}/s | hangs {stats.hangs} crashes {len(crashes)} "
                  f"findings {len(stats.findings)} | RSS {samples[-1][1]} MiB | {top}", flush=True)
    fuzzer.close()  # CLOSE every worker's session
    wall = time.monotonic() - t0
    rss["after_run"] = server.rss()
    time.sleep(args.idle)
    rss["end"] = server.rss()
    objects_end = server.objects(log_path)  # diagnostic: gc.collect() + malloc_trim(0) + object counts
    rss["end_after_gc_trim"] = server.rss()
    grown = {k: objects_end.get(k, 0) - objects_start.get(k, 0) for k in set(objects_start) | set(objects_end)}
    object_growth = dict(sorted(((k, v) for k, v in grown.items() if v), key=lambda kv: -abs(kv[1]))[:25])
    alive_at_end = server.alive()
    exit_code = server.stop()
    log_text = log_path.read_text(errors="replace") if log_path.exists() else ""
    for extra in sorted(log_path.parent.glob(f"{log_path.stem}.*.log")):  # logs of restarted servers
        log_text += extra.read_text(errors="replace")
    tracebacks = sum(1 for line in log_text.splitlines() if "Traceback" in line)
    tb_summary = fc.traceback_summary(log_text)
    errors = error_summary(log_text)
    growth = 100.0 * (rss["end"] - rss["start"]) / rss["start"] if rss.get("start") else float("nan")
    mid = next((r for c, r in samples if c >= stats.cases // 10), None)  # after the first 10 % of cases
    summary = stats.to_json()
    result = {
        "bench": "fuzz",
        "config": {"cases": args.cases, "seed": args.seed, "workers": args.workers, "deadline_s": args.deadline,
                   "batch": args.batch, "warmup_cases": args.warmup, "idle_s": args.idle, "kinds": kinds,
                   "scenarios": args.scenarios,
                   "server_threads": args.server_threads, "server_log": str(log_path) if args.server_log else None},
        "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                 "platform": platform.platform()},
        "corpus": {kind: {"scenarios": len(c.scenarios), "types": dict(c.types())} for kind, c in corpora.items()},
        "wall_s": round(wall, 1), "total_s": round(time.monotonic() - t_start, 1),
        **{k: summary[k] for k in ("cases", "cases_per_s", "statuses", "outcomes", "hangs", "bad_replies",
                                   "setup_failures", "harness_errors", "scenarios", "layers")},
        "cases_per_s": round(stats.cases / wall, 1) if wall else None,
        "crashes": crashes,
        "server_alive_at_end": alive_at_end, "server_exit_code": exit_code,
        "tracebacks": tracebacks,
        "traceback_sites": dict(tb_summary.most_common()),
        "error_lines": sum(errors.values()),
        "errors_logged": dict(errors.most_common(100)),
        "live_objects_growth": object_growth,  # after gc, end minus after warm-up, by type
        "rss_mib": {k: mib(v) for k, v in rss.items()} | {
            "after_10pct_of_cases": mid, "growth_pct": round(growth, 1),
            "samples": samples[:: max(1, len(samples) // 50)]},
        "findings": summary["findings"],
    }
    bad = [f for f in summary["findings"] if f["code"] in fc.BAD_CODES]
    result["target"] = {
        "cases>=100000": stats.cases >= TARGET["cases"],
        "crashes==0": not crashes,
        "hangs==0": stats.hangs == 0,
        "tracebacks==0": tracebacks == 0,
        "no_error_lines": not errors,
        "rss_within_10pct": abs(growth) <= TARGET["rss_growth_pct"],
        "no_internal_or_unknown": not bad,
    }
    tmp.cleanup()
    return result


def only_scenarios(corpora: dict[str, fc.Corpus], prefixes: str | None
                   ) -> tuple[dict[str, fc.Corpus], dict[str, float]]:
    """``--scenarios``: the corpora cut to the scenarios whose ``where:name`` (``session:train_step``,
    ``hello:bonded``, ``resume:infer_beam``) starts with one of the comma-separated prefixes, and
    the Fuzzer's ``p_hello``/``p_resume`` so that only those kinds of cases are built."""
    if not prefixes:
        return corpora, {}
    wanted = [p.strip() for p in prefixes.split(",") if p.strip()]
    out = {kind: fc.Corpus(c.kind, [s for s in c.scenarios if f"{s.where}:{s.name}".startswith(tuple(wanted))],
                           c.hello_extra) for kind, c in corpora.items()}
    wheres = [{s.where for s in c.scenarios} for c in out.values()]
    if not all(wheres) or len({frozenset(w) for w in wheres}) != 1:
        raise SystemExit(f"--scenarios {prefixes!r} must pick scenarios of the same kinds (session, hello, "
                         f"resume) on every server: {[sorted(w) for w in wheres]}")
    where = wheres[0]
    share = {"hello": 0.08, "resume": 0.04, "session": 0.88}  # the Fuzzer's defaults
    total = sum(share[w] for w in where)
    p_hello = share["hello"] / total if "hello" in where else 0.0
    p_resume = share["resume"] / total if "resume" in where else 0.0
    if "session" not in where:  # no rounding may leave room for a session case
        p_resume = 1.0 - p_hello if p_resume else 0.0
        p_hello = p_hello if p_resume else 1.0
    return out, {"p_hello": p_hello, "p_resume": p_resume}


def error_summary(text: str) -> Counter:
    """ERROR lines of the server log, their ids and numbers blanked, counted."""
    out: Counter = Counter()
    for line in text.splitlines():
        if " ERROR " in line:
            msg = line.split("] ", 1)[-1]
            msg = re.sub(r"\b[0-9a-f]{8,}\b", "H", msg)
            out[re.sub(r"fuzz-w\d+", "fuzz-wN", msg)[:300]] += 1
    return out


def print_table(r: dict[str, Any]) -> None:
    rss = r["rss_mib"]
    rows = [
        ("cases", f"{r['cases']:,}"),
        ("cases/s", f"{r['cases_per_s']}  ({r['wall_s']} s, {r['config']['workers']} workers)"),
        ("statuses", ", ".join(f"{k} {v}" for k, v in r["statuses"].items())),
        ("outcomes", ", ".join(f"{k} {v}" for k, v in r["outcomes"].items())),
        ("crashes", str(len(r["crashes"]))),
        ("hangs", str(r["hangs"])),
        ("bad replies", str(r["bad_replies"])),
        ("fuzzer errors", str(sum(r["harness_errors"].values()))),
        ("INTERNAL/UNKNOWN", str(sum(f["count"] for f in r["findings"] if f["code"] in fc.BAD_CODES))
         + f" ({sum(1 for f in r['findings'] if f['code'] in fc.BAD_CODES)} distinct)"),
        ("tracebacks (log)", f"{r['tracebacks']} ({len(r['traceback_sites'])} sites); ERROR lines {r['error_lines']}"),
        ("RSS start/end", f"{rss['start']} -> {rss['end']} MiB ({rss['growth_pct']:+.1f} %); after 10 % of "
                          f"cases {rss['after_10pct_of_cases']} MiB, at boot {rss['boot']} MiB; end after "
                          f"gc + malloc_trim {rss.get('end_after_gc_trim')} MiB"),
        ("live objects", "growth after gc (end - after warm-up): " + (", ".join(
            f"{k} {v:+d}" for k, v in list(r["live_objects_growth"].items())[:8]) or "none")),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("target: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in r["target"].items()))
    if r["findings"]:
        print(f"\nfindings ({len(r['findings'])} distinct):")
        for f in r["findings"][:30]:
            print(f"  {f['kind']} {f['code']} x{f['count']}: {f['details'][:200]}")
            print("    " + fc.describe(f["case"]).replace("\n", "\n    "))
    if r["traceback_sites"]:
        print("\ntracebacks in the server log:")
        for site, n in list(r["traceback_sites"].items())[:30]:
            print(f"  {n:>6}  {site}")


def replay_file(args: argparse.Namespace) -> None:
    """Replay the cases of a crash file or of the findings of a result JSON against a fresh server."""
    from lightning_split.channel import client_tls, make_certs

    data = json.loads(Path(args.replay).read_text())
    cases = data.get("last_cases") or [f["case"] for f in data.get("findings", [])]
    with tempfile.TemporaryDirectory(prefix="ls-fuzz-replay-") as d:
        work = Path(d)
        make_certs(work / "pki", client_ids=fc.client_ids(max(int(c.get("worker", 0)) for c in cases) + 1))
        kinds = sorted({c["server"] for c in cases})
        server = ServerProcess(work / "pki", work / "state", work / "server.log", kinds, args.server_threads)
        try:
            tls = client_tls(work / "pki", fc.NODE)
            for kind in kinds:
                corpus = fc.build_corpus(f"127.0.0.1:{server.ports[kind]}", tls, kind)
                target = fc.Target(kind, f"127.0.0.1:{server.ports[kind]}", work / "pki", corpus,
                                   bool(fc.KINDS[kind].channel.get("checksum")))
                mine = [c for c in cases if c["server"] == kind]
                for case, events in zip(mine, fc.replay(target, mine, args.deadline), strict=True):
                    print(fc.describe(case))
                    for ev in events:
                        print(f"      -> {ev}")
                    if not server.alive():
                        print(f"  THE SERVER DIED (exit code {server.proc.returncode})")
                        return
        finally:
            server.stop()
            log = (work / "server.log").read_text(errors="replace")
            for site, n in fc.traceback_summary(log).most_common():
                print(f"traceback x{n}: {site}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=None, help="mutated cases (default 100000; --quick: 3000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="concurrent client streams (default 4; --quick: 2)")
    p.add_argument("--json", default=None,
                   help="result file (default benchmarks/results/fuzz.json; --quick: fuzz_quick.json)")
    p.add_argument("--quick", action="store_true", help="a few thousand cases")
    p.add_argument("--deadline", type=float, default=10.0, help="seconds a case may take before it is a hang")
    p.add_argument("--batch", type=int, default=None, help="cases between crash checks and RSS samples")
    p.add_argument("--warmup", type=int, default=None, help="valid cases before RSS 'start' (default 300)")
    p.add_argument("--idle", type=float, default=5.0, help="seconds idle before the final RSS")
    p.add_argument("--kinds", default=",".join(fc.KINDS), help=f"server kinds ({', '.join(fc.KINDS)})")
    p.add_argument("--scenarios", default=None,
                   help="only cases of these scenarios: comma-separated prefixes of 'where:name', e.g. "
                        "'hello:' or 'session:infer,resume:' (the warm-up runs every scenario)")
    p.add_argument("--census-every", type=int, default=0,
                   help="every this many cases, make the server collect garbage, trim its heap and log its "
                        "objects and a CENSUS line (threads, fds, RSS by mapping, sessions, streams, bonds, "
                        "budget; with LS_FUZZ_TRACEMALLOC=FRAMES set, tracemalloc's top growth)")
    p.add_argument("--server-threads", type=int, default=None, help="the server's torch threads")
    p.add_argument("--server-log", default=None, help="keep the server log here (default: a temp dir)")
    p.add_argument("--ls-log-level", default="DEBUG",
                   help="level of the server's lightning_split loggers (the root logs at INFO); at DEBUG the "
                        "log holds the traceback of every internal error")
    p.add_argument("--max-crashes", type=int, default=3, help="stop after this many crashes")
    p.add_argument("--progress", type=float, default=15.0, help="seconds between progress lines")
    p.add_argument("--replay", default=None, help="replay the cases saved in a crash file or result JSON")
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID: every thread's stack on stderr
    if args.serve:
        serve(json.loads(args.serve))
        return 0
    if args.replay:
        replay_file(args)
        return 0
    args.json = args.json or str(RESULTS / ("fuzz_quick.json" if args.quick else "fuzz.json"))
    args.cases = args.cases or (3000 if args.quick else 100_000)
    args.workers = args.workers or (2 if args.quick else 4)
    args.batch = args.batch or (250 if args.quick else 1000)
    args.warmup = args.warmup if args.warmup is not None else 300
    args.idle = 3.0 if args.quick and args.idle == 5.0 else args.idle
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("lightning_split").setLevel(logging.ERROR)  # the recording client's own notices
    import warnings

    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    result = run(args)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print_table(result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
