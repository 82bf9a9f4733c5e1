"""compression="auto" (split/adaptive.py): the choice of encodings from measured steps, and a real
training run over a slow link (a throttled proxy) that switches to int8 in both directions and
keeps training, with the server accepting the new encodings and answering in them."""

from __future__ import annotations

import pytest
import torch

from lightning_split.channel import ChannelConfig
from lightning_split.split.adaptive import WIRE_FRACTION, AdaptiveCompression
from tests.fault_proxy import FaultProxy
from tests.test_strategy import CASES, _strategy, _trainer


def _measured(link_bytes_per_s: float, compute_s: float, megabytes: float, allowed=("none", "bf16", "int8"),
              steps: int = 8) -> dict[str, str]:
    """The choice after ``steps`` steps of ``megabytes`` of activations and of gradients each way
    (sent in fp32) over a link of that speed, with ``compute_s`` of compute per step."""
    adaptive = AdaptiveCompression(allowed, every=steps)
    raw = int(megabytes * 1e6)
    for _ in range(steps):  # each step's bytes on the wire in the encodings chosen so far
        a, g = (WIRE_FRACTION[adaptive.modes[kind]] for kind in ("activations", "gradients"))
        wire_s = 2 * raw * (a + g) / link_bytes_per_s  # activations up and back, gradients up and back
        adaptive.record("activations", raw, "activations", raw, int(a * raw), 2 * a * raw / link_bytes_per_s, 0.01,
                        first=True)
        adaptive.record("gradients", raw, "gradients", raw, int(g * raw), 2 * g * raw / link_bytes_per_s, 0.01,
                        first=False)
        adaptive.end_step(compute_s + wire_s)
    return adaptive.modes


def test_a_fast_link_stays_lossless() -> None:
    assert _measured(1e9, 0.1, 1.0) == {"activations": "none", "gradients": "none"}


def test_a_slow_link_goes_to_int8() -> None:
    assert _measured(2e6, 0.1, 1.0) == {"activations": "int8", "gradients": "int8"}


def test_a_slow_link_is_left_after_the_first_steps_not_after_every() -> None:
    """The first revision comes after ``first`` (2) steps, then every ``every`` (8): over a slow
    link the third step already goes out compressed."""
    adaptive = AdaptiveCompression(("none", "bf16", "int8"), every=8)
    for step in range(3):
        assert adaptive.modes == ({"activations": "int8", "gradients": "int8"} if step == 2
                                  else {"activations": "none", "gradients": "none"}), step
        adaptive.record("activations", 10**6, "gradients", 10**6, 10**6, 1.0, 0.01, first=True)
        adaptive.end_step(1.1)


def test_a_slow_link_is_told_apart_from_a_fast_one() -> None:
    """What the runner keeps more micro-batches in flight for: a link measured below 25 MB/s."""
    for link, slow in ((12.5e6, True), (44e6, False)):
        adaptive = AdaptiveCompression(("none", "bf16", "int8"), every=8)
        for _ in range(2):
            adaptive.record("activations", 10**6, "gradients", 10**6, 10**6, 2e6 / link, 0.0, first=True)
            adaptive.end_step(0.1 + 2e6 / link)
        assert adaptive.slow_link is slow, link


def test_in_between_the_least_lossy_choice_within_tolerance() -> None:
    """1 s of compute, 4 MB a step over 10 MB/s: lossless would add 0.4 s, bf16 0.2 s, int8 0.1 s.
    Within 5% of the fastest (both int8): bf16 for one kind; the activations, which the forward
    itself uses, keep the finer one. With 2 s of compute bf16 for both is within 5%."""
    assert _measured(1e7, 1.0, 1.0) == {"activations": "bf16", "gradients": "int8"}
    assert _measured(1e7, 2.0, 1.0) == {"activations": "bf16", "gradients": "bf16"}


def test_the_one_byte_rung_is_int8_or_fp8_by_the_error_on_a_sent_tensor() -> None:
    """Dense Gaussian blocks: int8 errs 4x less than fp8. One outlier per block beside small values
    (the hidden states of large LLMs): fp8 keeps the small ones, int8 rounds them to 0. Each kind
    gets its own; a kind never sampled keeps int8."""
    adaptive = AdaptiveCompression(("none", "bf16", "int8", "fp8"), every=8)
    dense, spiky = torch.randn(64, 128), torch.randn(64, 128) * 1e-3
    spiky[:, 0] = 10.0
    for _ in range(7):
        adaptive.end_step(0.1)
    assert adaptive.wants_sample()
    adaptive.sample("activations", dense)
    assert adaptive.byte_mode == {"activations": "int8", "gradients": "int8"}
    adaptive.sample("gradients", spiky)
    assert adaptive.byte_mode == {"activations": "int8", "gradients": "fp8"}
    for _ in range(8):  # a slow link: the one-byte rung, as sampled
        adaptive.record("activations", 10**6, "gradients", 10**6, 10**6, 1.0, 0.01, first=True)
        adaptive.end_step(1.1)
    assert adaptive.modes == {"activations": "int8", "gradients": "fp8"}
    assert adaptive.config("gradients").lossy == "fp8" and adaptive.wire_bits["gradients"] == 8.25


def test_only_what_both_ends_allow() -> None:
    assert _measured(2e6, 0.1, 1.0, allowed=("none", "bf16")) == {"activations": "bf16", "gradients": "bf16"}
    assert _measured(2e6, 0.1, 1.0, allowed=("none", "fp8")) == {"activations": "fp8", "gradients": "fp8"}


def test_nothing_measured_changes_nothing() -> None:
    adaptive = AdaptiveCompression(("none", "int8"), every=1)
    assert not adaptive.end_step(0.1) and adaptive.modes == {"activations": "none", "gradients": "none"}


@pytest.mark.parametrize("case", ["gpt2", "gpt2_two_part"])
def test_auto_over_a_slow_link_switches_to_int8_and_trains(split_server, case: str) -> None:
    """U-shape: activations and gradients both ways; two-part: activations up, gradients down (the
    fused call's reply). Through a 100 kB/s link the wire dominates: after the first measured steps
    both kinds leave lossless (int8 or bf16, by the measured times), requests and replies alike,
    and the loss keeps falling."""
    source, spec, make_module, batches = CASES[case]
    address, tls_for = split_server(source, spec)
    with FaultProxy(int(address.rsplit(":", 1)[1])) as proxy:
        proxy.throttle(100_000)
        strategy = _strategy(f"127.0.0.1:{proxy.port}", tls_for("alice"), tail="trainable", compression="auto",
                             channel=ChannelConfig(connections=1))
        adaptive = strategy.connect_split().runner.adaptive
        assert adaptive is not None and adaptive.ladder == ["none", "bf16", "byte"]
        assert adaptive.byte_modes == ["int8", "fp8"]
        adaptive.every = 2
        module = make_module()
        trainer, rec = _trainer(strategy, steps=6, accumulate_grad_batches=1)
        stats = strategy.split.client.stats
        trainer.fit(module, batches())
        modes = dict(adaptive.modes)
        assert "none" not in modes.values(), modes
        before = stats.snapshot()
        trainer, rec2 = _trainer(strategy, steps=2, accumulate_grad_batches=1)  # two more steps, compressed
        trainer.fit(module, batches())
        step = stats - before
        # bf16 halves the tensors, int8 quarters them; headers and small tensors stay as they are (a
        # loaded host measured 1.68 for bf16 requests here): 1.5 is beyond any lossless encoding.
        assert step.raw_bytes_sent / step.bytes_sent > 1.5 and step.raw_bytes_received / step.bytes_received > 1.5
        assert all(torch.isfinite(torch.tensor(rec.losses + rec2.losses)))
        assert sum(rec2.losses) / 2 < sum(rec.losses[:2]) / 2  # still learning
        strategy.close()


@pytest.mark.parametrize("address,mode", [("127.0.0.1:50051", "channel"), ("localhost:9", "channel"),
                                          ("[::1]:9", "channel"), ("unix:/tmp/split.sock", "channel"),
                                          ("10.0.0.2:50051", "auto"), ("model-owner.example.com:443", "auto"),
                                          ("[2001:db8::1]:443", "auto")])
def test_the_default_is_auto_for_a_server_on_another_host(address: str, mode: str) -> None:
    from lightning_split.split.adaptive import resolve_mode

    assert resolve_mode(None, address) == mode
    assert resolve_mode("channel", "10.0.0.2:1") == "channel" and resolve_mode("auto", "127.0.0.1:1") == "auto"
    with pytest.raises(ValueError, match="compression"):
        resolve_mode("int8", address)
