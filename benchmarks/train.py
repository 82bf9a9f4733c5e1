"""Training steps/s of a GPT-2: local vs our split (mutual-TLS gRPC) vs a hand-built torch.distributed split.

    python benchmarks/train.py --quick                                  # tiny GPT-2 on CPU, < 90 s
    python benchmarks/train.py --model small --device cuda              # bf16 autocast by default on CUDA
    python benchmarks/train.py --model medium --device cuda --batch 8 --seq 512 --steps 30
    python benchmarks/train.py --quick --link 100mbit,20 --also-bf16-wire   # root: across an emulated link

Rows (same model source, seed, batches and AdamW everywhere; dropout off):

* local:      the whole GPT2LMHeadModel in this process: forward + backward + AdamW step.
* ours:       ``open_split`` against a SplitService (``two_part``, tail mode ``trainable``: the server
              steps its own AdamW) behind a mutual-TLS ChannelServer in another process; per step
              ``model(input_ids=ids, labels=ids).loss.backward()`` with the server's optimizer step
              riding on the last backward, then the client's step (what SplitStrategy does without
              clipping); micro-batches in flight as the library chooses
              (``--micro-batches`` to force a number). The loss is the server's only result, so the
              server backpropagates each micro-batch with its forward (``--also-unfused``: a row
              with a separate BACKWARD round trip per micro-batch instead).
* hand-built: what a PyTorch user writes (``hand_built.py``): two processes, gloo over TCP, no TLS,
              no auth; rank 0 embeddings + blocks[:cut], rank 1 the rest + loss + its own AdamW;
              labels and activation out, its gradient back, through host buffers allocated once
              (pinned on CUDA); fp32 on the wire like ours (``--also-bf16-wire``: a bf16 row of each).
* lightning local / lightning ours (unless --no-lightning): ``Trainer.fit`` of
  ``examples.modules.CausalLM``, the second with ``strategy=SplitStrategy(...)``.

``--link RATE[,RTT_MS]`` (root): the server side (our server, the hand-built rank 1) runs across an
emulated link (``link.py``: its own network namespace, tbf each way, RTT added per packet); the
link as configured and as measured with raw TCP goes into the table's title and the JSON.

Steps/s = 1 / median step time after warm-up (CUDA synchronised around every step). The transport
breakdown of ``ours`` comes from ``client.stats`` and the server's handler time; the codec row is
an offline estimate (encode + decode of one step's real messages, device copies included).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hand_built  # noqa: E402
from _common import (  # noqa: E402
    SplitServer,
    autocast,
    base_parser,
    channel_rtt_ms,
    codec_seconds,
    finish_args,
    json_path,
    median,
    model_source,
    pki_dir,
    print_table,
    random_batches,
    record_one_step,
    split_train_step,
    step_timeline,
    sync,
    timed,
    write_json,
)
from link import Link, LinkError, enter_netns  # noqa: E402

from lightning_split.channel import ChannelConfig, client_tls  # noqa: E402
from lightning_split.split.build import ModelSource, build_model  # noqa: E402
from lightning_split.split.spec import SplitSpec  # noqa: E402
from lightning_split.wire import CompressionConfig  # noqa: E402

LR = 1e-4
QUICK = dict(model="tiny", batch=4, seq=64, steps=20, warmup=3)
FULL = dict(model="small", batch=8, seq=512, steps=30, warmup=5)
TARGETS = {"small": 0.9, "medium": 0.95}  # ours / local steps/s, GPU runs


@dataclass
class Run:
    name: str
    times: list[float]
    losses: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        return 1.0 / median(self.times)

    def as_dict(self) -> dict[str, Any]:
        return {"steps_per_s": self.steps_per_s, "median_step_ms": 1e3 * median(self.times),
                "step_ms": [1e3 * t for t in self.times], "losses": self.losses, **self.extra}


# -- local -------------------------------------------------------------------------------------------

def run_local(args: Any, source: ModelSource, batches: list[torch.Tensor]) -> Run:
    model = build_model(source, device=args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(ids: torch.Tensor) -> torch.Tensor:
        with autocast(args.device, args.dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    times, losses = [], []
    for ids in batches:
        dt, loss = timed(lambda ids=ids: step(ids), args.device)
        times.append(dt)
        losses.append(float(loss))
    return Run("local", times[args.warmup:], losses)


# -- ours --------------------------------------------------------------------------------------------

def run_ours(args: Any, server: SplitServer, source: ModelSource, spec: SplitSpec,
             batches: list[torch.Tensor], micro_batches: int | None = None, name: str = "ours",
             lossy: str = "none", connections: int | None = None, fuse: bool = True,
             train_graphs: bool = True, ramp: bool | None = None) -> Run:
    tail = {"mode": "trainable", "optimizer": {"name": "AdamW", "lr": LR}, "train_graphs": train_graphs}
    wire = CompressionConfig(lossy=lossy)
    config = ChannelConfig(client_to_server=wire, server_to_client=wire,
                           connections=connections or args.connections)
    split = server.connect(source, spec, args.device, tail, micro_batches=micro_batches, config=config)
    split.runner.fuse_loss_backward = fuse
    if ramp is not None:
        split.runner.ramp_micro_batches = ramp
    try:
        model, client = split.model.train(), split.client
        opt = torch.optim.AdamW(model.parameters(), lr=LR)

        def step(i: int, ids: torch.Tensor) -> torch.Tensor:
            return split_train_step(split, opt, i, ids, lambda: autocast(args.device, args.dtype))

        times, losses = [], []
        profile = profile_if_asked("LS_CLIENT_PROFILE", name)
        for i, ids in enumerate(batches):
            if i == args.warmup:
                stats0, busy0 = client.stats.snapshot(), server.busy()
                profile.enable()
            dt, loss = timed(lambda i=i, ids=ids: step(i, ids), args.device)
            times.append(dt)
            losses.append(float(loss))
        profile.disable()
        delta, busy1 = client.stats - stats0, server.busy()
        n = len(batches) - args.warmup
        messages = record_one_step(split, lambda: step(len(batches), batches[0]))
        extra = {
            "round_trips_per_step": delta.messages / n,
            "sent_MB_per_step": delta.bytes_sent / n / 1e6,
            "received_MB_per_step": delta.bytes_received / n / 1e6,
            "mean_rtt_ms": 1e3 * delta.mean_rtt_s,
            "rtt_ms_per_step": 1e3 * delta.total_rtt_s / n,
            "server_handler_ms_per_step": 1e3 * (busy1[0] - busy0[0]) / n,
            "codec_ms_per_step_est": 1e3 * codec_seconds(messages, args.device),
            "logits_MB_per_step": sum(rep["logits"].nbytes for _, _, rep in messages
                                      if isinstance(rep, dict) and "logits" in rep) / 1e6,
            "bare_rtt_ms": channel_rtt_ms(split, 30),
            "timeline": step_timeline(split, server, lambda: step(len(batches) + 1, batches[1]), args.device),
        }
        return Run(name, times[args.warmup:], losses, extra)
    finally:
        split.close()


class _NoProfile:
    def enable(self) -> None: ...
    def disable(self) -> None: ...


class _DumpingProfile:
    def __init__(self, path: str) -> None:
        import cProfile

        self.path, self.prof = path, cProfile.Profile()

    def enable(self) -> None:
        self.prof.enable()

    def disable(self) -> None:
        self.prof.disable()
        self.prof.dump_stats(self.path)


def profile_if_asked(variable: str, name: str) -> Any:
    """``variable``=path: cProfile the client's timed steps into path.<row name> (see _common's
    LS_SERVER_PROFILE for the server side)."""
    import os

    path = os.environ.get(variable)
    if not path:
        return _NoProfile()
    return _DumpingProfile(f"{path}.{name.replace(' ', '_')}")


# -- hand-built (hand_built.py) and the server across a link ------------------------------------------

def run_hand_built(args: Any, source: ModelSource, link: Link | None, wire: str = "fp32",
                   name: str = "hand-built") -> Run:
    keys = ("device", "server_device", "dtype", "cut", "batch", "seq", "steps", "warmup")
    times, losses = hand_built.run({**{k: getattr(args, k) for k in keys}, "wire": wire}, source, link)
    return Run(name, times[args.warmup:], losses, {"wire": wire})


def _serve_in_netns(netns: str, host: str, *args: Any) -> None:
    """_common._serve, from the link's server namespace and bound to the server's address there."""
    import _common

    enter_netns(netns)
    channel_server = _common.ChannelServer
    _common.ChannelServer = lambda service, _address, **kw: channel_server(service, f"{host}:0", **kw)
    _common._serve(*args)


class LinkedServer(SplitServer):
    """A SplitServer whose process serves across ``link`` (clients dial ``address``, TLS name ``server_name``)."""

    def __init__(self, link: Link, pki: Path, source: ModelSource, spec: SplitSpec, device: str) -> None:
        import _common

        self.link, serve = link, _common._serve
        _common._serve = functools.partial(_serve_in_netns, link.server_ns_path, link.server_host)
        try:  # SplitServer spawns _common._serve: this one, for this server only
            super().__init__(pki, source, spec, device)
        finally:
            _common._serve = serve

    @property
    def address(self) -> str:
        return self.link.client_addr(int(super().address.rsplit(":", 1)[1]))

    @property
    def server_name(self) -> str:
        return self.link.server_name

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        return super().connect(*args, server_name_override=self.link.server_name, **kwargs)


# -- Lightning ---------------------------------------------------------------------------------------

def run_lightning(args: Any, source: ModelSource, batches: list[torch.Tensor],
                  server: SplitServer | None = None, spec: SplitSpec | None = None) -> Run:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_split import SplitStrategy
    from lightning_split.examples.modules import CausalLM

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, *a: Any) -> None:
            sync(args.device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *a: Any) -> None:
            sync(args.device)
            self.times.append(time.perf_counter() - self.t0)
            self.losses.append(float(outputs["loss"]))

    timer = StepTimer()
    if server is None:
        module = CausalLM(build_model(source, args.device), lr=LR, optimizer="AdamW")
        strategy, name = "auto", "local"
    else:
        module, name = CausalLM(lr=LR, optimizer="AdamW"), "ours"
        strategy = SplitStrategy(address=server.address, node_id="bench", tls=client_tls(server.pki, "bench"),
                                 source=source, spec=spec, tail="trainable", device=args.device,
                                 log_transport=False, micro_batches=args.micro_batches,
                                 server_name_override=getattr(server, "server_name", None))
    data = torch.utils.data.DataLoader([ids.cpu() for ids in batches], batch_size=None)
    trainer = L.Trainer(
        max_steps=len(batches), accelerator=torch.device(args.device).type, devices=1, strategy=strategy,
        precision="bf16-mixed" if args.dtype == "bf16" else "32-true", logger=False, callbacks=[timer],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    if server is not None:
        strategy.close()
    return Run(f"lightning {name}", timer.times[args.warmup:], timer.losses)


def print_breakdown(ours: Run) -> None:
    x, step_ms = ours.extra, 1e3 * median(ours.times)
    # One FORWARD and one BACKWARD (carrying the server's step): the round trips follow one another. With
    # micro-batches in flight they overlap, and their sum is no longer a share of the step.
    serial = x["round_trips_per_step"] <= 3
    na = "n/a (overlapping)"
    print_table(
        "ours, per training step (transport from client.stats; handler time measured in the server process)",
        ["quantity", "value"],
        [["step (ms)", step_ms],
         ["client, outside round trips (ms)", step_ms - x["rtt_ms_per_step"] if serial else na],
         ["round trips, summed (ms)", x["rtt_ms_per_step"]],
         ["  server handler compute (ms)", x["server_handler_ms_per_step"]],
         ["  channel: round trips - handler (ms)",
          x["rtt_ms_per_step"] - x["server_handler_ms_per_step"] if serial else na],
         ["codec + device copies, all messages, est. (ms)", x["codec_ms_per_step_est"]],
         ["round trips per step", x["round_trips_per_step"]],
         ["mean round trip (ms)", x["mean_rtt_ms"]],
         ["bare round trip, CACHE info (ms)", x["bare_rtt_ms"]],
         ["client -> server (MB/step)", x["sent_MB_per_step"]],
         ["server -> client (MB/step)", x["received_MB_per_step"]],
         ["  of which logits, unused by loss.backward (MB/step)", x["logits_MB_per_step"]]],
    )
    line = x["timeline"]
    print_table(f"one step's requests, ms from its start (step ended at {line['step_end']} ms); handler start/end: "
                "the server's host clock (its GPU work may still run); busy: its GPU time (CPU: wall time)",
                ["request", "submitted", "handler start", "handler end", "handler busy", "reply in"],
                [[r["type"], r["submit"], r.get("handler_start", "-"), r.get("handler_end", "-"),
                  r.get("handler_busy_ms", "-"), r.get("reply", "-")] for r in line["requests"]])


# -- main --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--no-lightning", action="store_true", help="skip the two Lightning Trainer rows")
    p.add_argument("--server-device", default=None,
                   help="the server's (and the hand-built rank 1's) device, e.g. cuda:1 (default: --device's)")
    p.add_argument("--no-hand-built", action="store_true")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="ours: micro-batches in flight per step (default: the library's automatic choice)")
    p.add_argument("--connections", type=int, default=None,
                   help="ours: connections each stream is bonded over (default: the library's, by the host's cores)")
    p.add_argument("--also-connections", type=int, nargs="*", default=[],
                   help="extra 'ours conn=K' rows with the stream bonded over K connections")
    p.add_argument("--also-bf16-wire", action="store_true",
                   help="extra rows with bf16 on the wire both ways, ours (lossy bf16 compression) and "
                        "hand-built (halves the bytes; not exact)")
    p.add_argument("--link", default=None, metavar="RATE[,RTT_MS]",
                   help="run the server side across an emulated link (link.py, root only), e.g. 100mbit,20")
    p.add_argument("--link-mode", choices=("tun", "loopback-ns"), default="tun",
                   help="link.py's mode: tun (rate each way + RTT) or loopback-ns (one shaped loopback, no RTT)")
    p.add_argument("--also-micro-batches", type=int, nargs="*", default=[],
                   help="extra 'ours mb=N' rows with these micro-batch counts (same server, same run)")
    p.add_argument("--also-ramped", type=int, nargs="*", default=[],
                   help="extra 'ours ramped mb=N' rows: N micro-batches, the first and last half the size")
    p.add_argument("--also-unfused", action="store_true",
                   help="an extra row whose server waits for a BACKWARD per micro-batch (two round trips)")
    p.add_argument("--also-eager-server", action="store_true",
                   help="an extra row whose server runs every micro-batch eagerly (no CUDA graphs)")
    args = finish_args(p.parse_args(argv), QUICK, FULL)
    args.server_device = args.server_device or args.device
    t_start = time.perf_counter()
    source = model_source(args.model, "fp32")  # fp32 master weights; bf16 is autocast
    spec = SplitSpec(cut=args.cut, shape="two_part")
    vocab = source.config["vocab_size"]
    batches = random_batches(args.warmup + args.steps, args.batch, args.seq, vocab, args.device)
    with contextlib.ExitStack() as stack:
        link = None
        if args.link:
            rate, _, rtt = args.link.partition(",")
            try:
                link = stack.enter_context(Link(rate, float(rtt or 0), args.link_mode))
            except LinkError as e:
                print(f"train: --link: {e}", file=sys.stderr)
                return 2
            link.enter_client()  # loopback-ns: this process and what it starts, inside the shaped namespace
            link.measure()
        return _main(args, link, t_start, source, spec, batches)


def _main(args: Any, link: Link | None, t_start: float, source: ModelSource, spec: SplitSpec,
          batches: list[torch.Tensor]) -> int:
    print(f"train: GPT-2 {args.model} ({source.config['n_layer']} x {source.config['n_embd']}), "
          f"batch {args.batch} x seq {args.seq}, cut {args.cut}, {args.device} {args.dtype} "
          f"(server: {args.server_device}), "
          f"{args.steps} steps after {args.warmup} warm-up, "
          f"{ChannelConfig(connections=args.connections).wanted_connections()} connection(s)", flush=True)
    where = ""
    if link is not None:
        m = link.measured
        said = (f"{link}, measured {m['c2s_mbit_s']:.0f}/{m['s2c_mbit_s']:.0f} Mbit/s c->s/s->c, "
                f"RTT {m['rtt_ms']:.1f} ms")
        where = f"; link {said}"
        print(f"  server side across the link: {said}", flush=True)
    server_cls = functools.partial(LinkedServer, link) if link is not None else SplitServer

    runs: list[Run] = []
    with pki_dir() as pki, server_cls(pki, source, spec, args.server_device) as server:
        runs.append(run_local(args, source, batches))
        print(f"  local      {runs[-1].steps_per_s:8.2f} steps/s", flush=True)
        runs.append(run_ours(args, server, source, spec, batches, args.micro_batches))
        print(f"  ours       {runs[-1].steps_per_s:8.2f} steps/s", flush=True)
        for n in args.also_micro_batches:
            runs.append(run_ours(args, server, source, spec, batches, n, f"ours mb={n}"))
            print(f"  ours mb={n:<3d}{runs[-1].steps_per_s:8.2f} steps/s", flush=True)
        for n in args.also_ramped:
            runs.append(run_ours(args, server, source, spec, batches, n, f"ours ramped mb={n}", ramp=True))
            print(f"  ours ramped mb={n:<3d}{runs[-1].steps_per_s:8.2f} steps/s", flush=True)
        for k in args.also_connections:
            runs.append(run_ours(args, server, source, spec, batches, args.micro_batches, f"ours conn={k}",
                                 connections=k))
            print(f"  ours conn={k:<2d}{runs[-1].steps_per_s:8.2f} steps/s", flush=True)
        if args.also_unfused:
            runs.append(run_ours(args, server, source, spec, batches, args.micro_batches, "ours unfused", fuse=False))
            print(f"  ours unfused {runs[-1].steps_per_s:8.2f} steps/s", flush=True)
        if args.also_eager_server:
            runs.append(run_ours(args, server, source, spec, batches, args.micro_batches, "ours eager server",
                                 train_graphs=False))
            print(f"  ours eager server {runs[-1].steps_per_s:8.2f} steps/s", flush=True)
        if args.also_bf16_wire:
            runs.append(run_ours(args, server, source, spec, batches, args.micro_batches, "ours bf16 wire", "bf16"))
            print(f"  ours bf16 wire {runs[-1].steps_per_s:8.2f} steps/s", flush=True)
        if not args.no_lightning:
            runs.append(run_lightning(args, source, batches))
            runs.append(run_lightning(args, source, batches, server, spec))
            print(f"  lightning  {runs[-2].steps_per_s:8.2f} local, {runs[-1].steps_per_s:.2f} ours steps/s",
                  flush=True)
    if not args.no_hand_built:
        runs.append(run_hand_built(args, source, link))
        print(f"  hand-built {runs[-1].steps_per_s:8.2f} steps/s", flush=True)
        if args.also_bf16_wire:
            runs.append(run_hand_built(args, source, link, "bf16", "hand-built bf16 wire"))
            print(f"  hand-built bf16 wire {runs[-1].steps_per_s:8.2f} steps/s", flush=True)

    by = {r.name: r for r in runs}
    local = by["local"]
    print_table(
        f"training, GPT-2 {args.model}, batch {args.batch} x {args.seq}, {args.device} {args.dtype} "
        f"(median of {args.steps} steps){where}",
        ["variant", "steps/s", "ms/step", "best ms", "x local", "loss[0]", "loss[-1]"],
        [[r.name, r.steps_per_s, 1e3 * median(r.times), 1e3 * min(r.times), r.steps_per_s / local.steps_per_s,
          f"{r.losses[0]:.4f}", f"{r.losses[-1]:.4f}"] for r in runs],
    )
    ratios = {"ours/local": by["ours"].steps_per_s / local.steps_per_s}
    if "hand-built" in by:
        ratios["hand-built/local"] = by["hand-built"].steps_per_s / local.steps_per_s
        ratios["ours/hand-built"] = by["ours"].steps_per_s / by["hand-built"].steps_per_s
    if "hand-built bf16 wire" in by and "ours bf16 wire" in by:
        ratios["ours/hand-built, bf16 wire"] = by["ours bf16 wire"].steps_per_s / by["hand-built bf16 wire"].steps_per_s
    if "lightning ours" in by:
        ratios["lightning ours/local"] = by["lightning ours"].steps_per_s / by["lightning local"].steps_per_s
    print("\nratios (steps/s): " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))

    print_breakdown(by["ours"])
    if torch.device(args.device).type == "cuda":
        target = TARGETS.get(args.model)
        if target is not None:
            ok = ratios["ours/local"] >= target and ratios.get("ours/hand-built", 1.0) > 1.0
            print(f"\ntarget (GPU): ours >= {target} x local and ahead of hand-built: "
                  f"{'MET' if ok else 'MISSED'}")
    bench = "train" if link is None else f"train_link-{args.link.replace(',', '-')}"
    out = write_json(json_path(args, bench), args, {
        "runs": {r.name: r.as_dict() for r in runs}, "ratios": ratios,
        "link": None if link is None else {"configured": link.describe(), "measured": link.measured},
        "seconds": time.perf_counter() - t_start,
    })
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
