"""Training quality of each wire compression mode against lossless, on real text.

A small GPT-2 trained from scratch through the split (U-shape, cut after block 1, the server holding
blocks 1-2 as a trainable tail: activations and gradients cross the wire both ways), once per
compression mode, applied to both directions, with the same data, order and initialisation, and the
same model trained locally in the same run, every run on the same learning-rate schedule (warm-up,
then cosine to a tenth of the peak; the server's optimizer follows the client's rate). The text is
the Python documentation's topic pages that ship with every CPython (``pydoc_data.topics``, 465 kB
of English and code), as bytes (a byte-level vocabulary of 256: the tokenizer is the text's own
encoding). Reports each mode's final training
loss (mean of the last 10% of steps) and held-out loss against lossless, ms per step and the
bytes each step put on the wire each way; saves the loss curves as a plot. With ``--seeds N`` every
row is run with N data orders (seed 0..N-1, the same initialisation) and the table gives each mode's
mean and spread: one run's loss at step 500 depends on when it leaves the early plateau, which noise
of any kind (a lossy wire, another batch order) moves, so a single run cannot say "within 1%".

    python benchmarks/quality.py                  # 500 steps, every mode (about 10 minutes on 2 cores)
    python benchmarks/quality.py --quick          # 60 steps
    python benchmarks/quality.py --modes none int8 --steps 1000
    python benchmarks/quality.py --device cuda --steps 2000 --seeds 3 --width 256   # the GPU machine
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    SplitServer,
    base_parser,
    environment,
    finish_args,
    json_path,
    pki_dir,
    print_table,
    quiet,
    split_train_step,
    write_json,
)

from lightning_split.split.build import ModelSource, build_model  # noqa: E402
from lightning_split.split.spec import SplitSpec  # noqa: E402
from lightning_split.wire import CompressionConfig  # noqa: E402

# mode name -> the CompressionConfig of both directions
MODES: dict[str, dict[str, Any]] = {
    "none": {},
    "blosc2": {"lossless": "blosc2"},
    "bf16": {"lossy": "bf16"},
    "int8": {"lossy": "int8"},
    "int8-block32": {"lossy": "int8", "int8_block_size": 32},  # a scale per 32 values: outliers spoil less
    "fp8": {"lossy": "fp8"},
    "int8-no-feedback": {"lossy": "int8", "error_feedback": False},  # the ablation
}
SPEC = SplitSpec(cut=1, end=3)


def corpus(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) windows of ``seq + 1`` bytes of the Python docs' topics (90% / 10%)."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    cut = int(0.9 * len(data))
    windows = lambda d: d[: len(d) // seq * seq].view(-1, seq)  # noqa: E731
    return windows(data[:cut]), windows(data[cut:])


def source(layers: int, width: int, seq: int) -> ModelSource:
    return ModelSource("transformers:GPT2LMHeadModel", dict(
        n_layer=layers, n_embd=width, n_head=4, vocab_size=256, n_positions=seq, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0), seed=7)


def learning_rate(i: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine down to a tenth of the peak: the
    schedule small GPTs are trained with, and the one that lets runs end where their data leads
    rather than wherever a constant rate's noise left them."""
    warm = max(1, steps // 20)
    if i < warm:
        return peak * (i + 1) / warm
    progress = (i - warm) / max(1, steps - warm - 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> float:
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def batches(train: torch.Tensor, steps: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [train[torch.randint(0, len(train), (batch,), generator=g)] for _ in range(steps)]


def held_out_loss(model: Any, held: torch.Tensor, batch: int) -> float:
    held = held.to(next(model.parameters()).device)
    with torch.no_grad():
        losses = [float(model(input_ids=held[i:i + batch], labels=held[i:i + batch]).loss)
                  for i in range(0, len(held) - batch + 1, batch)]
    return sum(losses) / len(losses)


def run_split(server: SplitServer, src: ModelSource, mode: str, data: list[torch.Tensor], held: torch.Tensor,
              args: Any) -> dict[str, Any]:
    from lightning_split.channel import ChannelConfig

    comp = CompressionConfig(**MODES[mode])
    tail = {"mode": "trainable", "optimizer": {"name": "AdamW", "lr": args.lr}}
    split = server.connect(src, SPEC, args.device, tail=tail,
                           config=ChannelConfig(client_to_server=comp, server_to_client=comp, connections=1))
    try:
        model = split.model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        stats0, t0 = split.client.stats.snapshot(), time.perf_counter()
        losses = [float(split_train_step(split, opt, i, ids, lr=set_lr(opt, learning_rate(i, len(data), args.lr))))
                  for i, ids in enumerate(data)]
        split.runner.confirm()
        seconds = time.perf_counter() - t0
        wire = split.client.stats - stats0
        held_loss = held_out_loss(model.eval(), held, args.batch)
    finally:
        split.close()
    return {"mode": mode, "losses": losses, "ms_per_step": 1e3 * seconds / len(data), "held_out_loss": held_loss,
            "sent_MB_per_step": wire.bytes_sent / len(data) / 1e6,
            "received_MB_per_step": wire.bytes_received / len(data) / 1e6,
            "raw_MB_per_step": (wire.raw_bytes_sent + wire.raw_bytes_received) / len(data) / 1e6}


def run_local(src: ModelSource, data: list[torch.Tensor], held: torch.Tensor, args: Any) -> dict[str, Any]:
    model = build_model(src).to(args.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses, t0 = [], time.perf_counter()
    for i, ids in enumerate(data):
        set_lr(opt, learning_rate(i, len(data), args.lr))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {"mode": "local", "losses": losses, "ms_per_step": 1e3 * (time.perf_counter() - t0) / len(data),
            "held_out_loss": held_out_loss(model.eval(), held, args.batch)}


def final(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per mode, over the seeds: mean losses, and the mean, min and max of each seed's ratio to lossless."""
    out: dict[str, dict[str, float]] = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        means = {k: sum(r[k] for r in mine) / len(mine)
                 for k in ("final_loss", "held_out_loss", "final_vs_lossless", "held_out_vs_lossless")}
        out[mode] = {"seeds": len(mine), **means,
                     "final_min": min(r["final_vs_lossless"] for r in mine),
                     "final_max": max(r["final_vs_lossless"] for r in mine),
                     "held_out_min": min(r["held_out_vs_lossless"] for r in mine),
                     "held_out_max": max(r["held_out_vs_lossless"] for r in mine)}
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    first = min(row.get("seed", 0) for row in rows)
    for row in rows:
        if row.get("seed", 0) != first:
            continue  # the first seed's curves; the table has every seed
        losses = torch.tensor(row["losses"])
        k = max(1, len(losses) // 50)  # a moving average, for legible curves
        smooth = torch.nn.functional.avg_pool1d(losses.view(1, 1, -1), k, stride=1).view(-1)
        ax.plot(range(k - 1, len(losses)), smooth.tolist(), label=f"{row['mode']} (final {final(row['losses']):.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (moving average of {k})")
    ax.set_title("GPT-2 through the split, per wire compression mode (both directions)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=1, help="data orders per row (mean and spread in the table)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first data order (to spread seeds over processes: --first-seed 1 --seeds 1)")
    p.set_defaults(device="cpu")  # CPU unless asked: the exact sums (lossless equals local bit for bit)
    args = finish_args(p.parse_args(argv), quick={"steps": 60, "batch": 8, "seq": 128},
                       full={"steps": 500, "batch": 8, "seq": 128})
    args.model = "text-gpt2"  # its own model (the byte vocabulary); fp32 everywhere (CPU: the exact sums)
    quiet()
    torch.manual_seed(0)
    train_windows, held = corpus(args.seq)
    held = held[: 8 * args.batch]  # 8 held-out batches
    src = source(args.layers, args.width, args.seq)
    rows: list[dict[str, Any]] = []
    with pki_dir() as pki, SplitServer(pki, src, SPEC, args.device) as server:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            data = [ids.to(args.device) for ids in batches(train_windows, args.steps, args.batch, seed)]
            rows += [run_local(src, data, held, args) | {"seed": seed}]
            rows += [run_split(server, src, mode, data, held, args) | {"seed": seed} for mode in args.modes]
            print(f"  seed {seed}: " + ", ".join(f"{r['mode']} {final(r['losses']):.4f} held-out "
                                                 f"{r['held_out_loss']:.4f}" for r in rows if r["seed"] == seed),
                  flush=True)
            # what is done so far, should a long run be cut short
            write_json(json_path(args, "quality"), args, {"environment": environment(args.device), "rows": rows,
                                                          "partial": True})
    for r in rows:
        base = next((b for b in rows if b["mode"] == "none" and b["seed"] == r["seed"]), r)
        r["final_loss"] = final(r["losses"])
        r["final_vs_lossless"] = r["final_loss"] / final(base["losses"])
        r["held_out_vs_lossless"] = r["held_out_loss"] / base["held_out_loss"]
    print_table(
        f"{args.steps} steps of GPT-2 ({args.layers} layers, {args.width} wide) on the Python docs' text, "
        f"batch {args.batch} x {args.seq} bytes, U-shape split cut at 1..3, trainable tail",
        ["mode", "final loss", "x lossless", "held-out", "x lossless", "ms/step", "MB sent/step", "MB recv/step"],
        [[r["mode"], f"{r['final_loss']:.4f}", f"{r['final_vs_lossless']:.4f}", f"{r['held_out_loss']:.4f}",
          f"{r['held_out_vs_lossless']:.4f}", f"{r['ms_per_step']:.1f}",
          f"{r.get('sent_MB_per_step', 0):.3f}", f"{r.get('received_MB_per_step', 0):.3f}"] for r in rows])
    summary = summarise(rows)
    if args.seeds > 1:
        print_table(f"over {args.seeds} data orders: mean of each seed's ratio to its lossless run [min, max]",
                    ["mode", "final loss", "x lossless", "held-out", "x lossless"],
                    [[m, f"{v['final_loss']:.4f}", f"{v['final_vs_lossless']:.4f} [{v['final_min']:.4f}, "
                      f"{v['final_max']:.4f}]", f"{v['held_out_loss']:.4f}", f"{v['held_out_vs_lossless']:.4f} "
                      f"[{v['held_out_min']:.4f}, {v['held_out_max']:.4f}]"] for m, v in summary.items()])
    out = json_path(args, "quality")
    picture = plot(rows, out.with_suffix(".png"))
    write_json(out, args, {"environment": environment(args.device), "rows": rows, "summary": summary,
                           "plot": str(picture) if picture else None})
    print(f"wrote {out}" + (f" and {picture}" if picture else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
