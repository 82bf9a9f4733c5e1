"""The server under load: many generating clients at once, with and without batching their steps.

One server (its own process) holds a Llama-architecture model's middle (every block but the first
and the last: the U-shape, the clients keep embeddings, the first and last blocks and the output
layer). N client processes (each with its own certificate, real mutual TLS, one session each)
generate at the same time; each reports its ms per generated token, and the run its aggregate
tokens/s. Every N runs twice in the same server: steps batched across sessions (``batching.py``)
and each session's steps alone (the batcher paused), so the ratio is the batching's alone.
Greedy tokens are checked equal between the two (and, for N = 1, the baseline is the solo path).

    python benchmarks/serve_load.py --quick                     # tiny Llama on CPU, 1/2/4 clients
    python benchmarks/serve_load.py --device cuda               # ~1B Llama, 1/4/16/64 clients

Targets (issue #19, GPU): with 16 clients, aggregate tokens/s >= 8x one client's, each client's
ms/token <= 2x its solo figure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    base_parser,
    environment,
    finish_args,
    json_path,
    print_table,
    split_train_step,
    write_json,
)

from lightning_split.split.build import ModelSource  # noqa: E402
from lightning_split.split.spec import SplitSpec  # noqa: E402

LLAMA = {
    # ~1.1 B parameters: Llama-3.2-1B's widths and depth, a 32k vocabulary
    "1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=32000, max_position_embeddings=4096),
    # Next to no compute (the server holds one block 64 wide): what a step costs the server beside its model
    "nano": dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=1024),
    "tiny": dict(num_hidden_layers=6, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1024, max_position_embeddings=1024),
}
QUICK = dict(model="tiny", clients=[1, 2, 4], seq=16, new_tokens=24, steps=1, train_clients=[1, 2], train_steps=3,
             train_seq=32)
FULL = dict(model="1b", clients=[1, 4, 16, 64], seq=32, new_tokens=64, steps=2, train_clients=[1, 8],
            train_steps=10, train_seq=128)


def source_for(args: Any) -> ModelSource:
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    return ModelSource("transformers:LlamaForCausalLM", {**LLAMA[args.model], "attn_implementation": "sdpa"},
                       seed=0, dtype=dtype)


def spec_for(args: Any) -> SplitSpec:
    return SplitSpec(cut=1, end=LLAMA[args.model]["num_hidden_layers"] - 1, shape="u_shape")


# -- the server process ---------------------------------------------------------------------------

def _serve(pki: str, source: dict, spec: dict, device: str, window_ms: float, max_batch: int, ready: Any,
           control: Any, stats: Any, devices: list | None = None, placement: str = "spread",
           switch_ms: float | None = None, cores: list[int] | None = None, threads: int | None = None) -> None:
    from lightning_split.channel import ChannelConfig, ChannelServer, server_tls
    from lightning_split.server.service import SplitService

    if cores:  # before gRPC's and torch's threads start: they inherit it
        os.sched_setaffinity(0, cores)
    if threads:  # several server processes or pinned cores: more would spin-wait on each other's cores
        torch.set_num_threads(threads)

    if switch_ms is not None:  # how long a thread may hold the GIL while others wait (Python's default: 5 ms)
        sys.setswitchinterval(switch_ms / 1e3)

    service = SplitService(ModelSource.from_dict(source), SplitSpec.from_dict(spec), device=device,
                           devices=devices, placement=placement, batch_window_ms=window_ms, fast_decode=True,
                           max_batch=max_batch)
    config = ChannelConfig(max_sessions=128, max_sessions_per_node=2)
    server = ChannelServer(service, "127.0.0.1:0", tls=server_tls(pki), config=config, max_workers=256)
    ready.put(server.start())
    while True:  # commands from the benchmark: batching on/off, read the stats, stop
        cmd = control.get()
        if cmd == "stop":
            break
        batchers = service.replicas.batchers()  # one per copy of the segment (--placement replicate)
        if cmd in ("on", "off"):
            for batcher in batchers:
                batcher.enabled = cmd == "on"
        # The server's CPU seconds, every thread's (Python's and gRPC's own): per token, what one
        # client's step costs the server's host; against the wall clock, the cores it keeps busy.
        total: dict[str, Any] = {"batches": 0, "rows": 0, "solo": 0, "wait_s": 0.0, "sizes": {}, "graphs": {},
                                 "cpu_s": time.process_time()}
        for b in (batcher.stats for batcher in batchers):
            for key in ("batches", "rows", "solo", "wait_s"):
                total[key] += getattr(b, key)
            for key in ("sizes", "graphs"):
                for k, v in dict(getattr(b, key)).items():
                    total[key][k] = total[key].get(k, 0) + v
        stats.put(total)
    server.stop(grace=0)


# -- a client process -----------------------------------------------------------------------------

def _client(i: int, pki: str, address: str, source: dict, spec: dict, args: dict, go: Any, out: Any) -> None:
    from lightning_split.channel import ChannelConfig, client_tls
    from lightning_split.split.connect import open_split

    if args["client_cores"]:
        os.sched_setaffinity(0, args["client_cores"])
    torch.set_num_threads(1)
    device = args["client_device"]
    try:
        split = open_split(address, f"c{i}", client_tls(pki, f"c{i}"), source=ModelSource.from_dict(source),
                           spec=SplitSpec.from_dict(spec), device=device,
                           # a server shipping the client part to many clients at once answers late
                           config=ChannelConfig(connections=1, keepalive_timeout_s=60))
        model = split.model.eval()
        g = torch.Generator().manual_seed(1000 + i)
        ids = torch.randint(3, LLAMA[args["model"]]["vocab_size"], (1, args["seq"]), generator=g).to(device)
        kw = {"max_new_tokens": args["new_tokens"], "min_new_tokens": args["new_tokens"], "do_sample": False,
              "pad_token_id": 0}
        with torch.inference_mode():
            model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up: graphs, caches
        out.put(("ready", i, None))
        trainer = None
        while True:
            cmd = go.get()
            if cmd is None:
                break
            if cmd == "train":  # a session of its own with a trainable tail (the server copies the segment)
                if trainer is None:
                    trainer = _Trainer(i, pki, address, source, spec, args)
                out.put(("done", i, trainer.run(args["train_steps"])))
                continue
            t0 = time.perf_counter()
            with torch.inference_mode():
                tokens = model.generate(ids, **kw)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            out.put(("done", i, {"seconds": time.perf_counter() - t0, "start": t0,
                                 "tokens": tokens[0, ids.shape[1]:].tolist()}))
        split.close()
        if trainer is not None:
            trainer.split.close()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which stops the run
        out.put(("error", i, f"{type(e).__name__}: {e}"))


class _Trainer:
    """A client's training session: SGD on both sides, the server's step riding on the backward."""

    def __init__(self, i: int, pki: str, address: str, source: dict, spec: dict, args: dict) -> None:
        from lightning_split.channel import ChannelConfig, client_tls
        from lightning_split.split.connect import open_split

        self.device = args["client_device"]
        tail = {"mode": "trainable", "optimizer": {"name": "SGD", "lr": 1e-3}}
        self.split = open_split(address, f"c{i}", client_tls(pki, f"c{i}"), source=ModelSource.from_dict(source),
                                spec=SplitSpec.from_dict(spec), device=self.device, tail=tail,
                                config=ChannelConfig(connections=1, keepalive_timeout_s=60))
        self.model = self.split.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(2000 + i)
        vocab = LLAMA[args["model"]]["vocab_size"]
        self.ids = torch.randint(3, vocab, (args["train_batch"], args["train_seq"]), generator=g).to(self.device)
        self.step = 0
        self.run(1)  # warm-up

    def run(self, steps: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step += 1
            loss = split_train_step(self.split, self.opt, self.step, self.ids)
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"seconds": time.perf_counter() - t0, "start": t0, "steps": steps, "loss": float(loss)}


# -- the run ------------------------------------------------------------------------------------------

class Load:
    def __init__(self, args: Any, pki: Path) -> None:
        ctx = mp.get_context("spawn")
        self.args, self.ctx = args, ctx
        source, spec = source_for(args).to_dict(), spec_for(args).to_dict()
        # One server process, or several (--server-processes), each with its own copy of the segment and
        # its own GIL; client i is served by process i mod P, as an operator would spread them.
        self.ready, self.servers = ctx.Queue(), []
        # --server-cores N: the server process(es) on cores 0..N-1 and the clients on the rest, so that
        # neither takes the other's CPU time (on one host the clients stand in for other machines)
        cores = sorted(os.sched_getaffinity(0))
        server_cores = cores[: args.server_cores] if args.server_cores else None
        client_cores = cores[args.server_cores:] if args.server_cores else None
        # torch's CPU threads per server process: its share of the server's cores (one process: torch's default)
        server_threads = (max(1, len(server_cores or cores) // args.server_processes)
                          if server_cores or args.server_processes > 1 else None)
        for _ in range(args.server_processes):
            control, stats = ctx.Queue(), ctx.Queue()
            process = ctx.Process(target=_serve, daemon=True, args=(
                str(pki), source, spec, args.device, args.window_ms, max(args.clients), self.ready, control, stats,
                args.server_devices, args.placement, args.server_switch_ms, server_cores,
                server_threads))
            process.start()
            self.servers.append((process, control, stats))
        addresses = [f"127.0.0.1:{self.ready.get(timeout=600)}" for _ in self.servers]
        self.out = ctx.Queue()
        self.gos: list[Any] = []
        self.clients: list[Any] = []
        client_args = {"client_device": args.client_device, "model": args.model, "seq": args.seq,
                       "new_tokens": args.new_tokens, "train_steps": args.train_steps,
                       "train_batch": args.train_batch, "train_seq": args.train_seq, "client_cores": client_cores}
        for i in range(max(args.clients)):
            go = ctx.Queue()
            p = ctx.Process(target=_client, daemon=True,
                            args=(i, str(pki), addresses[i % len(addresses)], source, spec, client_args, go,
                                  self.out))
            p.start()
            self.gos.append(go)
            self.clients.append(p)
            if len(self.clients) % args.connect_wave == 0:  # each LOAD ships the client's part: a few at a time
                for _ in range(args.connect_wave):
                    self._expect("ready")
        for _ in range(len(self.clients) % args.connect_wave):
            self._expect("ready")

    def _expect(self, kind: str) -> tuple[int, Any]:
        while True:
            try:
                got, i, payload = self.out.get(timeout=5)
            except queue.Empty:
                if not all(p.is_alive() for p in [*self.clients, *(s[0] for s in self.servers)]):
                    raise RuntimeError("a process of the load run died") from None
                continue
            if got == "error":
                raise RuntimeError(f"client {i}: {payload}")
            if got == kind:
                return i, payload

    def server_stats(self, cmd: str = "read") -> dict[str, Any]:
        """Every server process's figures, summed."""
        for _, control, _ in self.servers:
            control.put(cmd)
        total: dict[str, Any] = {}
        for _, _, stats in self.servers:
            for key, value in stats.get(timeout=60).items():
                if isinstance(value, dict):
                    merged = total.setdefault(key, {})
                    for k, v in value.items():
                        merged[k] = merged.get(k, 0) + v
                else:
                    total[key] = total.get(key, 0) + value
        return total

    def round(self, n: int, batching: bool) -> dict[str, Any]:
        """n clients generate at once; the round's figures."""
        before = self.server_stats("on" if batching else "off")
        t0 = time.perf_counter()
        for go in self.gos[:n]:
            go.put("go")
        results = dict(self._expect("done") for _ in range(n))
        wall = time.perf_counter() - t0
        after = self.server_stats()
        per_token = [1e3 * r["seconds"] / self.args.new_tokens for r in results.values()]
        batches = after["batches"] - before["batches"]
        server_cpu = after["cpu_s"] - before["cpu_s"]
        return {"clients": n, "batching": batching, "wall_s": wall,
                "server_cpu_ms_per_token": 1e3 * server_cpu / (n * self.args.new_tokens),
                "server_cores_busy": server_cpu / wall,
                "aggregate_tokens_per_s": n * self.args.new_tokens / wall,
                "ms_per_token_median": statistics.median(per_token), "ms_per_token_max": max(per_token),
                "batches": batches,
                "mean_batch": (after["rows"] - before["rows"]) / batches if batches else 0.0,
                "queue_wait_ms": (1e3 * (after["wait_s"] - before["wait_s"]) / max(after["rows"] - before["rows"], 1)),
                "pool": {k: v - before["graphs"].get(k, 0) for k, v in after["graphs"].items()},
                "tokens": {i: r["tokens"] for i, r in results.items()}}

    def train_round(self, n: int) -> dict[str, Any]:
        """n clients train their own trainable tails at once; the round's figures."""
        t0 = time.perf_counter()
        for go in self.gos[:n]:
            go.put("train")
        results = dict(self._expect("done") for _ in range(n))
        wall = time.perf_counter() - t0
        steps = self.args.train_steps
        per_step = [1e3 * r["seconds"] / steps for r in results.values()]
        return {"clients": n, "training": True, "wall_s": wall, "aggregate_steps_per_s": n * steps / wall,
                "ms_per_step_median": statistics.median(per_step), "ms_per_step_max": max(per_step)}

    def close(self) -> None:
        for go in self.gos:
            go.put(None)
        for _, control, _ in self.servers:
            control.put("stop")
        for p in [*self.clients, *(s[0] for s in self.servers)]:
            p.join(30)
            if p.is_alive():
                p.terminate()


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__, models=list(LLAMA))
    p.add_argument("--clients", type=int, nargs="+", default=None, help="concurrent clients per round")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--window-ms", type=float, default=None, help="the server's batch window (default 2; CPU 20)")
    p.add_argument("--train-clients", type=int, nargs="*", default=None,
                   help="training rows: this many clients with trainable tails at once (default 1 8; none: skip)")
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seq", type=int, default=None)
    p.add_argument("--connect-wave", type=int, default=8, help="clients connecting (and loading) at once")
    p.add_argument("--client-device", default=None, help="where the clients' parts run (default: --device)")
    p.add_argument("--server-devices", type=lambda d: int(d) if d.isdigit() else d, nargs="+", default=None,
                   help="GPUs of the server's segment (SplitService(devices=...): 0 1, or names); default: --device")
    p.add_argument("--placement", choices=["spread", "replicate"], default="spread",
                   help="with --server-devices: blocks spread over the GPUs, or a whole copy on each")
    p.add_argument("--server-switch-ms", type=float, default=None,
                   help="the server process's GIL switch interval (sys.setswitchinterval), in ms: whether its "
                        "sessions' threads wait on each other for the GIL (default: Python's 5 ms)")
    p.add_argument("--server-processes", type=int, default=1,
                   help="server processes, each with its own copy of the segment and its own GIL; client i "
                        "connects to process i mod P (default 1)")
    p.add_argument("--server-cores", type=int, default=None,
                   help="pin the server process(es) to this many cores and the clients to the others")
    args = finish_args(p.parse_args(argv), QUICK, FULL)
    if args.server_cores is not None and not 0 < args.server_cores < len(os.sched_getaffinity(0)):
        p.error(f"--server-cores must leave the clients a core: 1..{len(os.sched_getaffinity(0)) - 1}")
    args.client_device = args.client_device or args.device
    args.clients = sorted({1, *args.clients})  # one client alone: every ratio's baseline
    if args.window_ms is None:
        args.window_ms = 2.0 if torch.device(args.device).type == "cuda" else 20.0
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    print(f"serve_load: Llama {args.model}, server holds blocks 1..{LLAMA[args.model]['num_hidden_layers'] - 2}, "
          f"prompt {args.seq}, {args.new_tokens} new tokens, clients {args.clients}, {args.device} {args.dtype}, "
          f"clients on {args.client_device}, window {args.window_ms} ms, {args.server_processes} server process(es)"
          + (f" on {args.server_cores} cores of their own" if args.server_cores else ""),
          flush=True)
    with tempfile.TemporaryDirectory(prefix="ls-load-pki-") as d:
        from lightning_split.channel import make_certs

        make_certs(d, client_ids=[f"c{i}" for i in range(max(args.clients))])
        load = Load(args, Path(d))
        try:
            print(f"  {max(args.clients)} clients connected ({time.perf_counter() - t_start:.0f} s)", flush=True)
            for n in args.clients:
                for batching in (False, True):
                    for _ in range(args.steps):  # the last repeat is kept (the first may capture graphs)
                        row = load.round(n, batching)
                    rows.append(row)
                    print(f"  {n:3d} clients, batching {'on ' if batching else 'off'}: "
                          f"{row['aggregate_tokens_per_s']:8.1f} tokens/s, {row['ms_per_token_median']:.2f} ms/token "
                          f"(max {row['ms_per_token_max']:.2f}), mean batch {row['mean_batch']:.1f}, "
                          f"server CPU {row['server_cpu_ms_per_token']:.2f} ms/token", flush=True)
                    write_json(json_path(args, "serve_load"), args, {"rows": rows, "partial": True})
            for n in args.train_clients:
                row = load.train_round(n)
                rows.append(row)
                print(f"  {n:3d} clients training: {row['aggregate_steps_per_s']:.2f} steps/s in all, "
                      f"{row['ms_per_step_median']:.1f} ms/step (max {row['ms_per_step_max']:.1f})", flush=True)
                write_json(json_path(args, "serve_load"), args, {"rows": rows, "partial": True})
        finally:
            load.close()
    return report(args, rows, t_start)


def report(args: Any, rows: list[dict[str, Any]], t_start: float) -> int:
    training = [r for r in rows if r.get("training")]
    rows = [r for r in rows if not r.get("training")]
    solo = next(r for r in rows if r["clients"] == 1 and not r["batching"])
    by = {(r["clients"], r["batching"]): r for r in rows}
    table, targets, same = [], [], True
    for r in rows:
        r["x_solo_aggregate"] = r["aggregate_tokens_per_s"] / solo["aggregate_tokens_per_s"]
        r["x_solo_ms_per_token"] = r["ms_per_token_median"] / solo["ms_per_token_median"]
        unbatched = by[(r["clients"], False)]
        r["tokens_equal_unbatched"] = r["tokens"] == unbatched["tokens"]
        same &= r["tokens_equal_unbatched"]
        table.append([r["clients"], "on" if r["batching"] else "off", r["aggregate_tokens_per_s"],
                      r["x_solo_aggregate"], r["ms_per_token_median"], r["x_solo_ms_per_token"],
                      r["mean_batch"], r["queue_wait_ms"], r["server_cpu_ms_per_token"], r["server_cores_busy"],
                      "yes" if r["tokens_equal_unbatched"] else "NO"])
        if r["clients"] == 16 and r["batching"]:
            targets += [{"what": "16 clients: aggregate tokens/s >= 8x one client's", "value": r["x_solo_aggregate"],
                         "met": r["x_solo_aggregate"] >= 8},
                        {"what": "16 clients: ms/token <= 2x solo", "value": r["x_solo_ms_per_token"],
                         "met": r["x_solo_ms_per_token"] <= 2}]
    print_table(f"serve_load: Llama {args.model}, {args.new_tokens} new tokens per client, {args.device} {args.dtype}",
                ["clients", "batching", "tokens/s", "x solo", "ms/token", "x solo", "mean batch", "queue ms",
                 "server CPU ms/token", "server cores", "tokens = unbatched"], table)
    if training:
        one = next((r for r in training if r["clients"] == 1), training[0])
        for r in training:
            r["x_one_client"] = r["aggregate_steps_per_s"] / one["aggregate_steps_per_s"]
        print_table(f"training, trainable tails, batch {args.train_batch} x {args.train_seq}, {args.train_steps} steps",
                    ["clients", "steps/s in all", "x one client", "ms/step", "max ms/step"],
                    [[r["clients"], r["aggregate_steps_per_s"], r["x_one_client"], r["ms_per_step_median"],
                      r["ms_per_step_max"]] for r in training])
    for t in targets:
        print(f"target: {t['what']}: {t['value']:.2f} {'MET' if t['met'] else 'MISSED'}")
    rows += training
    out = write_json(json_path(args, "serve_load"), args, {"environment": environment(args.device), "rows": rows,
                                                          "targets": targets,
                                                          "seconds": time.perf_counter() - t_start})
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0 if same else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
