"""Overhead of the server's session persistence per training step (issue 23's closing figure).

    python benchmarks/persist.py --model small                    # GPT-2 small, GPU if there is one
    python benchmarks/persist.py --model tiny --steps 12          # CPU check, < 1 min on 2 cores
    python benchmarks/persist.py --model small --state-dir /mnt/nvme/ls-state --steps 50

A GPT-2 split ``two_part`` at cut 1 with a trainable tail (the server keeps blocks 1.. + ln_f +
lm_head and steps its own Adam: for GPT-2 small 117 M parameters, about 1.4 GB per save with Adam's
two moments) is trained by ``Trainer.fit`` of ``CausalLM(lr=3e-3, optimizer="Adam")`` through
``SplitStrategy`` against a real mutual-TLS ``ChannelServer`` in this process (server and client on
``--server-device``), three ways: persistence off (``persist_sessions_s=None``), after every
optimizer step (``persist_sessions_s=0``: the write, atomic and fsynced, precedes the step's
reply) and at most every 10 s. Step time = time between the ends of consecutive steps (CUDA
synchronised), median and p90 over the steps after ``--warmup``; overhead = minus the ``off``
row's. ``DurableSessions.save`` is wrapped to time every save and to measure the files it leaves
(the session's safetensors + JSON). The state folder (default: a temporary folder under the
repo's git-ignored ``build/``, i.e. the repo's disk) is described with ``df`` (tmpfs or not).
Writes benchmarks/results/persist_<device>.json (persist_<model>_<device>.json unless small).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CLIENT_ID, RESULTS, ROOT, pki_dir, print_table, sync, write_json  # noqa: E402

from lightning_split.channel import ChannelServer, client_tls, server_tls  # noqa: E402
from lightning_split.server.durable import DurableSessions  # noqa: E402
from lightning_split.server.service import SplitService  # noqa: E402
from lightning_split.split.build import ModelSource  # noqa: E402
from lightning_split.split.spec import SplitSpec  # noqa: E402

VARIANTS = {"off": None, "every step": 0.0, "every 10 s": 10.0}
SHAPES = {"small": (8, 512), "tiny": (4, 32)}  # default batch x sequence length


def model_source(name: str) -> ModelSource:
    if name == "small":  # transformers' GPT2Config() defaults: GPT-2 small, 124 M parameters
        return ModelSource("transformers:GPT2LMHeadModel", {}, seed=0)
    from tests.split_cases import GPT2  # the tests' tiny GPT-2, for CPU checks

    return GPT2


# -- DurableSessions.save, timed ---------------------------------------------------------------------

# This variant's saves: the server's step (the client's global step; the client may already be in
# the next one), seconds, bytes of the session's files after the save.
SAVES: list[dict[str, Any]] = []
_save = DurableSessions.save


def _timed_save(self: DurableSessions, session: Any, segment: Any) -> None:
    t0 = time.perf_counter()
    _save(self, session, segment)
    seconds = time.perf_counter() - t0
    folder = self.store.root / session.node_id
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0
    SAVES.append({"step": int(segment.last_step), "s": seconds, "bytes": size})


DurableSessions.save = _timed_save


# -- one variant ---------------------------------------------------------------------------------------

def step_timer(device: str) -> Any:
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Seconds between the ends of consecutive steps (the first: from its start)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                sync(device)
                self.last = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *a: Any) -> None:
            sync(device)
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now
            self.losses.append(float(outputs["loss"]))

    return StepTimer()


def run_variant(args: Any, name: str, persist_s: float | None, pki: Path, state: Path,
                source: ModelSource, spec: SplitSpec, batches: list[torch.Tensor]) -> dict[str, Any]:
    import lightning as L

    from lightning_split import SplitStrategy
    from lightning_split.examples.modules import CausalLM

    SAVES.clear()
    service = SplitService(source, spec, device=args.server_device, state_dir=state, persist_sessions_s=persist_s)
    server = ChannelServer(service, "127.0.0.1:0", tls=server_tls(pki))
    port = server.start()
    timer = step_timer(args.server_device)
    try:
        strategy = SplitStrategy(address=f"127.0.0.1:{port}", node_id=CLIENT_ID, tls=client_tls(pki, CLIENT_ID),
                                 source=source, spec=spec, tail="trainable", device=args.server_device,
                                 log_transport=False)
        trainer = L.Trainer(
            max_steps=len(batches), accelerator=torch.device(args.server_device).type, devices=1,
            strategy=strategy, precision=args.precision, logger=False, callbacks=[timer],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(CausalLM(lr=3e-3, optimizer="Adam"), torch.utils.data.DataLoader(batches, batch_size=None))
        strategy.close()
    finally:
        server.stop(grace=0)
    times = [1e3 * t for t in timer.times[args.warmup:]]
    timed_saves = [s for s in SAVES if s["step"] >= args.warmup] or SAVES
    return {
        "persist_sessions_s": persist_s, "step_ms": times, "losses": timer.losses,
        "median_ms": statistics.median(times), "p90_ms": percentile(times, 90),
        "saves": len(SAVES), "saves_in_timed_steps": sum(s["step"] >= args.warmup for s in SAVES),
        "save_ms": [1e3 * s["s"] for s in SAVES], "save_steps": [s["step"] for s in SAVES],
        "median_save_ms": 1e3 * statistics.median(s["s"] for s in timed_saves) if SAVES else None,
        "bytes_per_save": timed_saves[-1]["bytes"] if SAVES else None,
    }


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    i = int(k)
    return s[i] if i + 1 >= len(s) else s[i] + (s[i + 1] - s[i]) * (k - i)


def disk_of(path: Path) -> dict[str, Any]:
    """``df -PT`` of the folder's filesystem: device, type (tmpfs?), size, free, mount point."""
    out = subprocess.run(["df", "-PT", str(path)], capture_output=True, text=True, check=True).stdout
    fs, kind, blocks, used, avail, _, mount = out.splitlines()[-1].split(None, 6)
    return {"df": out.strip(), "filesystem": fs, "type": kind, "tmpfs": kind == "tmpfs", "mounted_on": mount,
            "size_GB": int(blocks) * 1024 / 1e9, "free_GB": int(avail) * 1024 / 1e9}


# -- main --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(SHAPES), default="small")
    p.add_argument("--steps", type=int, default=30, help="training steps per variant, warm-up included")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the statistics")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--server-device", default=None, help="server's and client's device (default: cuda if any)")
    p.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on CUDA, else 32-true)")
    p.add_argument("--state-dir", default=None, help="where the server writes (default: a temp folder under build/)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    args.server_device = args.server_device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.server_device == "cuda":
        args.server_device = "cuda:0"
    cuda = torch.device(args.server_device).type == "cuda"
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    args.batch = args.batch or SHAPES[args.model][0]
    args.seq = args.seq or SHAPES[args.model][1]
    t_start = time.perf_counter()

    source, spec = model_source(args.model), SplitSpec(cut=1, shape="two_part")
    vocab = source.config.get("vocab_size", 50257)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g) for _ in range(args.steps)]
    parent = Path(args.state_dir) if args.state_dir else ROOT / "build"  # build/: git-ignored
    made = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    state_root = Path(tempfile.mkdtemp(prefix="ls-persist-", dir=parent))
    disk = disk_of(state_root)
    print(f"persist: GPT-2 {args.model}, two_part cut 1, trainable tail + Adam, batch {args.batch} x seq "
          f"{args.seq}, {args.server_device} {args.precision}, {args.steps} steps ({args.warmup} warm-up)\n"
          f"state dir {state_root}: {disk['filesystem']} ({disk['type']}{', tmpfs' * disk['tmpfs']}) on "
          f"{disk['mounted_on']}, {disk['free_GB']:.1f} of {disk['size_GB']:.1f} GB free", flush=True)

    runs: dict[str, dict[str, Any]] = {}
    try:
        with pki_dir() as pki:
            for i, (name, persist_s) in enumerate(VARIANTS.items()):
                runs[name] = run_variant(args, name, persist_s, pki, state_root / f"v{i}", source, spec, batches)
                r = runs[name]
                print(f"  {name:<11} {r['median_ms']:9.1f} ms/step median, {r['saves']} saves", flush=True)
    finally:
        shutil.rmtree(state_root, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):  # only if nothing else was put there meanwhile
                parent.rmdir()

    off = runs["off"]
    for r in runs.values():
        r["overhead_ms"] = r["median_ms"] - off["median_ms"]
        r["overhead_p90_ms"] = r["p90_ms"] - off["p90_ms"]
        r["ratio"] = r["median_ms"] / off["median_ms"]
    print_table(
        f"state persistence per training step, GPT-2 {args.model}, {args.server_device} {args.precision} "
        f"(steps {args.warmup}..{args.steps - 1}); state dir on {disk['type']} ({disk['filesystem']})",
        ["persistence", "median ms", "p90 ms", "overhead ms", "x off", "saves (timed)", "save ms (median)",
         "MB/save"],
        [[name, r["median_ms"], r["p90_ms"], r["overhead_ms"], r["ratio"],
          f"{r['saves']} ({r['saves_in_timed_steps']})",
          "-" if r["median_save_ms"] is None else r["median_save_ms"],
          "-" if r["bytes_per_save"] is None else r["bytes_per_save"] / 1e6] for name, r in runs.items()],
    )
    device = torch.device(args.server_device).type
    out = Path(args.json) if args.json else RESULTS / (
        f"persist_{device}.json" if args.model == "small" else f"persist_{args.model}_{device}.json")
    args.device = args.server_device  # write_json's environment()
    write_json(out, args, {"state_dir": str(state_root), "disk": disk, "runs": runs,
                           "seconds": time.perf_counter() - t_start})
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
