"""Faults lose nothing: a link that drops or stalls between a real client and a real mTLS server
(tests/fault_proxy.py in between) is reconnected, the session resumed, and every request in flight
runs exactly once on the server, however the cut falls.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import grpc
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_split._proto import split_pb2 as pb
from lightning_split.channel import ChannelConfig, RemoteError
from lightning_split.wire import CompressionConfig
from tests.channel_util import EchoHandler, wait_for
from tests.fault_proxy import FaultProxy

FORWARD = pb.FORWARD


@pytest.fixture
def proxied(start_server, connect):  # noqa: ANN001, ANN201
    """``proxied(config=None)``: (echo handler, server, proxy, client connected through the proxy)."""
    proxies: list[FaultProxy] = []

    def _make(config: ChannelConfig | None = None, server_config: ChannelConfig | None = None):  # noqa: ANN202
        handler = EchoHandler()
        server = start_server(handler, config=server_config or ChannelConfig())
        proxy = FaultProxy(server.port)
        proxies.append(proxy)
        client = connect(proxy.port, config=config or ChannelConfig(connections=1))
        return handler, server, proxy, client

    yield _make
    for proxy in proxies:
        proxy.close()


def _runs_per_request(handler: EchoHandler) -> Counter:
    with handler.lock:
        return Counter(seq for _, seq, _ in handler.seen)


def test_a_reply_lost_in_a_cut_is_answered_from_the_record(proxied) -> None:
    """The server ran the request; the link drops before its reply arrives: the client reconnects,
    sends it again, and gets the reply of the one run."""
    handler, server, proxy, client = proxied()
    fut = client.submit(FORWARD, {"sleep": 0.5, "n": 1})
    assert wait_for(lambda: len(handler.seen) == 1)  # running on the server now
    proxy.cut_now()
    assert fut.result(timeout=20).body == {"sleep": 0.5, "n": 1}
    assert client.stats.reconnects == 1 and client.stats.resent == 1
    assert set(_runs_per_request(handler).values()) == {1}  # ran once
    (session,) = server.sessions.snapshot().values()
    assert session.replies.replayed == 1
    assert client.request(FORWARD, {"count": True}).body["count"] == 2  # one session, two runs


@pytest.mark.parametrize("compression", ["none", "blosc2", "int8"])
@pytest.mark.parametrize("connections", [1, 2])
def test_cuts_anywhere_in_a_pipeline_of_requests_lose_nothing(proxied, compression: str, connections: int) -> None:
    """Eight requests in flight at a time, payloads of 1 MiB, the link cut after so many bytes,
    again and again: every reply arrives, equal to its request, and the server ran each request
    exactly once, with compression and over bonded connections too."""
    lossy = compression if compression == "int8" else "none"
    lossless = compression if compression == "blosc2" else "none"
    comp = CompressionConfig(lossless=lossless, lossy=lossy)
    config = ChannelConfig(connections=connections, client_to_server=comp, server_to_client=comp)
    handler, server, proxy, client = proxied(config)
    g = torch.Generator().manual_seed(0)
    sent, futures = [], []
    for i in range(48):
        if i % 8 == 4:
            proxy.cut_after(int(torch.randint(1, 3 << 20, (1,), generator=g)))
        x = torch.randn(256, 1024, generator=g) if i % 3 else torch.zeros(256, 1024)
        sent.append(x)
        futures.append(client.submit(FORWARD, {"i": i, "x": x}))
        if len(futures) > 8:
            futures[-9].result(timeout=30)
    for i, fut in enumerate(futures):
        reply = fut.result(timeout=30).body
        assert reply["i"] == i
        tol = {"atol": 0.05, "rtol": 0.05} if lossy == "int8" else {"atol": 0, "rtol": 0}
        torch.testing.assert_close(reply["x"], sent[i], **tol)
    assert proxy.cuts >= 3 and client.stats.reconnects >= 3
    assert set(_runs_per_request(handler).values()) == {1}
    assert len(handler.opened) == 1  # one session throughout


def test_a_stalled_link_is_detected_by_keepalive_and_resumed(proxied) -> None:
    """The link stops carrying bytes (not closed): keepalive notices within its timeout, the
    client reconnects once the link carries bytes again, and the request completes, run once."""
    config = ChannelConfig(connections=1, keepalive_time_s=1.0, keepalive_timeout_s=1.0)
    handler, server, proxy, client = proxied(config, server_config=ChannelConfig(keepalive_time_s=1.0))
    assert client.request(FORWARD, 1).body == 1
    proxy.stall(4.0)  # longer than keepalive time + timeout
    t0 = time.monotonic()
    fut = client.submit(FORWARD, {"n": 2})
    assert fut.result(timeout=30).body == {"n": 2}
    assert time.monotonic() - t0 < 15 and client.stats.reconnects >= 1
    assert set(_runs_per_request(handler).values()) == {1}


def test_a_server_gone_for_good_gives_one_clear_error(proxied) -> None:
    config = ChannelConfig(connections=1, reconnect_deadline_s=1.5)
    handler, server, proxy, client = proxied(config)
    proxy.refuse(True)
    fut = client.submit(FORWARD, {"sleep": 1.0})  # still running at the cut, on a loaded host too
    assert wait_for(lambda: len(handler.seen) == 1)
    proxy.cut_now()
    with pytest.raises(RemoteError) as err:
        fut.result(timeout=20)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "could not resume session" in err.value.message
    proxy.refuse(False)
    assert client.request(FORWARD, 3).body == 3  # the next request reconnects: the session lives on


def test_a_session_the_server_lost_is_not_silently_replaced(proxied) -> None:
    """After a cut the server no longer has the session (expired, restarted): the requests in
    flight fail with NOT_FOUND naming the session, rather than running in a fresh one."""
    handler, server, proxy, client = proxied()
    fut = client.submit(FORWARD, {"sleep": 1.0})  # still running at the cut, on a loaded host too
    assert wait_for(lambda: len(handler.seen) == 1)
    # The link is cut (and kept down) while the request runs, then the server drops the session
    # (close_all waits for the running handler), then the link comes back. Closing first and then
    # cutting raced: on a loaded CI host the reply could leave before the cut.
    proxy.refuse(True)
    proxy.cut_now()
    server.sessions.close_all()
    proxy.refuse(False)
    with pytest.raises(RemoteError) as err:
        fut.result(timeout=20)
    assert err.value.code == grpc.StatusCode.NOT_FOUND and client.session_id[:8] in err.value.message


def test_replies_are_forgotten_once_acknowledged(proxied) -> None:
    handler, server, proxy, client = proxied()
    for _ in range(20):
        client.request(FORWARD, torch.ones(1024))
    (session,) = server.sessions.snapshot().values()
    # Only the last reply is kept (the next request acknowledges it), and charged to alice.
    assert len(session.replies._kept) == 1
    assert server.budget.account("alice").used >= 4096


def test_concurrent_cuts_and_requests_from_many_threads(proxied) -> None:
    """Four threads request at once while the link is cut four times: each gets its own replies."""
    handler, server, proxy, client = proxied()
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(25):
                assert client.request(FORWARD, {"k": k, "i": i}).body == {"k": k, "i": i}
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for _ in range(4):
        time.sleep(0.1)
        proxy.cut_now()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert set(_runs_per_request(handler).values()) == {1} and len(handler.seen) == 100


# -- training through a link that drops -----------------------------------------------------------


class CutEveryStep(Callback):
    """Arms the proxy to cut the link after a seeded number of bytes at the start of each step, so
    the cut falls anywhere: in a FORWARD going up, a reply coming down, a BACKWARD, a step."""

    def __init__(self, proxy: FaultProxy, seed: int, most: int) -> None:
        self.proxy, self.most = proxy, most
        self.g = torch.Generator().manual_seed(seed)

    def on_train_batch_start(self, *args: Any) -> None:
        self.proxy.cut_after(int(torch.randint(1, self.most, (1,), generator=self.g)))


@pytest.mark.parametrize("case", ["mlp", "gpt2_two_part"])
def test_training_through_a_link_cut_in_every_step_equals_local(split_server, case: str) -> None:
    """Trainer.fit through a link cut once in every step: the weights on both sides equal the local
    run's, and the server applied each optimizer step exactly once."""
    from lightning_split.split.build import build_model
    from tests.test_strategy import CASES, _strategy, _trainer

    source, spec, make_module, batches = CASES[case]
    steps = 6
    local = make_module()
    local.model = build_model(source)
    if case == "gpt2_two_part":  # the split unties the output layer from the embedding
        local.model.lm_head.weight = torch.nn.Parameter(local.model.lm_head.weight.detach().clone())
    trainer, _ = _trainer(steps=steps)
    trainer.fit(local, batches())

    address, tls_for = split_server(source, spec)
    proxy = FaultProxy(int(address.rsplit(":", 1)[1]))
    try:
        strategy = _strategy(f"127.0.0.1:{proxy.port}", tls_for("alice"), tail="trainable",
                             channel=ChannelConfig(connections=1))
        split = make_module()
        trainer, _ = _trainer(strategy, steps=steps, callbacks=[CutEveryStep(proxy, seed=1, most=40_000)])
        trainer.fit(split, batches())
        client = strategy.split.client
        assert proxy.cuts >= steps - 1 and client.stats.reconnects >= steps - 1
        segment = split_server.segment(strategy.split)
        assert segment.last_step == steps - 1
        if case == "gpt2_two_part":  # Adam counts the steps it applied: none lost, none twice
            assert {int(s["step"]) for s in segment.optimizer.state.values()} == {steps}
        local_params = dict(local.named_parameters())
        for name, p in split.named_parameters():
            torch.testing.assert_close(p, local_params[name], rtol=1e-5, atol=1e-6, msg=name)
        layers = local.model.transformer.h if hasattr(local.model, "transformer") else local.model
        for i, block in enumerate(segment.module.blocks):
            for (n, p), (_, q) in zip(block.named_parameters(), layers[spec.cut + i].named_parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"server block {i} {n}")
        strategy.close()
    finally:
        proxy.close()


@pytest.mark.parametrize("shape", ["two_part", "u_shape"])
def test_generation_through_a_cut_at_token_5_of_20_equals_uninterrupted(split_server, shape: str) -> None:
    """The link drops while token 5 is being made: the decode step is sent again and answered from
    the server's record (its KV cache grew once), and the tokens equal local greedy ones."""
    from transformers.generation.streamers import BaseStreamer

    from lightning_split.split.build import build_model
    from lightning_split.split.connect import open_split
    from lightning_split.split.spec import SplitSpec
    from tests.split_cases import GPT2

    spec = SplitSpec(cut=1, shape=shape) if shape == "two_part" else SplitSpec(cut=1, end=3)
    address, tls_for = split_server(GPT2, spec)
    proxy = FaultProxy(int(address.rsplit(":", 1)[1]))

    class CutAtToken(BaseStreamer):
        def __init__(self) -> None:
            self.tokens = 0

        def put(self, value: torch.Tensor) -> None:
            self.tokens += 1
            if self.tokens == 5:  # the prompt, then 4 tokens: the 5th new token's step gets cut
                proxy.cut_after(30, direction="down")  # in its reply: the step ran

        def end(self) -> None:
            pass

    try:
        remote = open_split(f"127.0.0.1:{proxy.port}", "alice", tls_for("alice"), source=GPT2, spec=spec,
                            config=ChannelConfig(connections=1))
        ids = torch.randint(0, GPT2.config["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(3))
        kw = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
        expected = build_model(GPT2).eval().generate(ids, **kw)
        got = remote.model.eval().generate(ids, streamer=CutAtToken(), **kw)
        assert proxy.cuts == 1 and remote.client.stats.reconnects == 1
        assert torch.equal(got, expected)
        remote.close()
    finally:
        proxy.close()


def test_a_session_the_server_lost_mid_fit_names_the_checkpoint_to_resume_from(split_server, tmp_path) -> None:
    """The server loses the session mid-fit (a restart, or it closed it): fit ends with one
    SessionLost naming the last checkpoint, and a new strategy resumed from it finishes the run
    with the weights of an uninterrupted one (the loss falls at an epoch's start: a plain
    DataLoader resumed mid-epoch starts the epoch again, as Lightning does locally)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_split import SessionLost
    from tests.test_strategy import CASES, _strategy, _trainer

    source, spec, make_module, batches = CASES["gpt2_two_part"]
    address, tls_for = split_server(source, spec)
    server = split_server.servers[-1]

    def fit(module: Any, steps: int, callbacks: list, ckpt_path: str | None = None) -> Any:
        strategy = _strategy(address, tls_for("alice"), tail="trainable")
        trainer, _ = _trainer(strategy, steps=steps, accumulate_grad_batches=1, enable_checkpointing=True,
                              callbacks=callbacks)
        try:
            trainer.fit(module, batches(), ckpt_path=ckpt_path)
            return split_server.segment(strategy.split).module
        finally:
            strategy.close()

    class LoseSessionAt(Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, index: int) -> None:
            if trainer.global_step == 8:  # the first step of the second epoch (an exact resume point)
                server.sessions.close_all()

    whole = make_module()
    expected = fit(whole, 10, [ModelCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=1, save_top_k=0,
                                              save_last=True)])
    cut = make_module()
    with pytest.raises(SessionLost, match="last.ckpt") as err:
        fit(cut, 10, [ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=1, save_top_k=0, save_last=True),
                     LoseSessionAt()])
    assert "no longer holds session" in str(err.value)
    resumed = make_module()
    got = fit(resumed, 10, [ModelCheckpoint(dirpath=tmp_path / "c", every_n_train_steps=1, save_top_k=0,
                                           save_last=True)], ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    for (n, p), (_, q) in zip(resumed.named_parameters(), whole.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    for (n, p), (_, q) in zip(got.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"server {n}")


def test_eight_clients_training_through_cut_links_each_equal_their_solo_runs(split_server) -> None:
    """Eight clients of four nodes (two sessions each) train at once on one server, each through its own link cut in
    every step; each ends with the weights (its own and its session's on the server) of the same
    training run done alone without faults."""
    from lightning_split.split.connect import open_split
    from lightning_split.split.spec import SplitSpec
    from lightning_split.wire import MessageType
    from tests.split_cases import GPT2

    spec = SplitSpec(cut=1, shape="two_part")
    address, tls_for = split_server(GPT2, spec)
    port = int(address.rsplit(":", 1)[1])
    tail = {"mode": "trainable", "optimizer": {"name": "Adam", "lr": 3e-3}}
    steps = 4

    def train(k: int, proxy: FaultProxy | None) -> tuple[dict, dict]:
        node = ["alice", "bob", "client", "mallory"][k % 4]
        target = f"127.0.0.1:{proxy.port}" if proxy is not None else address
        split = open_split(target, node, tls_for(node), source=GPT2, spec=spec, tail=tail,
                           config=ChannelConfig(connections=1))
        try:
            model = split.model.train()
            opt = torch.optim.Adam(model.parameters(), lr=3e-3)
            g = torch.Generator().manual_seed(100 + k)
            for i in range(steps):
                if proxy is not None:
                    proxy.cut_after(int(torch.randint(1, 8_000, (1,), generator=g)))  # a step moves ~10 kB
                ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(k * 1000 + i))
                split.runner.step = i
                loss = model(input_ids=ids, labels=ids).loss
                split.runner.pending_step = {"step": i}  # the server's step rides on the backward
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if split.runner.pending_step is not None:
                    split.runner.pending_step = None
                    split.client.request(MessageType.OPTIMIZER_STEP, {}, step=i)
            split.runner.confirm()
            server = {n: p.detach().clone() for n, p in split_server.segment(split).module.named_parameters()}
            return {n: p.detach().clone() for n, p in model.named_parameters()}, server
        finally:
            split.close()

    solo = [train(k, None) for k in range(8)]
    proxies = [FaultProxy(port) for _ in range(8)]
    results: list[Any] = [None] * 8
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            results[k] = train(k, proxies[k])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        for proxy in proxies:
            proxy.close()
    assert not errors, errors[0]
    assert sum(p.cuts for p in proxies) >= 8 * (steps - 1)
    for k in range(8):
        for side in (0, 1):
            for name, value in solo[k][side].items():
                torch.testing.assert_close(results[k][side][name], value, rtol=1e-5, atol=1e-6,
                                           msg=f"client {k} {'server' if side else 'client'} {name}")
