"""Error feedback for gradients sent lossy (wire/error_feedback.py): what the receiver decodes is
what the sender's own lossy stage predicts, the residual is repaid over steps, and a training run
through int8 in both directions stays closer to lossless training with it than without it."""

from __future__ import annotations

import pytest
import torch

from lightning_split.channel import ChannelConfig
from lightning_split.examples.modules import Classifier, digits_loaders
from lightning_split.wire import CompressionConfig
from lightning_split.wire.compression import decode_tensor, encode_tensor, lossy_roundtrip
from lightning_split.wire.error_feedback import ErrorFeedback, StepFeedback
from tests.test_strategy import DIGITS_MLP, _sessions_of, _strategy, _trainer
from tests.test_strategy_features import SPEC


@pytest.mark.parametrize("lossy", ["bf16", "fp16", "int8"])
@pytest.mark.parametrize("numel", [10, 5000])  # under min_bytes (sent RAW) and over
def test_the_roundtrip_is_what_the_receiver_decodes(lossy, numel) -> None:
    cfg = CompressionConfig(lossy=lossy, int8_block_size=64)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 3
    enc = encode_tensor(x, cfg)
    got = decode_tensor(torch.frombuffer(bytearray(enc.data), dtype=torch.uint8), dtype=x.dtype, shape=(numel,),
                        encoding=enc.encoding, block_size=enc.block_size, use_blosc2=enc.blosc2)
    assert torch.equal(lossy_roundtrip(x, cfg), got)
    assert (numel * 4 < cfg.min_bytes) == torch.equal(got, x)


@pytest.mark.parametrize("lossy", ["bf16", "int8"])
def test_the_residual_is_repaid_over_steps(lossy) -> None:
    """Small gradients with a bias: plain int8 keeps losing the same part every step; with error
    feedback the sum of what arrived is within one step's error of the sum that was meant."""
    cfg, g = CompressionConfig(lossy=lossy), torch.Generator().manual_seed(0)
    feedback, meant, plain, fed = ErrorFeedback(), torch.zeros(4096), torch.zeros(4096), torch.zeros(4096)
    for _ in range(100):
        x = torch.randn(4096, generator=g) * 1e-2 + 1e-3
        meant += x
        plain += lossy_roundtrip(x, cfg)
        fed += lossy_roundtrip(feedback.compensate("slot", x, cfg), cfg)
    one_step = (x - lossy_roundtrip(x, cfg)).abs().max()
    assert (meant - fed).abs().max() <= 2 * one_step < (meant - plain).abs().max()
    assert feedback.nbytes == 4096 * 4


def test_slots_by_step_and_shape() -> None:
    cfg, feedback = CompressionConfig(lossy="int8"), StepFeedback()
    assert [feedback.next_slot(5) for _ in range(3)] == [0, 1, 2] and feedback.next_slot(6) == 0
    x = torch.randn(4096)
    feedback.compensate(0, x, cfg)
    y = torch.randn(2048)  # the slot's shape changed (a last, smaller batch): no residual added
    assert torch.equal(feedback.compensate(0, y, cfg), y)
    assert feedback.compensate(0, x, CompressionConfig()) is x  # lossless: nothing to do


def _fit(split_server, lossy: str, steps: int, feedback: bool = True) -> torch.nn.Module:  # noqa: ANN001
    """The digits MLP (a U-shape: activations and gradients both ways) through a trainable split,
    ``lossy`` in both directions. Returns the split module (server blocks checked by the caller)."""
    comp = CompressionConfig(lossy=lossy, min_bytes=0, error_feedback=feedback)
    config = ChannelConfig(client_to_server=comp, server_to_client=comp)
    address, tls_for = split_server(DIGITS_MLP, SPEC, config=ChannelConfig())
    strategy = _strategy(address, tls_for("alice"), tail="trainable", channel=config)
    module = Classifier(lr=0.05)
    trainer, _ = _trainer(strategy, steps=steps, accumulate_grad_batches=1)
    trainer.fit(module, digits_loaders(32)[0])
    (session,) = [s for s in _sessions_of(split_server) if "segment" in s.state]
    module.server_weights = [p.detach().clone() for p in session.state["segment"].module.parameters()]
    module.feedback_bytes = (strategy.split.runner.feedback.nbytes,
                             session.state["feedback"].nbytes if "feedback" in session.state else 0)
    strategy.close()
    return module


def test_int8_training_with_error_feedback_tracks_lossless_closer(split_server) -> None:
    steps = 40
    exact = _fit(split_server, "none", steps)
    fed = _fit(split_server, "int8", steps)
    assert all(n > 0 for n in fed.feedback_bytes)  # both sides kept residuals
    plain = _fit(split_server, "int8", steps, feedback=False)  # the option reaches both sides
    assert plain.feedback_bytes == (0, 0)

    def distance(m: torch.nn.Module) -> float:
        client = sum(float((p - q).norm() ** 2) for p, q in zip(m.parameters(), exact.parameters(), strict=True))
        server = sum(float((p - q).norm() ** 2) for p, q in zip(m.server_weights, exact.server_weights, strict=True))
        return (client + server) ** 0.5

    print(f"distance to lossless: with error feedback {distance(fed):.3e}, without {distance(plain):.3e}")
    assert distance(fed) < distance(plain)
