"""A long prompt's time to first token across a slow link: sent whole, or in chunks in flight together.

    python benchmarks/prefill.py --quick                                # tiny GPT-2 on CPU (root: the link)
    python benchmarks/prefill.py --model small --device cuda --link 100mbit,20

The prompt's hidden state crosses the link to the server and, in a U-shaped split whose server
holds a middle segment, its output comes back the same size. Whole, each direction waits for the
other; in chunks of the sequence (``open_split(prefill_chunk_bytes=...)``, split/prefill.py) chunk
j + 1 goes up while the server computes chunk j and chunk j's output comes down. Rows: local
``generate(max_new_tokens=1)``, then per split shape the split sent whole (``prefill_chunk_bytes=0``)
and in chunks of each ``--chunk-kib``; time to first token is the median of ``--steps`` runs, and
every row's first token is checked against local.
"""

from __future__ import annotations

import contextlib
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
    greedy,
    json_path,
    median,
    model_source,
    pki_dir,
    print_table,
    random_batches,
    repeat_greedy,
    shared_cpu_threads,
    write_json,
)
from _linked import LinkedServer  # noqa: E402
from link import Link, LinkError  # noqa: E402

from lightning_split.split.spec import SplitSpec  # noqa: E402

QUICK = dict(model="tiny", batch=8, seq=1024, steps=5, warmup=1)
FULL = dict(model="small", batch=4, seq=1024, steps=5, warmup=1)


def ttft(name: str, model: torch.nn.Module, ids: torch.Tensor, args: Any, expected: torch.Tensor | None,
         split: bool) -> dict[str, Any]:
    times, out = repeat_greedy(model, ids, 1, args, split)
    row = {"name": name, "ttft_ms": 1e3 * median(times), "ttft_ms_all": [1e3 * t for t in times],
           "first_token_matches": bool(expected is None or torch.equal(out, expected))}
    print(f"  {name:<30} {row['ttft_ms']:9.1f} ms to the first token", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--link", default="100mbit,20", help="RATE[,RTT_MS] (root); 'none': loopback")
    p.add_argument("--chunk-kib", type=int, nargs="+", default=[1024, 256], help="chunk sizes to try (KiB)")
    p.add_argument("--shapes", nargs="+", choices=["u_shape", "two_part"], default=["u_shape", "two_part"])
    args = finish_args(p.parse_args(argv), QUICK, FULL)
    t_start = time.perf_counter()
    source = model_source(args.model, args.dtype)
    layers = source.config["n_layer"]
    specs = {"u_shape": SplitSpec(cut=args.cut, end=layers - 1, shape="u_shape"),  # its output comes back
             "two_part": SplitSpec(cut=args.cut, shape="two_part")}
    ids = random_batches(1, args.batch, args.seq, source.config["vocab_size"], args.device, seed=3)[0]
    hidden_mb = args.batch * args.seq * source.config["n_embd"] * (2 if args.dtype == "bf16" else 4) / 1e6
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack, torch.inference_mode():
        link = None
        if args.link != "none":
            rate, _, rtt = args.link.partition(",")
            try:
                link = stack.enter_context(Link(rate, float(rtt or 0)))
            except LinkError as e:
                print(f"prefill: --link: {e}", file=sys.stderr)
                return 2
            print(f"  link {args.link}: measured {link.measure()}", flush=True)
        from lightning_split.split.build import build_model

        local = build_model(source, device=args.device).eval()
        expected = greedy(local, ids, 1)
        rows.append(ttft("local", local, ids, args, expected, split=False) | {"shape": None, "chunk_kib": None})
        pki = stack.enter_context(pki_dir())
        for shape in args.shapes:
            threads = shared_cpu_threads() if torch.device(args.device).type == "cpu" else None
            server = (LinkedServer(link, pki, source, specs[shape], args.device) if link is not None
                      else SplitServer(pki, source, specs[shape], args.device, threads))
            with contextlib.closing(server):
                for kib in [0, *args.chunk_kib]:
                    split = server.connect(source, specs[shape], args.device, prefill_chunk_bytes=kib << 10)
                    try:
                        name = f"split {shape} " + (f"chunks of {kib} KiB" if kib else "whole")
                        rows.append(ttft(name, split.model.eval(), ids, args, expected, split=True)
                                    | {"shape": shape, "chunk_kib": kib})
                    finally:
                        split.close()
    for r in rows:
        whole = next((w for w in rows if w["shape"] == r["shape"] and w["chunk_kib"] == 0), None)
        r["x_whole"] = whole["ttft_ms"] / r["ttft_ms"] if whole else None
    print_table(f"time to first token, GPT-2 {args.model}, batch {args.batch} x {args.seq} tokens "
                f"({hidden_mb:.1f} MB of hidden state), {args.device} {args.dtype}, link {args.link}",
                ["row", "TTFT ms", "speed-up over whole", "first token = local"],
                [[r["name"], f"{r['ttft_ms']:.1f}", f"{r['x_whole']:.2f}x" if r["x_whole"] else "-",
                  "yes" if r["first_token_matches"] else "NO"] for r in rows])
    out = write_json(json_path(args, f"prefill_link-{args.link.replace(',', '-')}"), args, {
        "environment": environment(args.device), "link": link.describe() if link else None, "rows": rows,
        "seconds": time.perf_counter() - t_start})
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0 if all(r["first_token_matches"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
