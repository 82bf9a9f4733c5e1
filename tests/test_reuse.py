"""A SplitStrategy used again: a second ``fit``, and a re-fit from a checkpoint after a fit that
failed mid-step, each end with the weights of the same runs done locally (fp32, CPU).

Both used to go wrong silently: a second Trainer counts its steps from 0, so the server took them
as repeats of the first fit's steps and never stepped its optimizer; and a restore from a
checkpoint kept the interrupted step's gradients on the server, to be added into the next step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_split.split.build import build_model
from tests.test_strategy import CASES, _sessions_of, _strategy, _trainer

PARITY = {"rtol": 1e-5, "atol": 1e-6}


class FailAt(Callback):
    """Raise after the first of a step's two accumulated backwards: the server holds gradients of
    a step that will never be applied."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("the run is cut here")


def _server_blocks(split_server: Any, strategy: Any) -> Any:
    (session,) = [s for s in _sessions_of(split_server) if s.id == strategy.split.client.session_id]
    return session.state["segment"].module


def _assert_same_weights(split: Any, local: Any, server: Any, spec: Any) -> None:
    local_params = dict(local.named_parameters())
    for name, p in split.named_parameters():
        torch.testing.assert_close(p, local_params[name], **PARITY, msg=name)
    layers = local.model.transformer.h if hasattr(local.model, "transformer") else local.model
    for i, block in enumerate(server.blocks):
        for (n, p), (_, q) in zip(block.named_parameters(), layers[spec.cut + i].named_parameters(), strict=True):
            torch.testing.assert_close(p, q, **PARITY, msg=f"server block {i} {n}")


@pytest.mark.parametrize("case", ["mlp", "gpt2_two_part"])
def test_a_second_fit_with_the_same_strategy_trains_the_server_too(split_server, case: str) -> None:
    source, spec, make_module, batches = CASES[case]

    def two_fits(module: Any, strategy: Any = None) -> None:
        for _ in range(2):
            trainer, _ = _trainer(strategy, steps=3, accumulate_grad_batches=1)
            trainer.fit(module, batches())

    local = make_module()
    local.model = build_model(source)
    if case == "gpt2_two_part":  # the split unties the output layer from the embedding
        local.model.lm_head.weight = torch.nn.Parameter(local.model.lm_head.weight.detach().clone())
    two_fits(local)
    address, tls_for = split_server(source, spec)
    strategy = _strategy(address, tls_for("alice"), tail="trainable")
    split = make_module()
    two_fits(split, strategy)
    server = _server_blocks(split_server, strategy)
    assert split_server.segment(strategy.split).last_step == 5  # six steps, numbered on in the session
    _assert_same_weights(split, local, server, spec)
    strategy.close()


@pytest.mark.parametrize("case", ["mlp", "gpt2_two_part"])
def test_refit_from_last_checkpoint_after_a_failed_step_is_exact(split_server, tmp_path, case: str) -> None:
    """Fit until a step fails between its micro-batches, then fit again from ``last.ckpt`` with the same
    strategy (and locally with the same module): the interrupted step leaves nothing behind."""
    source, spec, make_module, batches = CASES[case]

    def fail_then_resume(module: Any, folder: Any, strategy: Any = None) -> None:
        ckpt = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=0, save_last=True)
        trainer, _ = _trainer(strategy, steps=4, callbacks=[ckpt, FailAt(3)], enable_checkpointing=True)
        with pytest.raises(RuntimeError, match="cut here"):
            trainer.fit(module, batches())
        trainer, _ = _trainer(strategy, steps=4)
        trainer.fit(module, batches(), ckpt_path=str(folder / "last.ckpt"))

    local = make_module()
    local.model = build_model(source)
    if case == "gpt2_two_part":
        local.model.lm_head.weight = torch.nn.Parameter(local.model.lm_head.weight.detach().clone())
    fail_then_resume(local, tmp_path / "local")
    address, tls_for = split_server(source, spec)
    strategy = _strategy(address, tls_for("alice"), tail="trainable")
    split = make_module()
    fail_then_resume(split, tmp_path / "split", strategy)
    _assert_same_weights(split, local, _server_blocks(split_server, strategy), spec)
    strategy.close()
