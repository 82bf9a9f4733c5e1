"""A privacy report's outputs: flat metrics, a table, a plot, the JSON file, and the loggers.

Every Lightning logger gets ``log_metrics``; one with ``log_table`` / ``log_image`` (W&B, Neptune)
gets the table and the plot too, TensorBoard's writer its ``add_text`` / ``add_figure``. The JSON
and the PNG are written beside the checkpoints (``trainer.log_dir``, else ``default_root_dir``),
whatever the logger.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COLUMNS = ["measure", "value", "chance", "what it means"]


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers as ``privacy/...`` scalars for ``log_metrics``."""
    out: dict[str, float] = {}
    for key, value in (report.get("inversion") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"privacy/inversion_{key}"] = float(value)
    if report.get("dcor") is not None:
        out["privacy/dcor"] = float(report["dcor"])
    leak = report.get("label_leakage") or {}
    for key in ("norm_auc", "cosine_auc"):
        if leak.get(key) is not None:
            out[f"privacy/label_{key}"] = float(leak[key])
    if leak.get("labels_sent_to_server"):
        out["privacy/labels_sent_to_server"] = 1.0
    noise = (report.get("defenses") or {}).get("noise_std")
    if noise is not None:
        out["privacy/noise_std"] = float(noise)
    return out


def table_rows(report: dict[str, Any]) -> list[list[Any]]:
    """(measure, value, chance, what it means) for each measure the report holds."""
    rows: list[list[Any]] = []
    inv = report.get("inversion") or {}
    if "token_accuracy" in inv:
        rows.append(["inversion token accuracy", inv["token_accuracy"], inv["chance_token_accuracy"],
                     "share of the client's tokens a server-side decoder recovers from the activations"])
        rows.append(["inversion ROUGE-L", inv["rouge_l"], inv["chance_rouge_l"],
                     "longest common subsequence of recovered and true text, F-measure"])
    if "reconstruction_mse" in inv:
        rows.append(["reconstruction MSE", inv["reconstruction_mse"], inv["baseline_mse"],
                     "error of the server's reconstruction of the inputs (chance: the public mean)"])
    if report.get("dcor") is not None:
        rows.append(["distance correlation", report["dcor"], 0.0,
                     "dependence of the activations sent on the inputs (0: none, 1: a rotation of them)"])
    leak = report.get("label_leakage") or {}
    if leak.get("labels_sent_to_server"):
        rows.append(["labels sent to the server", 1.0, 0.5, "a two-part split given labels sends them in the clear"])
    for key, name in (("norm_auc", "norm"), ("cosine_auc", "direction")):
        if leak.get(key) is not None:
            rows.append([f"label leakage AUC ({name} attack)", leak[key], 0.5,
                         "how well the server ranks examples by label from the gradients it receives"])
    return rows


def format_table(rows: list[list[Any]]) -> str:
    """A Markdown table (TensorBoard renders it; a log file reads it as text)."""
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Each measure beside its chance level, and the attacker's training loss; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in table_rows(report) if not str(r[0]).startswith("reconstruction")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r[0] for r in rows]
    y = range(len(rows))
    left.barh([i + 0.2 for i in y], [r[1] for r in rows], height=0.4, label="measured")
    left.barh([i - 0.2 for i in y], [r[2] for r in rows], height=0.4, label="chance", color="lightgray")
    left.set_yticks(list(y), names)
    left.set_xlim(0, 1)
    left.legend(loc="lower right")
    split = report.get("split") or {}
    left.set_title(f"what crosses the cut reveals (cut {split.get('cut')}, {split.get('shape')})")
    losses = report.get("attack_losses") or []
    right.plot(losses)
    right.set_xlabel("attacker step")
    right.set_ylabel("training loss")
    right.set_title("inversion attacker, trained on public data")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_dir(trainer: Any) -> Path:
    """Beside the checkpoints: the logger's folder, else the Trainer's root folder."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def write(report: dict[str, Any], directory: Path, filename: str, with_plot: bool = True) -> tuple[Path, Path | None]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(json.dumps(report, indent=2, default=float))
    picture = plot(report, path.with_suffix(".png")) if with_plot else None
    return path, picture


def to_loggers(trainer: Any, report: dict[str, Any], picture: Path | None) -> None:
    """Metrics to every logger; the table and the plot to those that take them."""
    metrics, rows = flat_metrics(report), table_rows(report)
    text = format_table(rows)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        try:  # presentation only: a logger that refuses a table must not fail the finished run
            if hasattr(logger, "log_table"):
                logger.log_table(key="privacy/report", columns=COLUMNS, data=rows)
            if picture is not None and hasattr(logger, "log_image"):
                logger.log_image(key="privacy/report", images=[str(picture)])
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("privacy/report", text, trainer.global_step)
            if picture is not None and hasattr(experiment, "add_figure"):
                import matplotlib.image as mpimg
                import matplotlib.pyplot as plt

                fig = plt.figure()
                plt.imshow(mpimg.imread(picture))
                plt.axis("off")
                experiment.add_figure("privacy/report", fig, trainer.global_step)
        except Exception as e:  # noqa: BLE001
            log.warning("privacy report: %s did not take the table or plot (%s); they are in %s",
                        type(logger).__name__, e, picture.parent if picture else "the JSON")
    log.info("privacy report\n%s", text)
