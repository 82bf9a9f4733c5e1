"""SplitStrategy with real Lightning Trainers against a real mTLS server: parity with local training."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_split import SplitSpec, SplitStrategy
from lightning_split.channel import ChannelConfig
from lightning_split.examples.modules import CausalLM, Classifier, digits_loaders
from lightning_split.split.build import build_model
from tests.split_cases import GPT2, MLP

DIGITS_MLP = copy.deepcopy(MLP)
DIGITS_MLP.config.update(in_features=64, hidden=32, depth=4, out_features=10)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


def _trainer(strategy=None, steps: int = 6, **kw) -> tuple[L.Trainer, LossRecorder]:  # noqa: ANN001
    rec = LossRecorder()
    kw.setdefault("accumulate_grad_batches", 2)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, strategy=strategy or "auto", logger=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False), enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0, callbacks=[rec] + kw.pop("callbacks", []), **kw,
    )
    return trainer, rec


def _strategy(address: str, tls, **kw) -> SplitStrategy:  # noqa: ANN001
    return SplitStrategy(address=address, node_id="alice", tls=tls, device="cpu", **kw)


def _server_module(server_address_fixture_sessions) -> torch.nn.Module:  # noqa: ANN001
    (session,) = server_address_fixture_sessions
    return session.state["segment"].module


def _gpt2_batches(n: int = 8, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n * 2, 12), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)


CASES = {
    "mlp": (DIGITS_MLP, SplitSpec(cut=1, end=3), lambda: Classifier(lr=0.1), lambda: digits_loaders(32)[0]),
    "gpt2": (GPT2, SplitSpec(cut=1, end=3), lambda: CausalLM(lr=3e-3, optimizer="Adam"), _gpt2_batches),
    # Two-part: the server computes the loss, and backpropagates it with its forward (fused).
    "gpt2_two_part": (GPT2, SplitSpec(cut=1, shape="two_part"), lambda: CausalLM(lr=3e-3, optimizer="Adam"),
                      _gpt2_batches),
}


@pytest.mark.parametrize("tail,connections", [("frozen", 1), ("trainable", 1), ("trainable", 3)])
@pytest.mark.parametrize("case", list(CASES))
def test_training_parity_with_local(case, tail, connections, split_server):
    """Also over a stream bonded over three connections, with small fragments so all carry some."""
    _assert_trainer_parity(case, tail, connections, split_server)


@pytest.mark.parametrize("tail", ["frozen", "trainable"])
def test_two_part_trainer_parity_through_training_graphs(tail, split_server, monkeypatch):
    """The server's CUDA-graph path for fused micro-batches (its bookkeeping emulated on CPU: static
    buffers, gradients added to the call's, scaled by Lightning's 1/2 for accumulation): every call
    after the first replays, and losses and weights still equal local training's."""
    from lightning_split.server.train_graphs import TrainGraphs

    monkeypatch.setattr(TrainGraphs, "emulate", True)
    stats = _assert_trainer_parity("gpt2_two_part", tail, 1, split_server)
    assert stats["captures"] == 1 and stats["graph_steps"] == 11  # 12 calls of one shape


def _assert_trainer_parity(case: str, tail: str, connections: int, split_server) -> dict:  # noqa: ANN001
    """Train ``case`` locally and through SplitStrategy; assert equal losses and weights on both
    sides. Returns the server session's training-graph statistics."""
    source, spec, make_module, make_data = CASES[case]

    local_module = make_module()
    local_module.model = model = build_model(source)
    resolved = spec.resolve(model)
    if resolved.shape == "two_part":  # the server's output layer is its own copy, not tied to the client's
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    if tail == "frozen":  # the same parameters are frozen locally as on the server
        blocks = model.get_submodule(resolved.blocks or "")
        for i in range(resolved.cut, resolved.end):
            blocks[i].requires_grad_(False)
        for name in resolved.tail if resolved.shape == "two_part" else ():
            model.get_submodule(name).requires_grad_(False)
    local_trainer, local_rec = _trainer()
    local_trainer.fit(local_module, make_data())

    channel = ChannelConfig(chunk_size=16 << 10, connections=connections)
    address, tls_for = split_server(source, spec, config=ChannelConfig(chunk_size=16 << 10))
    strategy = _strategy(address, tls_for("alice"), tail=tail, channel=channel)
    split_module = make_module()
    split_trainer, split_rec = _trainer(strategy)
    split_trainer.fit(split_module, make_data())

    assert len(split_rec.losses) == len(local_rec.losses) == 12  # 6 steps x 2 accumulated batches
    torch.testing.assert_close(torch.tensor(split_rec.losses), torch.tensor(local_rec.losses), rtol=1e-5, atol=1e-6)
    local_params = dict(local_module.named_parameters())
    for name, p in split_module.named_parameters():
        torch.testing.assert_close(p, local_params[name], rtol=1e-5, atol=1e-6, msg=name)
    # The server's segment trained (or stayed frozen) exactly like the same blocks locally.
    segment = strategy.split.runner
    sessions = list(_sessions_of(split_server))
    assert sessions
    blocks = model.get_submodule(resolved.blocks or "")
    server_blocks = sessions[0].state["segment"].module.blocks
    for i, block in enumerate(server_blocks):
        for (n, p), (_, q) in zip(block.named_parameters(), blocks[resolved.cut + i].named_parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"server block {i} {n}")
    assert segment.client.stats.messages > 0 and len(segment.client._stream.calls) == connections
    stats = dict(sessions[0].state["segment"].train_graphs.stats)
    strategy.close()
    return stats


def _sessions_of(split_server):  # noqa: ANN001
    for server in split_server.servers:
        yield from server.sessions.snapshot().values()
