"""Does the server give memory back when its sessions end?

A split server (tiny GPT-2 by default, two-part, trainable tails) runs in its own process. Sixteen
clients each open a session and run wide training forwards (their activations stay on the server
until the backward that never comes), then all close. The server's RSS is read at start, at the
peak and a few seconds after the last session closed, with the server's default allocator settings
(2 malloc arenas, heap trimmed after sessions end) and with ``MALLOC_ARENA_MAX`` unset and the cap
turned off (``LS_NO_ARENA_CAP=1``: glibc's default of 8 arenas per core).

    python benchmarks/session_rss.py            # ~1 minute on 2 cores; JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_split.channel import ChannelConfig, client_tls, make_certs  # noqa: E402
from lightning_split.split.connect import open_split  # noqa: E402
from lightning_split.split.spec import SplitSpec  # noqa: E402
from lightning_split.wire import MessageType  # noqa: E402
from tests.split_cases import GPT2  # noqa: E402

SERVE = textwrap.dedent("""
    import os, sys, threading
    import lightning_split.channel.server as srv
    if os.environ.get("LS_NO_ARENA_CAP"):
        srv.limit_malloc_arenas = lambda *a, **k: False
    from lightning_split.channel import ChannelConfig, ChannelServer, server_tls
    from lightning_split.server.service import SplitService
    from lightning_split.split.spec import SplitSpec
    from tests.split_cases import GPT2
    service = SplitService(GPT2, SplitSpec(cut=1, shape="two_part"))
    server = ChannelServer(service, "127.0.0.1:0", tls=server_tls(sys.argv[1]), config=ChannelConfig())
    print(server.start(), flush=True)
    threading.Event().wait()
""")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(cap: bool, clients: int, batch: int, forwards: int, pki: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)} | ({} if cap else {"LS_NO_ARENA_CAP": "1"})
    env.pop("MALLOC_ARENA_MAX", None)
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(pki)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        port = int(proc.stdout.readline())
        time.sleep(1.0)
        start, peak = rss_mib(proc.pid), 0.0
        spec = SplitSpec(cut=1, shape="two_part")
        nodes = ["alice" if k % 2 else "bob" for k in range(clients)]  # 8 each: their caps
        splits = [open_split(f"127.0.0.1:{port}", node, client_tls(pki, node), source=GPT2, spec=spec,
                             tail={"mode": "trainable"}, config=ChannelConfig(connections=1)) for node in nodes]

        def wide(split: object, k: int) -> None:
            hidden = torch.randn(batch, 64, GPT2.config["n_embd"], generator=torch.Generator().manual_seed(k))
            for i in range(forwards):  # graphs kept: no backward ever comes
                split.client.request(MessageType.FORWARD, {"id": i + 1, "hidden": hidden, "result": "logits"})

        threads = [threading.Thread(target=wide, args=(s, k)) for k, s in enumerate(splits)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, rss_mib(proc.pid))
            time.sleep(0.05)
        peak = max(peak, rss_mib(proc.pid))
        for s in splits:
            s.close()
        time.sleep(7.0)  # the reaper trims the heap within its interval after sessions end
        end = rss_mib(proc.pid)
        return {"arena_cap": cap, "start_mib": round(start, 1), "peak_mib": round(peak, 1), "end_mib": round(end, 1),
                "kept_of_growth_pct": round(100 * (end - start) / max(peak - start, 1e-9), 1)}
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--forwards", type=int, default=8)
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/session_rss_cpu.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_certs(tmp, client_ids=["alice", "bob"])
        rows = [run(cap, args.clients, args.batch, args.forwards, Path(tmp)) for cap in (True, False)]
    print(f"{args.clients} sessions, {args.forwards} kept forwards of batch {args.batch} x 64 each, then all closed")
    print(f"{'allocator':<22}{'start MiB':>10}{'peak MiB':>10}{'end MiB':>10}{'growth kept':>13}")
    for r in rows:
        name = "2 arenas (default)" if r["arena_cap"] else "glibc default arenas"
        print(f"{name:<22}{r['start_mib']:>10}{r['peak_mib']:>10}{r['end_mib']:>10}{r['kept_of_growth_pct']:>12}%")
    Path(args.json).write_text(json.dumps({"bench": "session_rss", "config": vars(args), "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
