"""Privacy report and defenses, through real split runs: a real Trainer.fit with SplitStrategy against
a SplitService behind an mTLS ChannelServer on loopback; tiny models, real text, seeded."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_split import SplitSpec, SplitStrategy
from lightning_split.examples.modules import CausalLM, Classifier
from lightning_split.privacy import Defenses, PrivacyReport, distance_correlation
from lightning_split.privacy.attacks import auc, rouge_l
from lightning_split.privacy.defenses import clip_tokens, protect_labels
from lightning_split.split.build import ModelSource
from tests.split_cases import GPT2

SEQ = 32
DIGITS_MLP = ModelSource("lightning_split.examples.models:mlp",
                         dict(in_features=64, hidden=32, depth=4, out_features=2), seed=6)


def _text() -> tuple[torch.Tensor, torch.Tensor]:
    """(client, public) windows of the Python docs' topics as ASCII bytes (GPT2's vocabulary is 128):
    the client's from the first pages, the public ones (the server's own text) from the last."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    data = torch.tensor([b if b < 128 else ord("?") for b in text.encode()], dtype=torch.long)
    windows = data[: len(data) // SEQ * SEQ].view(-1, SEQ)
    return windows[:1000], windows[-512:]


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, labelled 1 for a zero (a tenth of them: the norm attack's imbalance)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, (torch.tensor(d.target) == 0).long()


@pytest.fixture(scope="module")
def serve(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``serve(source, spec) -> address``: a SplitService behind an mTLS server, one per (source, spec)."""
    from lightning_split.channel import ChannelServer, server_tls
    from lightning_split.server.service import SplitService

    servers: dict[Any, Any] = {}

    def _serve(source: ModelSource, spec: SplitSpec) -> str:
        key = (source.target, repr(spec))
        if key not in servers:
            service = SplitService(source, spec, state_dir=tmp_path_factory.mktemp("state"))
            servers[key] = ChannelServer(service, "127.0.0.1:0", tls=server_tls(pki))
            servers[key].start()
        return f"127.0.0.1:{servers[key].port}"

    yield _serve
    for server in servers.values():
        server.stop(grace=0)


def _fit(address: str, pki: Path, root: Path, module: L.LightningModule, data: Any, batch_size: int,
         report: PrivacyReport, privacy: Any, steps: int) -> L.Trainer:
    from lightning_split.channel import client_tls

    L.seed_everything(0, verbose=False)
    strategy = SplitStrategy(address=address, node_id="alice", tls=client_tls(pki, "alice"), device="cpu",
                             tail="trainable", privacy=privacy)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, strategy=strategy,
                        logger=CSVLogger(root, name="run"), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[report], default_root_dir=root, log_every_n_steps=1)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    try:
        trainer.fit(module, loader)
    finally:
        strategy.close()
    return trainer


@pytest.fixture(scope="module")
def text_runs(serve: Any, pki: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same 30 steps of GPT-2 (two-part, cut after block 0) undefended and with each defense."""
    client, public = _text()
    address = serve(GPT2, SplitSpec(cut=1, shape="two_part"))
    variants = {"none": None, "noise": {"clip": "auto", "noise": 1.0, "seed": 0},  # the dict form, as Hydra gives
                "nopeek": Defenses(nopeek=2.0, seed=0)}
    runs = {}
    for name, privacy in variants.items():
        module = CausalLM(lr=1e-3, optimizer="Adam")
        report = PrivacyReport(public, attack_steps=200, held_out_batches=8)
        root = tmp_path_factory.mktemp(f"text-{name}")
        trainer = _fit(address, pki, root, module, torch.utils.data.TensorDataset(client), 8, report, privacy, 30)
        runs[name] = {"report": report.report, "path": report.path, "trainer": trainer,
                      "loss": float(trainer.callback_metrics["train_loss"])}
    return runs


def test_report_runs_inside_fit_and_the_attacker_beats_chance(text_runs: dict[str, Any]) -> None:
    run = text_runs["none"]
    report, trainer = run["report"], run["trainer"]
    inv = report["inversion"]
    assert inv["kind"] == "text" and inv["held_out_rows"] == 64 and report["activation_shape"] == [SEQ, 64]
    # A decoder trained only on the server's own text recovers the client's tokens from the activations.
    assert inv["token_accuracy"] > inv["chance_token_accuracy"] + 0.5
    assert inv["rouge_l"] > inv["chance_rouge_l"] + 0.5
    assert report["dcor"] > 0.6
    # Two-part with labels: they cross with every FORWARD; nothing to infer, and the report says so.
    assert report["label_leakage"]["labels_sent_to_server"] is True
    # Written beside the checkpoints (the logger's folder), with its plot; metrics in the logger.
    assert run["path"] == Path(trainer.log_dir) / "privacy_report.json"
    assert json.loads(run["path"].read_text())["inversion"]["token_accuracy"] == inv["token_accuracy"]
    assert run["path"].with_suffix(".png").stat().st_size > 1000
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("privacy/inversion_token_accuracy")]
    assert float(logged[-1]["privacy/inversion_token_accuracy"]) == pytest.approx(inv["token_accuracy"])


def test_noise_defense_is_scored_against_a_retrained_attacker(text_runs: dict[str, Any]) -> None:
    none, noise = text_runs["none"]["report"], text_runs["noise"]["report"]
    defenses = noise["defenses"]
    assert defenses["clip_value"] > 0 and defenses["noise_std"] == pytest.approx(1.0 * defenses["clip_value"])
    # The attacker retrained on noised public activations falls to about chance.
    assert noise["inversion"]["token_accuracy"] < none["inversion"]["token_accuracy"] - 0.5
    assert noise["inversion"]["token_accuracy"] < noise["inversion"]["chance_token_accuracy"] + 0.1
    assert noise["inversion"]["rouge_l"] < none["inversion"]["rouge_l"] - 0.4
    # The cost: training on noised activations ends with a higher loss than without.
    assert text_runs["noise"]["loss"] > text_runs["none"]["loss"]


def test_nopeek_penalty_decorrelates_what_is_sent(text_runs: dict[str, Any]) -> None:
    none, nopeek = text_runs["none"]["report"], text_runs["nopeek"]["report"]
    assert nopeek["dcor"] < none["dcor"] - 0.3
    assert nopeek["inversion"]["token_accuracy"] < none["inversion"]["token_accuracy"] - 0.2
    trainer = text_runs["nopeek"]["trainer"]
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        steps = [float(row["privacy/dcor"]) for row in csv.DictReader(f) if row.get("privacy/dcor")]
    assert len(steps) >= 25 and steps[-1] < steps[0] - 0.3  # the penalty's dCor, step by step


@pytest.fixture(scope="module")
def label_runs(serve: Any, pki: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A binary classifier, two-part, the loss on the client (the server returns logits and gets
    their gradient back): undefended and with label protection."""
    x, y = _digits()
    address = serve(DIGITS_MLP, SplitSpec(cut=1, shape="two_part"))
    runs = {}
    for name, privacy in {"none": None, "protected": Defenses(label_noise=3.0, seed=0)}.items():
        module = Classifier(lr=0.01, optimizer="Adam")
        report = PrivacyReport(x[1500:], attack_steps=200)  # public: other digits than the client's
        _fit(address, pki, tmp_path_factory.mktemp(f"labels-{name}"), module,
             torch.utils.data.TensorDataset(x[:1500], y[:1500]), 32, report, privacy, 40)
        runs[name] = report.report
    return runs


def test_label_leakage_two_part_is_high_and_drops_with_protection(label_runs: dict[str, Any]) -> None:
    none, protected = label_runs["none"]["label_leakage"], label_runs["protected"]["label_leakage"]
    assert none["batches"] >= 30
    assert none["norm_auc"] > 0.9 and none["cosine_auc"] > 0.95
    assert protected["norm_auc"] < none["norm_auc"] - 0.25
    assert protected["cosine_auc"] < none["cosine_auc"] - 0.25


def test_inputs_reconstruction_beats_the_public_mean(label_runs: dict[str, Any]) -> None:
    inv = label_runs["none"]["inversion"]
    assert inv["kind"] == "inputs" and inv["reconstruction_mse"] < 0.8 * inv["baseline_mse"]


def test_report_needs_a_split_run() -> None:
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[PrivacyReport(torch.zeros(4, 8, dtype=torch.long))])
    module = Classifier(torch.nn.Linear(64, 2))
    x, y = _digits()
    with pytest.raises(ValueError, match="SplitStrategy"):
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:8], y[:8]), batch_size=4))


# -- the measures and defenses themselves -------------------------------------------------------------

def test_distance_correlation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert float(distance_correlation(x, 3 * x @ rotation + 1)) == pytest.approx(1.0, abs=1e-3)
    # Independent < weakly dependent < strongly dependent (the sample statistic is biased up with
    # the dimension: about 0.44 for independent 16-d rows, 0.16 for 2-d ones at this n).
    low = x[:, :2]
    independent = float(distance_correlation(low, torch.randn(256, 2, generator=g)))
    weak = float(distance_correlation(low, low + 2 * torch.randn(256, 2, generator=g)))
    strong = float(distance_correlation(low, low + 0.5 * torch.randn(256, 2, generator=g)))
    assert independent < 0.25 < weak + 0.1 < strong < 0.95


def test_auc_and_rouge_l() -> None:
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (200,), generator=g).float()  # ties
    labels = (torch.rand(200, generator=g) < 0.3).long()
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))
    assert auc(torch.arange(4.0), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auc(scores, torch.zeros(200)) is None
    assert rouge_l(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 3, 2, 4]])) == pytest.approx(0.75)


def test_clip_and_label_noise_shapes() -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(4, 10, 8, generator=g) * torch.rand(4, 10, 1, generator=g) * 5
    clipped = clip_tokens(h, 1.5)
    assert float(clipped.norm(dim=-1).max()) <= 1.5 + 1e-5
    small = h.norm(dim=-1) <= 1.5
    torch.testing.assert_close(clipped[small], h[small])
    with pytest.raises(ValueError, match="clip"):
        Defenses(noise=0.5)
    # Label protection: zero-mean (the expected gradient is unchanged), norms brought to the batch's largest.
    grads = torch.randn(16, 6, generator=g) * torch.linspace(0.1, 2, 16)[:, None]
    draws = torch.stack([protect_labels(grads, 1.0, generator=g) for _ in range(2000)])
    torch.testing.assert_close(draws.mean(0), grads, atol=0.15, rtol=0)
    norms = draws.norm(dim=-1).pow(2).mean(0).sqrt()
    assert float(norms.min()) > float(grads.norm(dim=-1).max()) * 0.9


def test_defenses_from_the_hydra_config() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_split.apps import PACKAGE

    with initialize_config_dir(config_dir=str(PACKAGE / "conf"), version_base=None):
        off = compose(config_name="train")
        on = compose(config_name="train", overrides=["client.privacy={clip:auto,noise:0.5,nopeek:0.1,label_noise:2}"])
    assert off.client.privacy is None and SplitStrategy(privacy=off.client.privacy).privacy is None
    strategy = SplitStrategy(privacy=OmegaConf.to_container(on.client.privacy))
    assert strategy.privacy == Defenses(clip="auto", noise=0.5, nopeek=0.1, label_noise=2.0)


def test_public_python_docs_fit_the_vocabulary() -> None:
    from lightning_split.privacy.public import python_docs

    ids = python_docs(seq_len=32, rows=10, vocab_size=128)
    assert ids.shape == (10, 32) and int(ids.max()) < 128 and int(ids.min()) >= 0
