"""Lightning features through SplitStrategy: loops, clipping, precision, checkpoints, loggers, LoRA."""

from __future__ import annotations

import copy
import csv
import threading

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_split import SplitSpec, SplitStrategy
from lightning_split.examples.modules import CausalLM, Classifier, digits_loaders
from lightning_split.split.build import build_model
from lightning_split.split.connect import open_split
from lightning_split.wire import MessageType
from tests.split_cases import GPT2
from tests.test_strategy import DIGITS_MLP, _gpt2_batches, _sessions_of, _strategy, _trainer

SPEC = SplitSpec(cut=1, end=3)


def test_fit_validate_test_predict(split_server, tmp_path):
    address, tls_for = split_server(DIGITS_MLP, SPEC)
    strategy = _strategy(address, tls_for("alice"), tail="trainable")
    module = Classifier(lr=1e-2, optimizer="Adam")
    train, val = digits_loaders(32, shuffle=True)
    logger = CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", strategy=strategy, logger=logger, log_every_n_steps=5,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, train, val)
    metrics = trainer.validate(module, val)[0]
    assert metrics["val_acc"] > 0.6  # it learned, through the server's trainable segment
    assert trainer.test(module, val)[0]["test_acc"] == pytest.approx(metrics["val_acc"], abs=1e-6)
    preds = torch.cat(trainer.predict(module, val))
    assert preds.shape == (len(val.dataset),)
    # The logger received transport metrics every logged step, and they make sense.
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("split/rtt_ms")]
    assert rows and float(rows[-1]["split/sent_MB"]) > 0 and float(rows[-1]["split/rtt_ms"]) > 0
    strategy.close()


def _fit_local_and_split(make_module, split_server, steps: int, **trainer_kw):  # noqa: ANN001, ANN202
    """Train the same module on the digits MLP locally and through a trainable split: the losses match.

    Returns (local module, split module, strategy); the caller closes the strategy.
    """
    local = make_module()
    local.model = build_model(DIGITS_MLP)
    trainer, local_rec = _trainer(steps=steps, **trainer_kw)
    trainer.fit(local, digits_loaders(32)[0])

    address, tls_for = split_server(DIGITS_MLP, SPEC)
    strategy = _strategy(address, tls_for("alice"), tail="trainable")
    split = make_module()
    trainer, split_rec = _trainer(strategy, steps=steps, **trainer_kw)
    trainer.fit(split, digits_loaders(32)[0])
    torch.testing.assert_close(torch.tensor(split_rec.losses), torch.tensor(local_rec.losses), rtol=1e-5, atol=1e-6)
    return local, split, strategy


def test_gradient_clipping_is_global(split_server):
    local, split, strategy = _fit_local_and_split(lambda: Classifier(lr=0.5), split_server, steps=4,
                                                  gradient_clip_val=0.05, accumulate_grad_batches=1)
    local_params = dict(local.named_parameters())
    for name, p in split.named_parameters():
        torch.testing.assert_close(p, local_params[name], rtol=1e-5, atol=1e-6, msg=name)
    strategy.close()


def test_gradient_clipping_is_global_with_fused_two_part_steps(split_server):
    """Two-part GPT-2, the loss on the server, each step fused (the server backpropagates with its
    forward), two accumulated batches (loss scale 1/2), and a clipping norm small enough to clip:
    the global norm takes the server's gradients after its scaled ones were applied."""
    spec = SplitSpec(cut=1, shape="two_part")
    local = CausalLM(lr=3e-3, optimizer="Adam")
    local.model = build_model(GPT2)
    local.model.lm_head.weight = torch.nn.Parameter(local.model.lm_head.weight.detach().clone())  # untied
    trainer, local_rec = _trainer(steps=4, gradient_clip_val=0.05)
    trainer.fit(local, _gpt2_batches())

    address, tls_for = split_server(GPT2, spec)
    strategy = _strategy(address, tls_for("alice"), tail="trainable")
    split = CausalLM(lr=3e-3, optimizer="Adam")
    trainer, split_rec = _trainer(strategy, steps=4, gradient_clip_val=0.05)
    trainer.fit(split, _gpt2_batches())
    assert strategy._clip_coef is not None and strategy._clip_coef < 1.0  # it did clip
    torch.testing.assert_close(torch.tensor(split_rec.losses), torch.tensor(local_rec.losses), rtol=1e-5, atol=1e-6)
    local_params = dict(local.named_parameters())
    for name, p in split.named_parameters():
        torch.testing.assert_close(p, local_params[name], rtol=1e-5, atol=1e-6, msg=name)
    (session,) = [s for s in _sessions_of(split_server) if s.id == strategy.split.client.session_id]
    for i, block in enumerate(session.state["segment"].module.blocks):
        for (n, p), (_, q) in zip(block.named_parameters(), local.model.transformer.h[1 + i].named_parameters(),
                                  strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"server block {i} {n}")
    strategy.close()


def test_bf16_mixed_precision_tracks_local(split_server):
    local = CausalLM(lr=3e-3)
    local.model = build_model(GPT2)
    trainer, local_rec = _trainer(precision="bf16-mixed", steps=3)
    trainer.fit(local, _gpt2_batches())

    address, tls_for = split_server(GPT2, SPEC)
    strategy = _strategy(address, tls_for("alice"), tail="trainable")
    trainer, split_rec = _trainer(strategy, precision="bf16-mixed", steps=3)
    trainer.fit(CausalLM(lr=3e-3), _gpt2_batches())
    # bf16 has 8 bits of mantissa; the split runs the same ops under the same autocast.
    torch.testing.assert_close(torch.tensor(split_rec.losses), torch.tensor(local_rec.losses), rtol=2e-2, atol=2e-2)
    strategy.close()


def test_checkpoint_resume_restores_both_sides(split_server, tmp_path):
    """Stop after 3 steps, resume in a new session from the checkpoint: same as resuming locally.

    The server's segment (trainable, Adam) is restored from the tag the client's checkpoint
    recorded; were it not, the resumed run would diverge from the local one.
    """
    address, tls_for = split_server(DIGITS_MLP, SPEC)

    def run(steps: int, split: bool, folder, ckpt_path=None) -> Classifier:  # noqa: ANN001
        strategy = _strategy(address, tls_for("alice"), tail="trainable") if split else "auto"
        module = Classifier(lr=0.1, optimizer="Adam")
        if not split:
            module.model = build_model(DIGITS_MLP)
        ckpt = ModelCheckpoint(dirpath=folder, every_n_train_steps=3, save_top_k=-1)
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", strategy=strategy, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[ckpt])
        trainer.fit(module, digits_loaders(32)[0], ckpt_path=ckpt_path)
        if split:
            (session,) = [s for s in _sessions_of(split_server) if s.id == strategy.split.client.session_id]
            # Kept outside the module's parameters: a plain attribute.
            module.__dict__["server_blocks"] = copy.deepcopy(session.state["segment"].module.blocks)
            strategy.close()
        return module

    run(3, split=False, folder=tmp_path / "local")
    local = run(6, split=False, folder=tmp_path / "local2", ckpt_path=str(tmp_path / "local" / "epoch=0-step=3.ckpt"))
    run(3, split=True, folder=tmp_path / "split")
    resumed = run(6, split=True, folder=tmp_path / "split2", ckpt_path=str(tmp_path / "split" / "epoch=0-step=3.ckpt"))

    local_params = dict(local.named_parameters())
    for name, p in resumed.named_parameters():
        torch.testing.assert_close(p, local_params[name], rtol=1e-5, atol=1e-6, msg=name)
    for i, block in enumerate(resumed.server_blocks):
        for (n, p), (_, q) in zip(block.named_parameters(), local.model[SPEC.cut + i].named_parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"server block {i} {n}")


class ManualClassifier(Classifier):
    def __init__(self, **kw) -> None:  # noqa: ANN003
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        opt = self.optimizers()
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_matches_local(split_server):
    _, _, strategy = _fit_local_and_split(lambda: ManualClassifier(lr=0.1), split_server, steps=4,
                                          accumulate_grad_batches=1)
    strategy.close()


def test_lora_tail_trains_adapters_only(split_server):
    address, tls_for = split_server(GPT2, SplitSpec(cut=1, shape="two_part"))
    tail = {"mode": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}}
    strategy = _strategy(address, tls_for("alice"), tail=tail)
    trainer, rec = _trainer(strategy, steps=8, accumulate_grad_batches=1)
    trainer.fit(CausalLM(lr=1e-2), _gpt2_batches(16))
    assert rec.losses[-1] < rec.losses[0]  # the labels travelled; the server computed and trained on the loss
    (session,) = [s for s in _sessions_of(split_server) if s.id == strategy.split.client.session_id]
    segment = session.state["segment"]
    base = split_server.servers[0].handler.segment
    before = {n: p.clone() for n, p in build_model(GPT2).named_parameters()}
    lora_names = [n for n, p in segment.module.named_parameters() if p.requires_grad]
    assert lora_names and all("lora_" in n for n in lora_names)
    # The owner's base weights are shared with the adapters' copy and untouched by training.
    shared = {id(p) for p in base.parameters()}
    assert all(id(p) in shared for n, p in segment.module.named_parameters() if "lora_" not in n)
    for i, block in enumerate(base.blocks):
        for n, p in block.named_parameters():
            torch.testing.assert_close(p, before[f"transformer.h.{1 + i}.{n}"], rtol=0, atol=0)
    strategy.close()


def test_four_concurrent_clients_are_isolated(split_server):
    """Four sessions training at once each get exactly the losses they get alone."""
    address, tls_for = split_server(DIGITS_MLP, SPEC)
    x, y = next(iter(digits_loaders(64)[0]))

    def train(node: str, seed: int, out: dict) -> None:
        split = open_split(address, node, tls_for(node), source=DIGITS_MLP, spec=SPEC,
                           tail={"mode": "trainable", "optimizer": {"name": "SGD", "lr": 0.3}})
        opt = torch.optim.SGD(split.model.parameters(), lr=0.3)
        g = torch.Generator().manual_seed(seed)
        losses = []
        for step in range(5):
            idx = torch.randint(0, len(x), (16,), generator=g)
            split.runner.step = step
            loss = torch.nn.functional.cross_entropy(split.model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            split.client.request(MessageType.OPTIMIZER_STEP, {}, step=step)
            losses.append(float(loss))
        split.close()
        out[(node, seed)] = losses

    alone: dict = {}
    for i, node in enumerate(["alice", "bob", "client", "alice"]):
        train(node, i, alone)
    together: dict = {}
    threads = [threading.Thread(target=train, args=(node, i, together))
               for i, node in enumerate(["alice", "bob", "client", "alice"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_trainer_strategy_string_resolves_through_registry(split_server, monkeypatch, pki):
    address, _ = split_server(DIGITS_MLP, SPEC)
    monkeypatch.setenv("LIGHTNING_SPLIT_ADDRESS", address)
    monkeypatch.setenv("LIGHTNING_SPLIT_NODE_ID", "bob")
    monkeypatch.setenv("LIGHTNING_SPLIT_CERTS", str(pki))
    trainer = L.Trainer(strategy="split", accelerator="cpu", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    assert isinstance(trainer.strategy, SplitStrategy)
    trainer.fit(Classifier(), digits_loaders(32)[0])
    assert trainer.global_step == 2
    trainer.strategy.close()


class TwoViewClassifier(Classifier):
    """Calls the split model twice per step (two views of a batch): two graphs, one step."""

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        loss = loss + 0.5 * torch.nn.functional.cross_entropy(self.model(x.flip(-1)), y)
        self.log("train_loss", loss)
        return loss


@pytest.mark.parametrize("module_cls", [Classifier, TwoViewClassifier])
def test_server_step_rides_on_the_last_backward(module_cls, split_server):
    """Without clipping the server steps with the step's last backward: 2 round trips a step, same numbers."""
    _, _, strategy = _fit_local_and_split(lambda: module_cls(lr=0.1), split_server, steps=3,
                                          accumulate_grad_batches=2)
    calls = 2 if module_cls is Classifier else 4  # forward + backward per model call
    configure = 1  # the server's optimizer is configured once at setup
    assert strategy.split.client.stats.messages == 3 + configure + 3 * 2 * calls  # handshake, SPLIT, LOAD
    strategy.close()


def test_removed_checkpoints_free_their_server_state(split_server, tmp_path):
    """save_top_k drops old checkpoints, and ``last.ckpt`` is written over at every save; the
    server keeps exactly the states the client's checkpoints refer to."""
    address, tls_for = split_server(DIGITS_MLP, SPEC)
    strategy = _strategy(address, tls_for("alice"), tail="trainable")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=1, monitor="step", mode="max",
                           save_last=True)
    trainer = L.Trainer(max_steps=6, accelerator="cpu", strategy=strategy, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[ckpt])
    trainer.fit(Classifier(lr=0.1), digits_loaders(32)[0])
    kept = sorted((tmp_path / "ckpt").iterdir())
    assert [p.name for p in kept] == ["epoch=0-step=6.ckpt", "last.ckpt"]
    # our own files, not a peer's bytes
    tags = sorted(torch.load(p, weights_only=False)["lightning_split"]["tag"] for p in kept)
    saved = sorted(p.stem for p in (tmp_path / "server-state" / "alice").glob("*.json"))
    assert saved == tags
    strategy.close()


def test_lora_tail_through_training_graphs_matches_eager(split_server, monkeypatch):
    """LoRA adapters trained through the server's training-graph path (its bookkeeping emulated on
    CPU) give the losses the eager path gives, step for step."""
    from lightning_split.server.train_graphs import TrainGraphs

    address, tls_for = split_server(GPT2, SplitSpec(cut=1, shape="two_part"))
    tail = {"mode": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}}
    losses, steps = {}, {}
    for graphs in (False, True):
        monkeypatch.setattr(TrainGraphs, "emulate", graphs)
        torch.manual_seed(0)  # the same adapter initialisation on the server, the same client module
        strategy = _strategy(address, tls_for("alice"), tail=tail)
        trainer, rec = _trainer(strategy, steps=6, accumulate_grad_batches=2)
        trainer.fit(CausalLM(lr=1e-2), _gpt2_batches(16))
        (session,) = [s for s in _sessions_of(split_server) if s.id == strategy.split.client.session_id]
        losses[graphs], steps[graphs] = rec.losses, session.state["segment"].train_graphs.stats["graph_steps"]
        strategy.close()
    assert steps[False] == 0 and steps[True] == len(losses[True]) - 1
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-6, atol=1e-7)
