"""PrivacyReport: what this run's split leaks, measured at the end of ``fit``.

A Lightning callback for a Trainer with SplitStrategy. During ``fit`` it keeps the last
``held_out_batches`` batches' activations *as the server received them* (the runner's last send
hook, after any defense) with the inputs they came from, and for each batch the gradients the
client sent back (a BACKWARD) with its labels. When training ends it

1. runs ``public`` data (text or inputs the server could own: another slice than the client's)
   through the client's part and the same defenses, locally (nothing is sent), and trains the
   inversion attacker on those pairs (``attacks.py``);
2. scores it on the held-out client batches: token accuracy and ROUGE-L (text) or reconstruction
   MSE (other inputs), each beside an attacker who knows only the public data;
3. measures the distance correlation between the client's inputs and what it sent;
4. scores the label-leakage attacks on the gradients the client sent (binary labels), or records
   that a two-part split sent its labels in the clear;

then writes ``privacy_report.json`` and a plot beside the checkpoints, the metrics to every logger
(``privacy/...``), and the table to the loggers that take one (``publish.py``). ``report`` holds
the result. The attacker is retrained for each run: so a defense is scored against an attacker
that trained on the defended activations, as the server would.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from lightning_split.privacy import publish
from lightning_split.privacy.attacks import LabelLeakage, invert
from lightning_split.privacy.defenses import distance_correlation, paired_rows

log = logging.getLogger(__name__)


class _Stop(BaseException):  # noqa: N818 - control flow: the client's forward ends at the cut
    """Raised by the capture runner once it has the cut's activations (a BaseException, like
    HandOff, so that no ``except Exception`` in a model's forward swallows it)."""


def default_inputs(batch: Any) -> torch.Tensor:
    """A batch's model input: the tensor itself, the first of a tuple, or ``input_ids``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch.get("input_ids", next(iter(batch.values())))
    return batch[0]


def default_labels(batch: Any) -> torch.Tensor | None:
    """A batch's class labels: the second of a tuple when it is a vector of integers, else None."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        y = batch[1]
        if isinstance(y, torch.Tensor) and y.dim() == 1 and not y.is_floating_point():
            return y
    if isinstance(batch, dict) and isinstance(batch.get("labels"), torch.Tensor) and batch["labels"].dim() == 1:
        return batch["labels"]
    return None


def default_call(model: torch.nn.Module, x: torch.Tensor) -> Any:
    """Run ``model`` on public inputs: token ids by keyword for a Hugging Face model."""
    if not x.is_floating_point() and hasattr(model, "config"):
        return model(input_ids=x)
    return model(x)


class PrivacyReport(Callback):
    """Measure the run's leakage at the end of ``fit`` (module docstring).

    Args:
        public: data the server could own, in the client's input format: token ids (N, T) for text,
            or inputs (N, ...) otherwise. A different slice from the client's training data.
        held_out_batches: the client's last batches whose activations the attacker is scored on.
        attack_steps, attack_batch, attack_lr, attack_hidden: the inversion attacker's training.
        public_batch: batch size for running ``public`` through the client's part.
        inputs_of, labels_of: a batch's inputs and binary labels (defaults: ``default_inputs``,
            ``default_labels``); labels_of returning None skips label leakage.
        call: how to run the client's model on a public batch (default: ``default_call``).
        dcor_rows: rows (tokens) per batch for the distance correlation.
        filename: the JSON file's name (the plot: the same with ``.png``).
        seed: the attacker's initialisation and sampling.
    """

    def __init__(self, public: torch.Tensor, *, held_out_batches: int = 8, attack_steps: int = 300,
                 attack_batch: int = 256, attack_lr: float = 2e-3, attack_hidden: int = 256, public_batch: int = 16,
                 inputs_of: Callable[[Any], torch.Tensor] | None = None,
                 labels_of: Callable[[Any], torch.Tensor | None] | None = None,
                 call: Callable[[torch.nn.Module, torch.Tensor], Any] | None = None, dcor_rows: int = 512,
                 filename: str = "privacy_report.json", plot: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.public = public
        self.held: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=held_out_batches)
        self.attack = dict(steps=attack_steps, batch=attack_batch, lr=attack_lr, hidden=attack_hidden, seed=seed)
        self.public_batch = public_batch
        self.inputs_of = inputs_of or default_inputs
        self.labels_of = labels_of or default_labels
        self.call = call or default_call
        self.dcor_rows = dcor_rows
        self.filename = filename
        self.with_plot = plot
        self.seed = seed
        self.report: dict[str, Any] | None = None  # the last fit's, once it ended
        self.path: Path | None = None  # where its JSON went
        self._split: Any = None  # the strategy's SplitModel, from on_fit_start
        self._leakage = LabelLeakage()
        self._labels_sent = False
        self._armed = False
        self._sent: torch.Tensor | None = None
        self._grads: list[torch.Tensor] = []
        self._batch_started = 0.0
        self._batch_ms: list[float] = []

    # -- the taps on the send path ----------------------------------------------------------------

    def _on_send(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._armed:
            self._sent = hidden.detach()
            self._labels_sent |= self._split.proxy.extra.get("labels") is not None
        return hidden

    def _on_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        if self._armed:
            self._grads.append(grad.detach())
        return grad

    # -- Lightning hooks --------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        split = getattr(trainer.strategy, "split", None)
        if split is None or not hasattr(split, "runner"):
            raise ValueError("PrivacyReport measures a split run: use it with Trainer(strategy=SplitStrategy(...))")
        self._split = split
        # Last: after the defenses (Defenses.attach puts its hooks first), so it sees what leaves.
        if self._on_send not in split.runner.send_hooks:
            split.runner.send_hooks.append(self._on_send)
            split.runner.gradient_hooks.append(self._on_gradient)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._armed, self._sent, self._grads = True, None, []
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch_ms.append(1e3 * (time.perf_counter() - self._batch_started))
        self._armed = False
        if self._sent is not None:
            inputs = self.inputs_of(batch)
            if inputs.shape[0] == self._sent.shape[0]:
                self.held.append((self._sent.to("cpu", copy=True), inputs.detach().to("cpu", copy=True)))
        labels = self.labels_of(batch)
        if self._grads and labels is not None:
            self._leakage.add(self._grads[-1].cpu(), labels)
        self._sent, self._grads = None, []

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.report = self.measure(trainer)
        if trainer.is_global_zero:
            self.path, picture = publish.write(self.report, publish.report_dir(trainer), self.filename, self.with_plot)
            publish.to_loggers(trainer, self.report, picture)

    # -- measuring --------------------------------------------------------------------------------

    def measure(self, trainer: Any) -> dict[str, Any]:
        """The report (module docstring) from what this run kept."""
        split = self._split
        defenses = getattr(trainer.strategy, "privacy", None)
        report: dict[str, Any] = {
            "split": {k: getattr(split.split, k) for k in ("shape", "cut", "end")},
            "defenses": defenses.describe() if defenses is not None else None,
            "steps": trainer.global_step,
            "ms_per_batch": statistics.median(self._batch_ms) if self._batch_ms else None,
        }
        held = self._held_pairs()
        if held is not None:
            held_h, held_x = held
            public_h = self._public_activations(split)
            classes = getattr(getattr(split.model, "config", None), "vocab_size", None)
            result = invert(public_h, self.public, held_h, held_x, classes, **self.attack)
            report["activation_shape"] = list(held_h.shape[1:])
            report["inversion"] = {"kind": result.kind, **result.metrics, "public_rows": len(self.public),
                                   "held_out_rows": len(held_x), "attack_steps": self.attack["steps"]}
            report["attack_losses"] = result.train_losses
            report["dcor"] = self._dcor(split.model, held_h, held_x)
        report["label_leakage"] = self._label_leakage()
        return report

    def _held_pairs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept batches that share the last one's shape (a smaller last batch is fine)."""
        if not self.held:
            return None
        shape = self.held[-1][0].shape[1:], self.held[-1][1].shape[1:]
        pairs = [(h, x) for h, x in self.held if (h.shape[1:], x.shape[1:]) == shape]
        return torch.cat([h for h, _ in pairs]), torch.cat([x for _, x in pairs])

    def _public_activations(self, split: Any) -> torch.Tensor:
        """``public`` through the client's part and the defenses, as the server would receive it;
        locally: the proxy's runner is swapped for one that stops the forward at the cut."""
        model, proxy, hooks = split.model, split.proxy, [h for h in split.runner.send_hooks if h != self._on_send]
        out: list[torch.Tensor] = []

        def capture(hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> Any:
            for hook in hooks:
                hidden = hook(hidden)
            out.append(hidden.detach().cpu())
            raise _Stop

        device = next(model.parameters()).device
        runner, training = proxy.runner, model.training
        proxy.runner = capture
        model.eval()
        try:
            with torch.no_grad():
                for chunk in self.public.split(self.public_batch):
                    try:
                        self.call(model, chunk.to(device))
                    except _Stop:
                        pass
        finally:
            proxy.runner = runner
            model.train(training)
        return torch.cat(out)

    @torch.no_grad()
    def _dcor(self, model: torch.nn.Module, held_h: torch.Tensor, held_x: torch.Tensor) -> float | None:
        """Distance correlation of the held-out inputs (token embeddings for text) and activations."""
        inputs = held_x
        if not held_x.is_floating_point():
            embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if embed is None:
                return None
            device = next(embed.parameters()).device
            inputs = embed(held_x.to(device)).cpu()
        g = torch.Generator().manual_seed(self.seed)
        x, z = paired_rows(inputs, held_h, self.dcor_rows, g)
        return float(distance_correlation(x, z))

    def _label_leakage(self) -> dict[str, Any] | None:
        if self._labels_sent:
            # Nothing to infer: each FORWARD carried the labels (the server computes the loss).
            return {"labels_sent_to_server": True, "norm_auc": None, "cosine_auc": None,
                    "note": "a two-part split given labels sends them with every FORWARD; keep them on the "
                            "client with SplitSpec(shape='u_shape') (or a two-part split that asks for logits), "
                            "then protect the gradients it sends with Defenses(label_noise=...)"}
        return self._leakage.result()
