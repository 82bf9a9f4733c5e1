"""Training steps/s of a GPT-2: local vs our split (mutual-TLS gRPC) vs a hand-built torch.distributed split.

    python benchmarks/train.py --quick                                  # tiny GPT-2 on CPU, < 90 s
    python benchmarks/train.py --model small --device cuda              # bf16 autocast by default on CUDA
    python benchmarks/train.py --model medium --device cuda --batch 8 --seq 512 --steps 30
    python benchmarks/train.py --quick --link 100mbit,20 --also-bf16-wire   # root: across an emulated link
    python benchmarks/train.py --quick --no-lightning --link 1gbit --also-wire int8 auto \
        --also-hand-built-wire bf16 int8                                # our wire choices vs the hand-built's

Rows (same model source, seed, batches and AdamW everywhere; dropout off):

* local:      the whole GPT2LMHeadModel in this process: forward + backward + AdamW step.
* ours:       ``open_split`` against a SplitService (``two_part``, tail mode ``trainable``: the server
              steps its own AdamW) behind a mutual-TLS ChannelServer in another process; per step
              ``model(input_ids=ids, labels=ids).loss.backward()`` with the server's optimizer step
              riding on the last backward, then the client's step (what SplitStrategy does without
              clipping); micro-batches in flight as the library chooses
              (``--micro-batches`` to force a number). The loss is the server's only result, so the
              server backpropagates each micro-batch with its forward (``--also-unfused``: a row
              with a separate BACKWARD round trip per micro-batch instead). fp32 on the wire.
* ours MODE wire (``--also-wire MODE ...``): the same with lossy MODE both ways (bf16, fp8, int8;
              gradients with error feedback), or ``auto``: the adaptive compression of
              ``SplitStrategy(compression="auto")`` (``split/adaptive.py``: each step's time fed to
              ``end_step`` as the strategy does; every mode both ends allow to choose from; the first
              8 steps uncompressed, then revised every 8); the modes it chose go into the JSON.
* hand-built: what a PyTorch user writes (``hand_built.py``): two processes, gloo over TCP, no TLS,
              no auth; rank 0 embeddings + blocks[:cut], rank 1 the rest + loss + its own AdamW;
              labels and activation out, its gradient back, through host buffers allocated once
              (pinned on CUDA); fp32 on the wire like ours. ``--also-hand-built-wire MODE ...``:
              rows ``hand-built MODE wire`` with bf16, or int8 (our block-wise int8 codec, both
              ways). ``--also-bf16-wire``: ``--also-wire bf16 --also-hand-built-wire bf16``.
* lightning local / lightning ours (unless --no-lightning): ``Trainer.fit`` of
  ``examples.modules.CausalLM``, the second with ``strategy=SplitStrategy(...)``.

``--link RATE[,RTT_MS]`` (root): the server side (our server, the hand-built rank 1) runs across an
emulated link (``link.py``: its own network namespace, tbf each way, RTT added per packet); the
link as configured and as measured with raw TCP goes into the table's title and the JSON.

With a link or any wire row, a second table ("ratios") divides every split row's steps/s by the
hand-built fp32 row's and the hand-built bf16 row's, beside its last loss and the mean of its last
five (loss closeness; JSON ``ratios.vs_hand_built``), and checks the ours rows (``ours``, ``ours MODE
wire``) against the targets of the link's configured rate (JSON ``targets``; none for other rates
or without a link): at 1gbit ours >= 3x hand-built fp32 and >= 1.5x hand-built bf16, at 100mbit
>= 5x and >= 2.5x.

Steps/s = 1 / median step time after warm-up (CUDA synchronised around every step). The transport
breakdown of ``ours`` (and of the fastest ``ours MODE wire`` row) comes from ``client.stats`` and the
server's handler time; the codec row is an offline estimate (encode + decode of one step's real
messages in the row's encodings, device copies included; not error feedback); transfer is the bytes
at the link's measured rate; client alone / in flight / hidden come from one step's timeline.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
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
from _linked import LinkedServer  # noqa: E402
from link import Link, LinkError  # noqa: E402

from lightning_split.channel import ChannelConfig, client_tls  # noqa: E402
from lightning_split.channel.config import LOSSY_MODES  # noqa: E402
from lightning_split.split.adaptive import AdaptiveCompression  # noqa: E402
from lightning_split.split.build import ModelSource, build_model  # noqa: E402
from lightning_split.split.spec import SplitSpec  # noqa: E402
from lightning_split.wire import CompressionConfig  # noqa: E402

LR = 1e-4
QUICK = dict(model="tiny", batch=4, seq=64, steps=20, warmup=3)
FULL = dict(model="small", batch=8, seq=512, steps=30, warmup=5)
TARGETS = {"small": 0.9, "medium": 0.95}  # ours / local steps/s, GPU runs
# Issue "training over real links": the best ours row over hand-built fp32 and over hand-built bf16,
# by the link's configured rate (bit/s).
LINK_TARGETS = {10**9: {"rate": "1gbit", "over_hand_built_fp32": 3.0, "over_hand_built_bf16": 1.5},
                10**8: {"rate": "100mbit", "over_hand_built_fp32": 5.0, "over_hand_built_bf16": 2.5}}
OURS_WIRES = ("bf16", "fp8", "int8", "auto")  # --also-wire
HAND_BUILT_WIRES = ("bf16", "int8")  # --also-hand-built-wire


@dataclass
class Run:
    name: str
    times: list[float]
    losses: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        return 1.0 / median(self.times)

    @property
    def loss_last5(self) -> float:
        """Mean of the last five losses (one step's loss is noisy: this is what loss closeness is read on)."""
        tail = self.losses[-5:]
        return sum(tail) / len(tail) if tail else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"steps_per_s": self.steps_per_s, "median_step_ms": 1e3 * median(self.times),
                "step_ms": [1e3 * t for t in self.times], "losses": self.losses,
                "loss_final": self.losses[-1] if self.losses else None, "loss_last5_mean": self.loss_last5,
                **self.extra}


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
    """``lossy``: a CompressionConfig.lossy mode both ways, or ``"auto"``: the adaptive compression of
    ``SplitStrategy(compression="auto")`` (split/adaptive.py), fed each step's time as the strategy does."""
    tail = {"mode": "trainable", "optimizer": {"name": "AdamW", "lr": LR}, "train_graphs": train_graphs}
    auto = lossy == "auto"
    wire = CompressionConfig(lossy="none" if auto else lossy)
    # allow_lossy: what this client decodes; the welcome's lossy_modes (what "auto" may pick from) are
    # these and the server's (_common's ChannelServer: the default, every mode).
    config = ChannelConfig(client_to_server=wire, server_to_client=wire, allow_lossy=LOSSY_MODES,
                           connections=connections or args.connections)
    split = server.connect(source, spec, args.device, tail, micro_batches=micro_batches, config=config)
    split.runner.fuse_loss_backward = fuse
    if ramp is not None:
        split.runner.ramp_micro_batches = ramp
    adaptive = None
    if auto:
        welcome = split.client.welcome
        adaptive = split.runner.adaptive = AdaptiveCompression(welcome.get("lossy_modes", ()), split.client.sending)
    try:
        model, client = split.model.train(), split.client
        opt = torch.optim.AdamW(model.parameters(), lr=LR)

        def step(i: int, ids: torch.Tensor) -> torch.Tensor:
            return split_train_step(split, opt, i, ids, lambda: autocast(args.device, args.dtype))

        times, losses, sent_mb, received_mb, modes = [], [], [], [], []
        profile = profile_if_asked("LS_CLIENT_PROFILE", name)
        for i, ids in enumerate(batches):
            if i == args.warmup:
                stats0, busy0 = client.stats.snapshot(), server.busy()
                profile.enable()
            before = client.stats.snapshot()
            dt, loss = timed(lambda i=i, ids=ids: step(i, ids), args.device)
            if adaptive is not None:
                modes.append(dict(adaptive.modes))  # the encodings this step used
                adaptive.end_step(dt)  # what SplitStrategy._time_step does
            step_stats = client.stats.snapshot() - before
            sent_mb.append(step_stats.bytes_sent / 1e6)
            received_mb.append(step_stats.bytes_received / 1e6)
            times.append(dt)
            losses.append(float(loss))
        profile.disable()
        delta, busy1 = client.stats - stats0, server.busy()
        n = len(batches) - args.warmup
        messages = record_one_step(split, lambda: step(len(batches), batches[0]))
        if adaptive is not None:
            compression = (adaptive.config("activations"), adaptive.config("gradients"))  # FORWARD up, fused reply down
        else:
            compression = (wire, wire) if lossy != "none" else (None, None)
        extra = {
            "round_trips_per_step": delta.messages / n,
            "sent_MB_per_step": delta.bytes_sent / n / 1e6,
            "received_MB_per_step": delta.bytes_received / n / 1e6,
            "mean_rtt_ms": 1e3 * delta.mean_rtt_s,
            "rtt_ms_per_step": 1e3 * delta.total_rtt_s / n,
            "server_handler_ms_per_step": 1e3 * (busy1[0] - busy0[0]) / n,
            "codec_ms_per_step_est": 1e3 * codec_seconds(messages, args.device, compression=compression),
            "logits_MB_per_step": sum(rep["logits"].nbytes for _, _, rep in messages
                                      if isinstance(rep, dict) and "logits" in rep) / 1e6,
            "bare_rtt_ms": channel_rtt_ms(split, 30),
            "timeline": step_timeline(split, server, lambda: step(len(batches) + 1, batches[1]), args.device),
            # Every step's, warm-up included (the timed steps are the last ``steps``).
            "sent_MB_each_step": sent_mb, "received_MB_each_step": received_mb,
            "lossy": lossy,
        }
        if adaptive is not None:
            timed_modes = modes[args.warmup:]
            extra.update(
                adaptive_modes=dict(adaptive.modes),  # chosen at the end
                adaptive_modes_each_step=modes,
                slow_link=adaptive.slow_link,  # measured slower than 25 MB/s: more micro-batches in flight
                link_MB_s=(adaptive.link_bytes_per_s or 0) / 1e6,
                # The timed steps that ran in the final encodings (the first ``first`` steps run uncompressed).
                median_step_ms_final_modes=1e3 * median([t for t, m in zip(times[args.warmup:], timed_modes,
                                                                           strict=True) if m == adaptive.modes]),
            )
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
    conf = {**{k: getattr(args, k) for k in keys}, "wire": wire}
    times, losses = hand_built.run(conf, source, link)
    up, down = hand_built.wire_bytes(conf, source.config["n_embd"])  # payload; gloo adds a few bytes
    return Run(name, times[args.warmup:], losses, {"wire": wire, "sent_MB_per_step": up / 1e6,
                                                   "received_MB_per_step": down / 1e6})


def run_anchor(args: Any, script: str, wire: str = "fp32") -> list[Run]:
    """The reference hand-built split (``../shared/baselines/naive_split.py``) run here, in this run:
    its local and split step times become rows ``anchor local`` and ``anchor naive_split``. It
    trains fp32 weights under bf16 autocast (``MIXED=1``, our rows' precision) at its own fixed
    batch (8 x 1024) and cut, so it is comparable with GPU rows of that shape."""
    env = {**os.environ, "MIXED": "1", "WIRE": wire,
           "SERVER_GPU": str(torch.device(args.server_device).index or 0)}
    out = subprocess.run([sys.executable, script, args.model, str(args.cut)], env=env, capture_output=True,
                         text=True, timeout=900)
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or len(lines) < 2:
        raise RuntimeError(f"{script} failed (rc {out.returncode}): {out.stderr[-2000:]}")
    by = {x["what"]: x for x in lines}
    suffix = "" if wire == "fp32" else f" {wire} wire"
    return [Run(f"anchor local{suffix}", [by["local_step"]["step_ms"] / 1e3], [], {"anchor": by["local_step"]}),
            Run(f"anchor naive_split{suffix}", [by["naive_split_step"]["step_ms"] / 1e3], [],
                {"anchor": by["naive_split_step"]})]


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


def _in_flight_ms(line: dict[str, Any]) -> float:
    """Of one step's timeline, the ms during which at least one request was waiting for its reply."""
    spans = sorted((r["submit"], r.get("reply", line["step_end"])) for r in line["requests"])
    total, end = 0.0, float("-inf")
    for a, b in spans:
        a, b = max(a, end), min(b, line["step_end"])
        if b > a:
            total += b - a
        end = max(end, b)
    return total


def print_breakdown(ours: Run, link: Link | None = None) -> dict[str, Any]:
    """The row's step, piece by piece; returns the pieces (ms) derived here, for the JSON."""
    x, step_ms = ours.extra, 1e3 * median(ours.times)
    # One FORWARD and one BACKWARD (carrying the server's step): the round trips follow one another. With
    # micro-batches in flight they overlap, and their sum is no longer a share of the step.
    serial = x["round_trips_per_step"] <= 3
    na = "n/a (overlapping)"
    line = x["timeline"]
    in_flight = _in_flight_ms(line)
    # One timeline step (not the median): the client's own time is where no request was in flight.
    client_alone = line["step_end"] - in_flight
    transfer = None
    if link is not None and link.measured:  # the bytes at the link's measured rate, each way
        m = link.measured
        transfer = (1e3 * 8 * x["sent_MB_per_step"] / m["c2s_mbit_s"],
                    1e3 * 8 * x["received_MB_per_step"] / m["s2c_mbit_s"])
    # That step's own handler time (the median step's may differ), the codec and the bytes at the link's rate:
    # what the step would take with nothing overlapped, less what it took.
    handler = sum(r.get("handler_busy_ms", 0.0) for r in line["requests"])
    serial_parts = handler + x["codec_ms_per_step_est"] + (sum(transfer) if transfer else 0.0)
    derived = {"in_flight_ms": in_flight, "client_alone_ms": client_alone, "timeline_step_ms": line["step_end"],
               "timeline_handler_ms": handler,
               "transfer_ms_est": None if transfer is None else {"c2s": transfer[0], "s2c": transfer[1]},
               "hidden_ms_est": max(0.0, client_alone + serial_parts - line["step_end"])}
    modes = x.get("adaptive_modes")
    what = f"{ours.name}" + (f" (auto chose activations {modes['activations']}, gradients {modes['gradients']})"
                             if modes else "")
    print_table(
        f"{what}, per training step (transport from client.stats; handler time measured in the server process)",
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
         ["  of which logits, unused by loss.backward (MB/step)", x["logits_MB_per_step"]],
         ["transfer at the link's measured rate, c->s / s->c, est. (ms)",
          "n/a (no link)" if transfer is None else f"{transfer[0]:.3g} / {transfer[1]:.3g}"],
         [f"one step's timeline ({line['step_end']:.3g} ms): client alone, no request in flight (ms)", client_alone],
         ["  a request in flight (ms)", in_flight],
         ["  server handler busy (ms)", handler],
         ["  hidden, est.: client alone + handler + codec + transfer both ways - step (ms)", derived["hidden_ms_est"]]],
    )
    print_table(f"one step's requests, ms from its start (step ended at {line['step_end']} ms); handler start/end: "
                "the server's host clock (its GPU work may still run); busy: its GPU time (CPU: wall time)",
                ["request", "submitted", "handler start", "handler end", "handler busy", "reply in"],
                [[r["type"], r["submit"], r.get("handler_start", "-"), r.get("handler_end", "-"),
                  r.get("handler_busy_ms", "-"), r.get("reply", "-")] for r in line["requests"]])
    return derived


def link_targets(link: Link | None) -> dict[str, Any] | None:
    """The issue's targets for the link's configured rate (None: no link, or a rate it sets none for)."""
    if link is None:
        return None
    target = LINK_TARGETS.get(link.rate_bit_s)
    return None if target is None else dict(target)


def vs_hand_built(runs: list[Run], targets: dict[str, Any] | None) -> dict[str, Any]:
    """Every split row's steps/s over hand-built fp32 and over hand-built bf16 wire, its losses, and, for the
    ours rows of each wire (ours, ours <mode> wire), whether it meets the targets."""
    by = {r.name: r for r in runs}
    fp32, bf16 = by.get("hand-built"), by.get("hand-built bf16 wire")
    table = {}
    for r in runs:
        if r.name in ("local", "lightning local") or not r.losses:  # not split, or an anchor row (no losses)
            continue
        row: dict[str, Any] = {
            "steps_per_s": r.steps_per_s,
            "over_hand_built_fp32": r.steps_per_s / fp32.steps_per_s if fp32 else None,
            "over_hand_built_bf16": r.steps_per_s / bf16.steps_per_s if bf16 else None,
            "loss_final": r.losses[-1], "loss_last5_mean": r.loss_last5,
        }
        if targets is not None and is_wire_row(r.name):
            for key in ("over_hand_built_fp32", "over_hand_built_bf16"):
                row[f"meets_{key}"] = None if row[key] is None else row[key] >= targets[key]
        table[r.name] = row
    return table


def is_wire_row(name: str) -> bool:
    """An ours row that differs from the others by its wire only: ``ours`` (fp32) and ``ours <mode> wire``."""
    return name == "ours" or (name.startswith("ours ") and name.endswith(" wire"))


def print_ratios(table: dict[str, Any], targets: dict[str, Any] | None, link: Link | None) -> None:
    def r(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    def met(row: dict[str, Any], key: str) -> str:
        ok = row.get(f"meets_{key}")
        return "" if ok is None else (" ok" if ok else " MISSED")

    where = "no link" if link is None else f"link {link}"
    if targets is None:
        aim = "no targets" + ("" if link is None else f" for {link.rate}")
    else:
        aim = (f"targets at {targets['rate']}: ours >= {targets['over_hand_built_fp32']}x hand-built fp32 and "
               f">= {targets['over_hand_built_bf16']}x hand-built bf16")
    print_table(f"ratios (steps/s over the hand-built rows; {where}; {aim})",
                ["variant", "steps/s", "/ hand-built fp32", "/ hand-built bf16", "loss[-1]", "loss last5"],
                [[name, row["steps_per_s"], r(row["over_hand_built_fp32"]) + met(row, "over_hand_built_fp32"),
                  r(row["over_hand_built_bf16"]) + met(row, "over_hand_built_bf16"),
                  f"{row['loss_final']:.4f}", f"{row['loss_last5_mean']:.4f}"] for name, row in table.items()])
    if targets is not None:
        rows = {n: row for n, row in table.items() if is_wire_row(n)}
        if rows:
            best = max(rows, key=lambda n: rows[n]["steps_per_s"])
            meets = [rows[best].get(f"meets_{k}") for k in ("over_hand_built_fp32", "over_hand_built_bf16")]
            ok = None if None in meets else all(meets)  # None: a hand-built row to compare with did not run
            targets.update(best_row=best, met=ok)
            verdict = "n/a (run hand-built and hand-built bf16 wire)" if ok is None else ("MET" if ok else "MISSED")
            print(f"\ntarget ({targets['rate']}): best ours row {best!r}: "
                  f"{r(rows[best]['over_hand_built_fp32'])} hand-built fp32, "
                  f"{r(rows[best]['over_hand_built_bf16'])} hand-built bf16: {verdict}")


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
                        "hand-built (halves the bytes; not exact): as --also-wire bf16 --also-hand-built-wire bf16")
    p.add_argument("--also-wire", nargs="+", choices=OURS_WIRES, default=[], metavar="MODE",
                   help="extra 'ours MODE wire' rows: lossy MODE both ways (bf16, fp8, int8), or auto (the "
                        "adaptive compression of SplitStrategy(compression='auto'), revised every 8 steps)")
    p.add_argument("--also-hand-built-wire", nargs="+", choices=HAND_BUILT_WIRES, default=[], metavar="MODE",
                   help="extra 'hand-built MODE wire' rows (bf16, or int8: our block-wise int8, both ways)")
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
    p.add_argument("--anchor", default=None, metavar="PATH",
                   help="also run the reference hand-built split (../shared/baselines/naive_split.py, CUDA) "
                        "in this run, fp32 wire (and bf16 wire with --also-bf16-wire)")
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
    bf16 = ["bf16"] if args.also_bf16_wire else []
    ours_wires = list(dict.fromkeys([*args.also_wire, *bf16]))
    hand_built_wires = list(dict.fromkeys([*bf16, *args.also_hand_built_wire]))

    runs: list[Run] = []
    bench = "train" if link is None else f"train_link-{args.link.replace(',', '-')}"

    def record(run: Run, note: str = "") -> None:
        """Print a finished row and save every row so far: a run cut short keeps what it measured."""
        runs.append(run)
        print(f"  {run.name:<12s} {run.steps_per_s:8.2f} steps/s{note}", flush=True)
        write_json(json_path(args, bench), args, {"runs": {r.name: r.as_dict() for r in runs}, "partial": True})

    with pki_dir() as pki, server_cls(pki, source, spec, args.server_device) as server:
        record(run_local(args, source, batches))
        record(run_ours(args, server, source, spec, batches, args.micro_batches))
        for n in args.also_micro_batches:
            record(run_ours(args, server, source, spec, batches, n, f"ours mb={n}"))
        for n in args.also_ramped:
            record(run_ours(args, server, source, spec, batches, n, f"ours ramped mb={n}", ramp=True))
        for k in args.also_connections:
            record(run_ours(args, server, source, spec, batches, args.micro_batches, f"ours conn={k}",
                            connections=k))
        if args.also_unfused:
            record(run_ours(args, server, source, spec, batches, args.micro_batches, "ours unfused", fuse=False))
        if args.also_eager_server:
            record(run_ours(args, server, source, spec, batches, args.micro_batches, "ours eager server",
                            train_graphs=False))
        for mode in ours_wires:
            run = run_ours(args, server, source, spec, batches, args.micro_batches, f"ours {mode} wire", mode)
            chose, x = run.extra.get("adaptive_modes"), run.extra
            record(run, (f" (chose activations {chose['activations']}, gradients {chose['gradients']}, slow link "
                         f"{x['slow_link']} ({x['link_MB_s']:.1f} MB/s); "
                         f"median {x['median_step_ms_final_modes']:.1f} ms/step in those)") if chose else "")
        if not args.no_lightning:
            record(run_lightning(args, source, batches))
            record(run_lightning(args, source, batches, server, spec))
    if not args.no_hand_built:
        record(run_hand_built(args, source, link))
        for mode in hand_built_wires:
            record(run_hand_built(args, source, link, mode, f"hand-built {mode} wire"))
    if args.anchor:
        for wire in ["fp32", *bf16]:
            for run in run_anchor(args, args.anchor, wire):
                record(run)

    by = {r.name: r for r in runs}
    local = by["local"]
    print_table(
        f"training, GPT-2 {args.model}, batch {args.batch} x {args.seq}, {args.device} {args.dtype} "
        f"(median of {args.steps} steps){where}",
        ["variant", "steps/s", "ms/step", "best ms", "x local", "MB/step c->s", "s->c", "loss[0]", "loss[-1]",
         "loss last5"],
        [[r.name, r.steps_per_s, 1e3 * median(r.times), 1e3 * min(r.times), r.steps_per_s / local.steps_per_s,
          r.extra.get("sent_MB_per_step", "-"), r.extra.get("received_MB_per_step", "-"),
          *([f"{r.losses[0]:.4f}", f"{r.losses[-1]:.4f}", f"{r.loss_last5:.4f}"] if r.losses else ["-"] * 3)]
         for r in runs],
    )
    ratios = {"ours/local": by["ours"].steps_per_s / local.steps_per_s}
    if "hand-built" in by:
        ratios["hand-built/local"] = by["hand-built"].steps_per_s / local.steps_per_s
        ratios["ours/hand-built"] = by["ours"].steps_per_s / by["hand-built"].steps_per_s
    anchor = by.get("anchor naive_split")
    if anchor is not None:  # the reference split, and its own local, measured in this run
        ratios["anchor naive_split/anchor local"] = anchor.steps_per_s / by["anchor local"].steps_per_s
        ratios["ours/anchor naive_split"] = by["ours"].steps_per_s / anchor.steps_per_s
        if "hand-built" in by:
            ratios["hand-built/anchor naive_split"] = by["hand-built"].steps_per_s / anchor.steps_per_s
    if "anchor naive_split bf16 wire" in by and "ours bf16 wire" in by:
        ratios["ours/anchor naive_split, bf16 wire"] = (by["ours bf16 wire"].steps_per_s
                                                       / by["anchor naive_split bf16 wire"].steps_per_s)
    for mode in HAND_BUILT_WIRES:
        if f"hand-built {mode} wire" in by and f"ours {mode} wire" in by:
            ratios[f"ours/hand-built, {mode} wire"] = (by[f"ours {mode} wire"].steps_per_s
                                                       / by[f"hand-built {mode} wire"].steps_per_s)
    if "lightning ours" in by:
        ratios["lightning ours/local"] = by["lightning ours"].steps_per_s / by["lightning local"].steps_per_s
    print("\nratios (steps/s): " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))

    targets = link_targets(link)
    if link is not None or ours_wires or hand_built_wires:
        ratios["vs_hand_built"] = vs_hand_built(runs, targets)
        print_ratios(ratios["vs_hand_built"], targets, link)

    breakdowns = {"ours": print_breakdown(by["ours"], link)}
    lossy = [r for r in runs if is_wire_row(r.name) and r.name != "ours"]
    if lossy:  # the fastest lossy ours row, piece by piece too
        best = max(lossy, key=lambda r: r.steps_per_s)
        breakdowns[best.name] = print_breakdown(best, link)
    if torch.device(args.device).type == "cuda":
        target = TARGETS.get(args.model)
        if target is not None:
            ok = (ratios["ours/local"] >= target and ratios.get("ours/hand-built", 1.0) > 1.0
                  and ratios.get("ours/anchor naive_split", 1.0) > 1.0)
            print(f"\ntarget (GPU): ours >= {target} x local and ahead of hand-built (and naive_split.py): "
                  f"{'MET' if ok else 'MISSED'}")
    out = write_json(json_path(args, bench), args, {
        "runs": {r.name: r.as_dict() for r in runs}, "ratios": ratios, "targets": targets,
        "breakdowns": breakdowns,
        "link": None if link is None else {"configured": link.describe(), "measured": link.measured},
        "seconds": time.perf_counter() - t_start,
    })
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
