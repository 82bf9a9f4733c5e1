"""What the split leaks, by cut depth, and what each defense buys at what cost.

Part 1, inversion: a GPT-2 trained from scratch through the split (two-part, trainable tail; the
client holds the embeddings and blocks ``[0:cut)``) on the Python docs' topic pages as bytes
(``pydoc_data.topics``, a byte vocabulary of 256: the client's text is the first 60% of the pages),
for each cut, undefended and with each defense (``lightning_split.privacy.Defenses``). After each
run ``PrivacyReport`` trains an inversion attacker the way the server could: a decoder from the
cut's activations to tokens, on text the server owns (the last 30% of the pages, never the
client's) run through the client's part *and the same defense*, and scores it on the client's last
batches as the server received them. Reported: token accuracy and ROUGE-L (beside an attacker who
guesses the most frequent byte), the distance correlation of inputs and activations, and the
costs: final training loss and held-out loss (60-70% of the pages, through the split with the
defense on) against undefended, and ms per step.

Part 2, label leakage: a binary classifier (scikit-learn's digits, "is it a 0": a tenth of the
examples, the imbalance of Li et al.'s setting) split two-part with the loss on the client (the
server returns logits and receives their gradient), undefended and with label protection; the
norm and direction attacks' AUC on the gradients the server receives, held-out accuracy, ms/step.
A two-part split *given* labels (``model(x, labels=y)``) sends them in the clear: AUC 1 by
construction (a row says so); the U-shape keeps them on the client.

    python benchmarks/privacy.py --quick                       # tiny GPT-2 on CPU, cuts 1, 2, 3 (a few minutes)
    python benchmarks/privacy.py --device cuda --model small   # GPT-2 small's body (12 x 768), cuts 1, 2, 4, 6
    python benchmarks/privacy.py --quick --cuts 1 --steps 300 --no-labels --defenses none clip noise-0.01 nopeek-0.3 \
        --json benchmarks/results/privacy_tiny_cpu_cut1_300steps.json      # longer: the defenses as training adapts
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CLIENT_ID,
    SplitServer,
    base_parser,
    finish_args,
    json_path,
    pki_dir,
    print_table,
    quiet,
    write_json,
)

from lightning_split.split.build import ModelSource  # noqa: E402
from lightning_split.split.spec import SplitSpec  # noqa: E402

# GPT-2's shapes with a byte vocabulary (the text is bytes); dropout off.
BODIES = {"tiny": dict(n_layer=4, n_embd=128, n_head=4), "small": dict(n_layer=12, n_embd=768, n_head=12),
          "medium": dict(n_layer=24, n_embd=1024, n_head=16)}
# name -> Defenses(...) arguments (None: undefended). The noise multiplier is per coordinate, in
# units of the clip (the median token norm): noise 0.1 on 128 coordinates is a noise vector about
# 1.1 x a token's norm.
DEFENSES: dict[str, dict[str, Any] | None] = {
    "none": None,
    "clip": {"clip": "auto"},  # the clip alone: its share of the noise rows' utility cost
    "noise-0.01": {"clip": "auto", "noise": 0.01, "seed": 0},
    "noise-0.03": {"clip": "auto", "noise": 0.03, "seed": 0},
    "noise-0.1": {"clip": "auto", "noise": 0.1, "seed": 0},
    "nopeek-0.3": {"nopeek": 0.3, "seed": 0},
    "nopeek-2": {"nopeek": 2.0, "seed": 0},
}
LABEL_DEFENSES: dict[str, dict[str, Any] | None] = {
    "none": None, "label_noise-1": {"label_noise": 1.0, "seed": 0}, "label_noise-3": {"label_noise": 3.0, "seed": 0}}


def corpus(seq: int) -> dict[str, torch.Tensor]:
    """Windows of ``seq`` bytes: the client's training text, its held-out text, the server's own."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    n = len(data)
    windows = lambda d: d[: len(d) // seq * seq].view(-1, seq)  # noqa: E731
    return {"train": windows(data[: int(0.6 * n)]), "held": windows(data[int(0.6 * n): int(0.7 * n)]),
            "public": windows(data[int(0.7 * n):])}


def gpt2(body: str, seq: int) -> ModelSource:
    return ModelSource("transformers:GPT2LMHeadModel", dict(
        **BODIES[body], vocab_size=256, n_positions=seq, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0), seed=7)


class _Losses:
    """Each training step's task loss (``train_loss``, without the NoPeek penalty)."""

    def __init__(self) -> None:
        from lightning.pytorch.callbacks import Callback

        losses: list[float] = []

        class Recorder(Callback):
            def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
                losses.append(float(trainer.callback_metrics["train_loss"]))

        self.losses, self.callback = losses, Recorder()

    def final(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def fit(server: SplitServer, module: Any, data: Any, public: torch.Tensor, privacy: Any, args: Any,
        evaluate: Any) -> dict[str, Any]:
    """One Trainer.fit through the split with a PrivacyReport; ``evaluate(module)`` after it, while
    the split is still open (the held-out measure goes through it, defenses on)."""
    import lightning as L

    from lightning_split import SplitStrategy
    from lightning_split.channel import client_tls
    from lightning_split.privacy import PrivacyReport

    L.seed_everything(0, verbose=False)
    strategy = SplitStrategy(address=server.address, node_id=CLIENT_ID, tls=client_tls(server.pki, CLIENT_ID),
                             device=args.device, tail="trainable", privacy=privacy, log_transport=False)
    report = PrivacyReport(public, attack_steps=args.attack_steps, held_out_batches=args.held_out_batches,
                           plot=False)
    losses = _Losses()
    with tempfile.TemporaryDirectory(prefix="ls-privacy-") as root:
        trainer = L.Trainer(max_steps=args.steps, accelerator="gpu" if "cuda" in args.device else "cpu", devices=1,
                            strategy=strategy, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[report, losses.callback], default_root_dir=root,
                            log_every_n_steps=1)
        try:
            trainer.fit(module, data)
            extra = evaluate(module)
        finally:
            strategy.close()
    return {**report.report, "final_loss": losses.final(), **extra}


def inversion_sweep(args: Any, pki: Path) -> list[dict[str, Any]]:
    from lightning_split.examples.modules import CausalLM

    text = corpus(args.seq)
    public, held = text["public"][: args.public_rows], text["held"][: 8 * args.batch]
    src = gpt2(args.model, args.seq)
    rows = []
    for cut in args.cuts:
        spec = SplitSpec(cut=cut, shape="two_part")
        with SplitServer(pki, src, spec, args.device, cpu_threads=1 if args.device == "cpu" else None) as server:
            for name in args.defenses:
                data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(text["train"]), batch_size=args.batch,
                                                   shuffle=True, generator=torch.Generator().manual_seed(0))

                def held_out(module: Any) -> dict[str, float]:
                    model = module.model.eval()
                    rows = held.to(next(model.parameters()).device)  # Lightning's teardown moved it to the CPU
                    with torch.no_grad():
                        losses = [float(model(input_ids=rows[i:i + args.batch], labels=rows[i:i + args.batch]).loss)
                                  for i in range(0, len(rows), args.batch)]
                    return {"held_out_loss": sum(losses) / len(losses)}

                r = fit(server, CausalLM(lr=args.lr, optimizer="AdamW"), data, public, DEFENSES[name], args, held_out)
                r.pop("attack_losses", None)
                row = {"cut": cut, "defense": name, **r}
                rows.append(row)
                save_partial(args, {"inversion": rows})
                inv = r["inversion"]
                print(f"  cut {cut} {name:>20}: token accuracy {inv['token_accuracy']:.3f} (chance "
                      f"{inv['chance_token_accuracy']:.3f}), ROUGE-L {inv['rouge_l']:.3f}, dCor {r['dcor']:.3f}, "
                      f"loss {r['final_loss']:.3f} / held-out {r['held_out_loss']:.3f}, "
                      f"{r['ms_per_batch']:.1f} ms/step",
                      flush=True)
    return costs(rows)


def costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's utility and speed costs against the same cut's undefended run."""
    for row in rows:
        base = next(b for b in rows if b["cut"] == row["cut"] and b["defense"] == "none")
        row["loss_vs_none"] = row["final_loss"] / base["final_loss"]
        row["held_out_vs_none"] = row["held_out_loss"] / base["held_out_loss"]
        row["speed_vs_none"] = row["ms_per_batch"] / base["ms_per_batch"]
    return rows


def digits() -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, (torch.tensor(d.target) == 0).long()
    return {"x": x[:1200], "y": y[:1200], "public": x[1200:1500], "val_x": x[1500:], "val_y": y[1500:]}


def label_sweep(args: Any, pki: Path) -> list[dict[str, Any]]:
    from lightning_split.examples.modules import Classifier

    d = digits()
    src = ModelSource("lightning_split.examples.models:mlp", dict(in_features=64, hidden=128, depth=4, out_features=2),
                      seed=6)
    rows = []
    # Two-part with the loss on the client: the server returns logits and gets their gradient back.
    # U-shape: the client keeps the last layers and the loss; the server gets its output's gradient.
    setups = {"two-part, loss on the client": SplitSpec(cut=1, shape="two_part"), "u-shape": SplitSpec(cut=1, end=3)}
    for setup, spec in setups.items():
        with SplitServer(pki, src, spec, args.device, cpu_threads=1 if args.device == "cpu" else None) as server:
            for name, privacy in LABEL_DEFENSES.items():
                data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(d["x"], d["y"]), batch_size=32,
                                                   shuffle=True, generator=torch.Generator().manual_seed(0))

                def accuracy(module: Any) -> dict[str, float]:
                    model = module.model.eval()
                    with torch.no_grad():
                        pred = model(d["val_x"].to(next(model.parameters()).device)).argmax(-1).cpu()
                    return {"val_accuracy": float((pred == d["val_y"]).float().mean())}

                r = fit(server, Classifier(lr=0.01, optimizer="Adam"), data, d["public"], privacy,
                        argparse_copy(args, steps=args.label_steps), accuracy)
                leak = r["label_leakage"]
                r.pop("attack_losses", None)
                rows.append({"setup": setup, "defense": name, **r})
                save_partial(args, {"labels": rows})
                print(f"  labels, {setup}, {name:>14}: norm AUC {leak['norm_auc']:.3f}, direction AUC "
                      f"{leak['cosine_auc']:.3f}, accuracy {r['val_accuracy']:.3f}, {r['ms_per_batch']:.1f} ms/step",
                      flush=True)
    for row in rows:
        base = next(b for b in rows if b["setup"] == row["setup"] and b["defense"] == "none")
        row["speed_vs_none"] = row["ms_per_batch"] / base["ms_per_batch"]
        row["accuracy_vs_none"] = row["val_accuracy"] - base["val_accuracy"]
    return rows


def save_partial(args: Any, rows: dict[str, Any]) -> None:
    """Every finished row on disk as it comes (a long sweep cut short keeps what it measured)."""
    path, part = json_path(args, "privacy"), next(iter(rows))
    write_json(path.with_name(f"{path.stem}_partial_{part}.json"), args, {**rows, "partial": True})


def argparse_copy(args: Any, **changes: Any) -> Any:
    import argparse

    return argparse.Namespace(**{**vars(args), **changes})


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r["defense"] for r in rows):
        mine = [r for r in rows if r["defense"] == name]
        ax.plot([r["cut"] for r in mine], [r["inversion"]["token_accuracy"] for r in mine], marker="o", label=name)
    ax.plot([r["cut"] for r in rows if r["defense"] == "none"],
            [r["inversion"]["chance_token_accuracy"] for r in rows if r["defense"] == "none"], "k:", label="chance")
    ax.set_xticks(sorted({r["cut"] for r in rows}))
    ax.set_xlabel("cut (client blocks)")
    ax.set_ylabel("inversion token accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("server-side inversion attacker, retrained per defense")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--cuts", type=int, nargs="+", default=None, help="default: 1 2 3 (--quick), 1 2 4 6")
    p.add_argument("--defenses", nargs="+", choices=list(DEFENSES), default=list(DEFENSES))
    p.add_argument("--attack-steps", type=int, default=None)
    p.add_argument("--public-rows", type=int, default=None, help="windows of the server's own text to attack with")
    p.add_argument("--held-out-batches", type=int, default=4,
                   help="the client's last batches the attacker is scored on")
    p.add_argument("--label-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-labels", action="store_true", help="skip part 2 (label leakage)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: one table, plot and JSON (--json) from the rows of earlier runs "
                        "(a sweep run in parts under a time limit; each row keeps its own cut's undefended baseline)")
    p.set_defaults(device="cpu")
    args = finish_args(p.parse_args(argv),
                       quick={"model": "tiny", "steps": 100, "batch": 8, "seq": 64, "cuts": [1, 2, 3],
                              "attack_steps": 300, "public_rows": 512, "label_steps": 40},
                       full={"model": "small", "steps": 500, "batch": 8, "seq": 256, "cuts": [1, 2, 4, 6],
                             "attack_steps": 1500, "public_rows": 2048, "label_steps": 150})
    args.dtype = "fp32"  # the defenses' noise and the attacker in full precision
    quiet()
    # A time limit's SIGTERM ends the run at once (the rows so far are on disk): Lightning's Trainer
    # would only note it, and then wait on a server the same signal ended.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
    if args.merge:
        rows, label_rows, measured_on = merged(args.merge, args.steps)
        args.device = "cpu"  # nothing runs here; the JSON's environment is the runs' machine
        report(args, rows, label_rows, merged_from={"sources": args.merge, "environment": measured_on})
        return 0
    if args.device == "cpu":
        torch.set_num_threads(1)  # the server process gets the other core
    with pki_dir() as pki:
        rows = inversion_sweep(args, pki)
        label_rows = [] if args.no_labels else label_sweep(args, pki)
    report(args, rows, label_rows)
    return 0


def merged(paths: list[str], steps: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The inversion rows of several runs of ``steps`` training steps (a cut's rows from the last run
    that has its undefended row, so every ratio stays within one run) and the label rows of the
    last run that has them; and the machine they ran on (the first run's)."""
    rows, label_rows, environment = [], [], None
    for path in paths:
        doc = json.loads(Path(path).read_text())
        environment = environment or doc["environment"]
        found = [r for r in doc.get("inversion", []) if r["steps"] == steps]
        cuts_with_baseline = {r["cut"] for r in found if r["defense"] == "none"}
        rows = [r for r in rows if r["cut"] not in cuts_with_baseline]  # a later run of a cut replaces it
        rows += [dict(r, source=Path(path).name) for r in found if r["cut"] in cuts_with_baseline]
        label_rows = [dict(r, source=Path(path).name) for r in doc.get("labels", [])] or label_rows
    return costs(sorted(rows, key=lambda r: (r["cut"], list(DEFENSES).index(r["defense"])))), label_rows, environment


def report(args: Any, rows: list[dict[str, Any]], label_rows: list[dict[str, Any]],
           merged_from: dict[str, Any] | None = None) -> None:
    print_table(
        f"inversion of the cut's activations: GPT-2 {args.model} (byte vocabulary), two-part, trainable tail, "
        f"{args.steps} steps of {args.batch} x {args.seq} bytes; attacker retrained on each defense's activations",
        ["cut", "defense", "token acc", "chance", "ROUGE-L", "dCor", "noise std", "final loss", "x none",
         "held-out", "x none", "ms/step", "x none"],
        [[r["cut"], r["defense"], r["inversion"]["token_accuracy"], r["inversion"]["chance_token_accuracy"],
          r["inversion"]["rouge_l"], r["dcor"], (r["defenses"] or {}).get("noise_std") or 0.0,
          f"{r['final_loss']:.4f}", f"{r['loss_vs_none']:.3f}", f"{r['held_out_loss']:.4f}",
          f"{r['held_out_vs_none']:.3f}", f"{r['ms_per_batch']:.1f}", f"{r['speed_vs_none']:.2f}"] for r in rows])
    if label_rows:
        print_table(
            "label leakage from the gradients the server receives: digits 'is it a 0' (10% positive), MLP, "
            f"{args.label_steps} steps of 32",
            ["setup", "defense", "norm AUC", "direction AUC", "val accuracy", "ms/step", "x none"],
            [[r["setup"], r["defense"], r["label_leakage"]["norm_auc"], r["label_leakage"]["cosine_auc"],
              r["val_accuracy"], f"{r['ms_per_batch']:.1f}", f"{r['speed_vs_none']:.2f}"] for r in label_rows]
            + [["two-part given labels", "(sent in the clear)", 1.0, 1.0, "-", "-", "-"]])
    out = json_path(args, "privacy")
    picture = plot(rows, out.with_suffix(".png"))
    write_json(out, args, {"inversion": rows, "labels": label_rows,
                           "labels_given_to_a_two_part_split": "sent to the server in the clear with every FORWARD",
                           "plot": str(picture) if picture else None, **(merged_from or {})})
    print(f"\nwrote {out}" + (f" and {picture}" if picture else ""))


if __name__ == "__main__":
    sys.exit(main())
