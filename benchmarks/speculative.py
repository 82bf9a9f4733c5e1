"""Speculative decoding through the split, across links of 0, 20 and 80 ms round trip.

    python benchmarks/speculative.py --quick                         # tiny GPT-2 on CPU (root: the delays)
    python benchmarks/speculative.py --model small --device cuda --rtts 0 20 80

Plain split decoding pays one round trip per token: at 20 ms RTT that alone caps it at 50
tokens/s. With Hugging Face's assisted generation on the client's split model, the server's segment
verifies k drafted tokens in one round trip (and cuts its KV cache back to the ones kept), so a
round trip brings up to k + 1 tokens. Two ways of drafting, as a user passes them to ``generate``:

* ``prompt_lookup_num_tokens``: drafts copied from the prompt, where the text being written repeats
  it (summarising or editing a given passage). The prompt here is a passage and then its start
  again: a start, the model's own greedy continuation of it (the passage), and the start once more.
  What the model writes next is largely the passage, as an edit of a text is largely the text.
  (The models are random-initialised: a trained model on a real edit behaves alike, but its
  acceptance is its own.)
* ``assistant_model``: a smaller GPT-2 of the same vocabulary (``--draft-layers``), random-initialised
  too: its drafts are timed honestly but rarely accepted (the acceptance is in the table).
  ``--draft self`` instead: the model's own first ``--draft-layers`` blocks with its final norm and
  output layer (self-speculation, as LayerSkip drafts by exiting early), weights shared: locally
  the whole model's, in a U-shaped split the client's (``SplitModel.early_exit_draft``, which drafts
  without asking the server). A two-part client has no output layer: its draft row is left out.
  On these random models the early exit agrees with the whole model ~85-90% of the time (GPT-2
  small, 1-2 blocks); a trained model's agrees less, unless it was trained to exit early.

Rows: local ``generate`` plain and with each drafting (no link), then for each RTT and split shape
the split plain and with each drafting. Every row's greedy tokens are checked against local plain
decoding. RTT 0 is loopback (no emulation); a positive RTT runs the server across ``link.py``'s
emulated link (``--rate`` each way, the RTT added per packet; root only; ``--link-mode proxy``: the
user-space proxy of ``link_proxy.py`` instead: no root needed).

Targets (the issue): at 20 ms RTT, the split with prompt lookup >= 2x the split's plain tokens/s;
at RTT 0, the split with a drafting within 1.1x of local ``generate`` with the same drafting (ms/token).
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
    repeat_greedy,
    shared_cpu_threads,
    write_json,
)
from _linked import LinkedServer  # noqa: E402
from link import Link, LinkError  # noqa: E402

from lightning_split.split.build import ModelSource, build_model  # noqa: E402
from lightning_split.split.draft import early_exit_draft  # noqa: E402
from lightning_split.split.spec import SplitSpec  # noqa: E402

QUICK = dict(model="tiny", seq=16, new_tokens=48, steps=3, warmup=1)
FULL = dict(model="small", seq=32, new_tokens=64, steps=3, warmup=1)
SHAPES = ("u_shape", "two_part")


def draft_source(source: ModelSource, layers: int) -> ModelSource:
    """A smaller GPT-2 of the same vocabulary: ``layers`` blocks, a quarter of the width."""
    width = max(64, source.config["n_embd"] // 4)
    return ModelSource(source.target, {**source.config, "n_layer": layers, "n_embd": width, "n_head": 4},
                       seed=99, dtype=source.dtype)


def confident(draft: torch.nn.Module) -> torch.nn.Module:
    """A random model's next-token distribution is flat: Hugging Face's default confidence threshold
    (0.4) would end every draft after its first token, however often the drafts are right."""
    draft.generation_config.assistant_confidence_threshold = 0.0
    return draft


def repeating_prompt(model: torch.nn.Module, vocab: int, start: int, passage: int, device: str) -> torch.Tensor:
    """A start, the model's greedy continuation of it (``passage`` tokens), and the start again."""
    ids = torch.randint(3, vocab, (1, start), generator=torch.Generator().manual_seed(1)).to(device)
    said = greedy(model, ids, passage)
    return torch.cat([said, ids], dim=1)


def measure(name: str, model: torch.nn.Module, ids: torch.Tensor, drafting: dict[str, Any], args: Any,
            expected: torch.Tensor | None, split: Any = None) -> dict[str, Any]:
    """Median over ``args.steps`` runs (after ``args.warmup``) of one way of generating."""
    metrics: list[dict[str, Any]] = []

    def read_metrics() -> None:
        if split is not None and model.generation_metrics is not None:
            metrics.append(model.generation_metrics.as_dict())

    times, out = repeat_greedy(model, ids, args.new_tokens, args, split is not None, read_metrics, **drafting)
    seconds = median(times)
    row: dict[str, Any] = {"name": name, "ms_per_token": 1e3 * seconds / args.new_tokens,
                           "tokens_per_s": args.new_tokens / seconds, "generate_ms_all": [1e3 * t for t in times]}
    if expected is not None:
        row["tokens_match"] = bool(torch.equal(out, expected))
    if metrics:
        row.update({k: median([m[k] for m in metrics]) for k in
                    ("round_trips", "drafted", "accepted", "acceptance_rate", "tokens_per_round_trip")})
    print(f"  {name:<34} {row['ms_per_token']:8.2f} ms/token {row['tokens_per_s']:8.1f} tokens/s"
          + (f"  {row['tokens_per_round_trip']:.2f} tokens/round trip, acceptance {row['acceptance_rate']:.2f}"
             if metrics else ""), flush=True)
    return row


def split_rows(server: SplitServer, source: ModelSource, spec: SplitSpec, label: str, ids: torch.Tensor,
               draftings: dict[str, dict[str, Any]], expected: torch.Tensor, args: Any) -> list[dict[str, Any]]:
    split = server.connect(source, spec, args.device)
    try:
        model = split.model.eval()
        if args.draft == "self" and "draft model" in draftings:
            draftings = dict(draftings)
            if spec.shape == "u_shape":  # the client's own first blocks and output layer (split/draft.py)
                draftings["draft model"] = {"assistant_model": confident(split.early_exit_draft(args.draft_layers))}
            else:  # a two-part client has no output layer to exit to
                del draftings["draft model"]
        return [measure(f"{label} {kind}", model, ids, drafting, args, expected, split) | {"drafting": kind}
                for kind, drafting in draftings.items()]
    finally:
        split.close()


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per run (default 64; quick 48)")
    p.add_argument("--rtts", type=float, nargs="+", default=[0, 20, 80], help="round trips (ms); 0: loopback")
    p.add_argument("--rate", default="1gbit", help="the link's rate each way, for RTTs > 0")
    p.add_argument("--link-mode", choices=("tun", "proxy"), default="tun",
                   help="how RTTs > 0 are emulated (link.py): tun (root, packets) or proxy (link_proxy.py: "
                        "user space, any host)")
    p.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    p.add_argument("--lookup", type=int, default=10, help="prompt_lookup_num_tokens")
    p.add_argument("--draft-layers", type=int, default=2, help="blocks of the assistant model")
    p.add_argument("--draft", choices=("small", "self"), default="small",
                   help="the assistant: a smaller random GPT-2, or the target's own first blocks (early exit)")
    p.add_argument("--draftings", nargs="+", choices=("plain", "prompt lookup", "draft model"),
                   default=["plain", "prompt lookup", "draft model"], help="the rows to run (plain always)")
    args = finish_args(p.parse_args(argv), QUICK, FULL)
    t_start = time.perf_counter()
    source = model_source(args.model, args.dtype)
    vocab = source.config["vocab_size"]
    local = build_model(source, device=args.device).eval()
    # Local rows with --draft self: the local model's own first blocks (the same early exit as the
    # split client's, split/draft.py, on the whole model's modules).
    draft = (confident(early_exit_draft(local, SplitSpec(cut=args.draft_layers).resolve(local),
                                        args.draft_layers)) if args.draft == "self"
             else build_model(draft_source(source, args.draft_layers), device=args.device).eval())
    draftings = {"plain": {}, "prompt lookup": {"prompt_lookup_num_tokens": args.lookup},
                 "draft model": {"assistant_model": draft}}
    draftings = {k: v for k, v in draftings.items() if k == "plain" or k in args.draftings}
    ids = repeating_prompt(local, vocab, args.seq, args.new_tokens + 8, args.device)
    print(f"speculative: GPT-2 {args.model} ({source.config['n_layer']} x {source.config['n_embd']}), prompt "
          f"{ids.shape[1]} (start {args.seq}, passage {args.new_tokens + 8}, start again), {args.new_tokens} new "
          f"tokens, draft ({args.draft}) {args.draft_layers} x {draft.config.n_embd}, lookup {args.lookup}, "
          f"{args.device} {args.dtype}, median of {args.steps}", flush=True)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        expected = greedy(local, ids, args.new_tokens)
        rows += [measure(f"local {kind}", local, ids, d, args, expected) | {"drafting": kind, "rtt_ms": None}
                 for kind, d in draftings.items()]
        with pki_dir() as pki:
            for rtt in args.rtts:
                with contextlib.ExitStack() as stack:
                    link = None
                    if rtt > 0:
                        try:
                            link = stack.enter_context(Link(args.rate, rtt, args.link_mode))
                        except LinkError as e:
                            print(f"speculative: RTT {rtt:g} ms: {e}", file=sys.stderr)
                            return 2
                        measured = link.measure()
                        print(f"  link {args.rate}, RTT {rtt:g} ms: measured {measured}", flush=True)
                    for shape in args.shapes:
                        spec = SplitSpec(cut=args.cut, shape=shape)
                        threads = shared_cpu_threads() if torch.device(args.device).type == "cpu" else None
                        server = (LinkedServer(link, pki, source, spec, args.device) if link is not None
                                  else SplitServer(pki, source, spec, args.device, threads))
                        with contextlib.closing(server):
                            label = f"split {shape} RTT {rtt:g}"
                            rows += [r | {"rtt_ms": rtt, "shape": shape}
                                     for r in split_rows(server, source, spec, label, ids, draftings, expected, args)]
                        # every row so far, should a long run be cut short
                        write_json(json_path(args, "speculative"), args, {"rows": rows, "partial": True})
    return report(args, rows, t_start)


def report(args: Any, rows: list[dict[str, Any]], t_start: float) -> int:
    local = {r["drafting"]: r for r in rows if r["rtt_ms"] is None}
    plain = {(r["rtt_ms"], r.get("shape")): r for r in rows if r["drafting"] == "plain" and r["rtt_ms"] is not None}
    table, targets = [], []
    for r in rows:
        split = r["rtt_ms"] is not None
        r["x_split_plain"] = r["tokens_per_s"] / plain[(r["rtt_ms"], r["shape"])]["tokens_per_s"] if split else None
        r["x_local_same_drafting"] = r["ms_per_token"] / local[r["drafting"]]["ms_per_token"] if split else None
        table.append([r["name"], f"{r['ms_per_token']:.2f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['x_split_plain']:.2f}" if split else "-",
                      f"{r['x_local_same_drafting']:.2f}" if split else "-",
                      f"{r['tokens_per_round_trip']:.2f}" if "tokens_per_round_trip" in r else "-",
                      f"{r['acceptance_rate']:.2f}" if r.get("drafted") else "-",
                      {True: "yes", False: "NO"}[r["tokens_match"]]])
        if split and r["rtt_ms"] == 20 and r["drafting"] == "prompt lookup":
            targets.append({"what": f"{r['name']}: tokens/s >= 2x split plain", "value": r["x_split_plain"],
                            "met": r["x_split_plain"] >= 2.0})
        if split and r["rtt_ms"] == 0 and r["drafting"] != "plain":
            targets.append({"what": f"{r['name']}: ms/token <= 1.1x local {r['drafting']}",
                            "value": r["x_local_same_drafting"], "met": r["x_local_same_drafting"] <= 1.1})
    print_table(f"speculative decoding, GPT-2 {args.model}, {args.new_tokens} new tokens, {args.device} "
                f"{args.dtype}, link {args.rate} for RTT > 0",
                ["row", "ms/token", "tokens/s", "x split plain", "x local (same drafting)", "tokens/round trip",
                 "acceptance", "greedy = local"], table)
    for t in targets:
        print(f"target: {t['what']}: {t['value']:.2f} {'MET' if t['met'] else 'MISSED'}")
    out = write_json(json_path(args, "speculative"), args, {
        "environment": environment(args.device), "rows": rows, "targets": targets,
        "seconds": time.perf_counter() - t_start})
    print(f"\nwrote {out} ({time.perf_counter() - t_start:.0f} s)")
    return 0 if all(r["tokens_match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
