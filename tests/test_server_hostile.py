"""Hostile and careless requests against a real SplitService behind a mutual-TLS server.

Each one gets a clear status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED...), leaves the session that
sent it serving, and leaves another tenant (another certificate, another node) with exactly the
result it gets alone: bob's training step runs across alice's requests (its forward before them,
its backward and optimizer step after) and must equal, bit for bit, the same step in a session of
its own. Everything is fp32 on the CPU; ``test_cuda_hostile.py`` sends the index attacks to a GPU.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from lightning_split.channel import ChannelConfig, RemoteError
from lightning_split.server.session_memory import tail_bytes
from lightning_split.split.connect import open_split
from lightning_split.split.spec import SplitSpec
from lightning_split.wire import MessageType, WireError
from tests.channel_util import wait_for
from tests.split_cases import GPT2

S = grpc.StatusCode
SPEC = SplitSpec(cut=1, shape="two_part")
LR = 0.1
TRAIN = {"mode": "trainable", "optimizer": {"name": "SGD", "lr": LR}}
WIDTH, VOCAB = GPT2.config["n_embd"], GPT2.config["vocab_size"]
NAN, INF = float("nan"), float("inf")
_ids = itertools.count(1000)  # request ids for hand-made bodies: never one the runner uses


def _tokens(seed: int, batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _connect(address: str, tls_for: Callable[[str], Any], node: str) -> Any:
    return open_split(address, node, tls_for(node), source=GPT2, spec=SPEC, tail=TRAIN, micro_batches=1)


def _train_step(remote: Any, ids: torch.Tensor, step: int) -> torch.Tensor:
    """One loss-only training call (fused on the server) and the server's optimizer step."""
    remote.runner.step = step
    loss = remote.model.train()(input_ids=ids, labels=ids).loss
    loss.backward()
    remote.runner.confirm()
    assert remote.client.request(MessageType.OPTIMIZER_STEP, {"lr": LR}, step=step).body["applied"]
    return loss.detach()


def _weights(split_server: Any, remote: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in split_server.segment(remote).module.named_parameters()}


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def _refused(code: S, send: Callable[[], Any], word: str = "") -> str:
    """Refused by the server, or, for a value of the wrong type for its field, by the typed body's
    schema before it leaves the client (WireError, the same status)."""
    with pytest.raises((RemoteError, WireError)) as err:
        send()
    assert err.value.code == code, err.value
    assert word.lower() in err.value.message.lower(), err.value.message
    return err.value.message


@contextlib.contextmanager
def _bob_steps_as_alone(split_server: Any, address: str, tls_for: Callable[[str], Any]) -> Iterator[None]:
    """bob's training step, its forward before the block and the rest after it, equals exactly
    the same step in a session with nothing else going on."""
    ids = _tokens(99)
    alone = _connect(address, tls_for, "bob")
    try:
        want_loss, want = _train_step(alone, ids, 0), _weights(split_server, alone)
    finally:
        alone.close()
    bob = _connect(address, tls_for, "bob")
    try:
        bob.runner.step = 0
        loss = bob.model.train()(input_ids=ids, labels=ids).loss  # the server holds its call's gradients
        yield
        loss.backward()
        bob.runner.confirm()
        assert bob.client.request(MessageType.OPTIMIZER_STEP, {"lr": LR}, step=0).body["applied"]
        assert torch.equal(loss.detach(), want_loss)
        _assert_same_weights(_weights(split_server, bob), want)
    finally:
        bob.close()


# -- hand-made requests ---------------------------------------------------------------------------


def _fused(call: int | None = None, batch: int = 2, length: int = 8, **changes: Any) -> dict[str, Any]:
    """A FORWARD of a loss-only call, backpropagated on the server at once, as the runner sends it."""
    call = next(_ids) if call is None else call
    g = torch.Generator().manual_seed(call)
    labels = torch.randint(0, VOCAB, (batch, length), generator=g)
    body = {"hidden": torch.randn(batch, length, WIDTH, generator=g), "id": call, "labels": labels,
            "result": "auto", "top_k": 0, "logits_to_keep": 0, "block": {}, "training": True,
            "input_grad": True, "fused": {"call": call, "weight": torch.tensor(1.0)}}
    body.update(changes)
    return body


def _plain(micro_id: Any, batch: int = 2, **changes: Any) -> dict[str, Any]:
    """A FORWARD whose graph waits for its BACKWARD (the logits are the result)."""
    body = _fused(batch=batch, result="logits", labels=None)
    del body["fused"]
    body.update(id=micro_id, **changes)
    return body


def _with(body: dict[str, Any], key: str, **changes: Any) -> dict[str, Any]:
    return {**body, key: {**body[key], **changes}}


PENDING_FORWARD, PENDING_CALL = 500, 600  # alice's, made before each hostile training request

# name: (message type, body, header step, status, a word of the message)
TRAINING_CASES: dict[str, tuple[int, Callable[[], Any], int, S, str]] = {
    "labels_at_vocab": (MessageType.FORWARD, lambda: _fused(labels=torch.full((2, 8), VOCAB)), 0,
                        S.INVALID_ARGUMENT, "labels"),
    "labels_huge": (MessageType.FORWARD, lambda: _fused(labels=torch.full((2, 8), 10**12)), 0,
                    S.INVALID_ARGUMENT, "labels"),
    "labels_minus_101": (MessageType.FORWARD, lambda: _fused(labels=torch.full((2, 8), -101)), 0,
                         S.INVALID_ARGUMENT, "labels"),
    "labels_very_negative": (MessageType.FORWARD, lambda: _fused(labels=torch.full((2, 8), -(2**62))), 0,
                             S.INVALID_ARGUMENT, "labels"),
    # found by the fuzzer (protocol 2): a string where a block wants its cache
    "string_for_the_cache": (MessageType.FORWARD, lambda: _plain(7, block={"extra": {"cache": "grad_norm"}}), 0,
                             S.INVALID_ARGUMENT, "field of its own"),
    "cache_by_another_name": (MessageType.FORWARD, lambda: _plain(7, block={"extra": {"layer_past": 3}}), 0,
                              S.INVALID_ARGUMENT, "field of its own"),
    "labels_float": (MessageType.FORWARD, lambda: _fused(labels=torch.zeros(2, 8)), 0, S.INVALID_ARGUMENT, "int64"),
    "labels_int32": (MessageType.FORWARD, lambda: _fused(labels=torch.zeros(2, 8, dtype=torch.int32)), 0,
                     S.INVALID_ARGUMENT, "int64"),
    "labels_wrong_shape": (MessageType.FORWARD, lambda: _fused(labels=torch.zeros(2, 7, dtype=torch.long)), 0,
                           S.INVALID_ARGUMENT, "shape"),
    "eval_labels_out_of_range": (MessageType.INFER, lambda: {**_plain(1, result="loss"),
                                                             "labels": torch.full((2, 8), VOCAB + 5)}, 0,
                                 S.INVALID_ARGUMENT, "labels"),
    "top_k_past_vocab": (MessageType.INFER, lambda: _plain(1, result="topk", top_k=VOCAB + 1), 0,
                         S.INVALID_ARGUMENT, "top_k"),
    "negative_position_ids": (MessageType.FORWARD, lambda: _fused(block={"position_ids": torch.full((1, 8), -3)}),
                              0, S.INVALID_ARGUMENT, "position_ids"),
    "integer_hidden": (MessageType.FORWARD, lambda: _fused(hidden=torch.zeros(2, 8, WIDTH, dtype=torch.long)), 0,
                       S.INVALID_ARGUMENT, "floating point"),
    "nan_hidden": (MessageType.FORWARD, lambda: _fused(hidden=torch.full((2, 8, WIDTH), NAN)), 0,
                   S.INVALID_ARGUMENT, "NaN"),
    "inf_hidden_plain": (MessageType.FORWARD, lambda: _plain(7, hidden=torch.full((2, 8, WIDTH), -INF)), 0,
                         S.INVALID_ARGUMENT, "NaN"),
    "nan_hidden_infer": (MessageType.INFER, lambda: _plain(8, hidden=torch.full((2, 8, WIDTH), NAN)), 0,
                         S.INVALID_ARGUMENT, "NaN"),
    "nan_grad_input": (MessageType.FORWARD, lambda: _fused(grad_inputs=[torch.tensor([NAN])]), 0,
                       S.INVALID_ARGUMENT, "grad input"),
    "nan_weight": (MessageType.FORWARD, lambda: _with(_fused(), "fused", weight=torch.tensor(NAN)), 0,
                   S.INVALID_ARGUMENT, "weight"),
    "inf_weight": (MessageType.FORWARD, lambda: _with(_fused(), "fused", weight=torch.tensor(INF)), 0,
                   S.INVALID_ARGUMENT, "weight"),
    "negative_micro_batch_id": (MessageType.FORWARD, lambda: _plain(-1), 0, S.INVALID_ARGUMENT, "micro-batch id"),
    "string_micro_batch_id": (MessageType.FORWARD, lambda: _plain("x"), 0, S.INVALID_ARGUMENT, "id"),
    "negative_call": (MessageType.FORWARD, lambda: _with(_fused(), "fused", call=-5), 0,
                      S.INVALID_ARGUMENT, "call"),
    "nan_output_gradient": (MessageType.BACKWARD,
                            lambda: {"id": PENDING_FORWARD, "grads": {"logits": torch.full((2, 8, VOCAB), NAN)}},
                            0, S.INVALID_ARGUMENT, "NaN"),
    "inf_scale": (MessageType.BACKWARD, lambda: {"call": PENDING_CALL, "scale": torch.tensor(INF)}, 0,
                  S.INVALID_ARGUMENT, "scale"),
    "then_step_nan_lr": (MessageType.BACKWARD,
                         lambda: {"call": PENDING_CALL, "scale": 1.0, "then_step": {"step": 0, "lr": NAN}},
                         0, S.INVALID_ARGUMENT, "learning rate"),
    "then_step_beyond_int62": (MessageType.BACKWARD,
                               lambda: {"call": PENDING_CALL, "scale": None, "then_step": {"step": 2**62, "lr": LR}},
                               0, S.INVALID_ARGUMENT, "step"),
    "then_step_negative": (MessageType.BACKWARD,
                           lambda: {"call": PENDING_CALL, "scale": None, "then_step": {"step": -1, "lr": LR}},
                           0, S.INVALID_ARGUMENT, "step"),
    "step_2_63": (MessageType.OPTIMIZER_STEP, lambda: {"lr": LR}, 2**63, S.INVALID_ARGUMENT, "step"),
    "step_2_64_minus_1": (MessageType.OPTIMIZER_STEP, lambda: {"lr": LR}, 2**64 - 1, S.INVALID_ARGUMENT, "step"),
    "nan_lr": (MessageType.OPTIMIZER_STEP, lambda: {"lr": NAN}, 1, S.INVALID_ARGUMENT, "learning rate"),
    "inf_lr": (MessageType.OPTIMIZER_STEP, lambda: {"lr": INF}, 1, S.INVALID_ARGUMENT, "learning rate"),
    "negative_lr": (MessageType.OPTIMIZER_STEP, lambda: {"lr": -0.1}, 1, S.INVALID_ARGUMENT, "learning rate"),
    "nan_clip_coef": (MessageType.OPTIMIZER_STEP, lambda: {"lr": LR, "clip_coef": NAN}, 1,
                      S.INVALID_ARGUMENT, "clipping"),
    "negative_clip_coef": (MessageType.OPTIMIZER_STEP, lambda: {"lr": LR, "clip_coef": -0.5}, 1,
                           S.INVALID_ARGUMENT, "clipping"),
    "unknown_optimizer_op": (MessageType.OPTIMIZER_STEP, lambda: {"op": "stepp"}, 1, S.INVALID_ARGUMENT, "op"),
}


@pytest.mark.parametrize("name", list(TRAINING_CASES))
def test_hostile_training_request(split_server, name: str) -> None:
    """Refused before it touches the session: alice's pending forward and fused call are still
    there and complete normally, alice trains on, and bob's step is exactly his step alone."""
    kind, body, step, code, word = TRAINING_CASES[name]
    address, tls_for = split_server(GPT2, SPEC)
    with _bob_steps_as_alone(split_server, address, tls_for):
        alice = _connect(address, tls_for, "alice")
        try:
            alice.client.request(MessageType.FORWARD, _plain(PENDING_FORWARD), step=0)
            alice.client.request(MessageType.FORWARD, _fused(PENDING_CALL), step=0)
            before = _weights(split_server, alice)
            _refused(code, lambda: alice.client.request(kind, body(), step=step), word)
            _assert_same_weights(_weights(split_server, alice), before)  # nothing was applied
            segment = split_server.segment(alice)
            assert PENDING_FORWARD in segment.graphs and PENDING_CALL in segment.call_grads
            grads = {"logits": torch.zeros(2, 8, VOCAB)}
            assert alice.client.request(MessageType.BACKWARD, {"id": PENDING_FORWARD, "grads": grads}).body
            alice.client.request(MessageType.BACKWARD, {"call": PENDING_CALL, "scale": None})
            assert torch.isfinite(_train_step(alice, _tokens(5), 0))
            assert segment.last_step == 0 and not segment.graphs
        finally:
            alice.close()


def test_labels_are_checked_on_every_training_path(split_server) -> None:
    """Eager fused, graph-replayed fused (the CUDA-graph path's bookkeeping, emulated on the CPU),
    a graph kept for BACKWARD and an evaluation loss: labels out of range never reach the loss."""
    address, tls_for = split_server(GPT2, SPEC)
    with _bob_steps_as_alone(split_server, address, tls_for):
        alice = _connect(address, tls_for, "alice")
        try:
            graphs = split_server.segment(alice).train_graphs
            graphs.emulate = True
            bad = torch.full((2, 8), VOCAB)
            for _ in range(3):  # the second captures this shape, the third replays it
                call = next(_ids)
                alice.client.request(MessageType.FORWARD, _fused(call))
                alice.client.request(MessageType.BACKWARD, {"call": call, "scale": None})
            assert graphs.stats["graph_steps"] == 2
            forward = alice.client.request
            _refused(S.INVALID_ARGUMENT, lambda: forward(MessageType.FORWARD, _fused(labels=bad)), "labels")
            assert graphs.stats["graph_steps"] == 2  # refused before its inputs were staged
            _refused(S.INVALID_ARGUMENT, lambda: alice.client.request(
                MessageType.FORWARD, _plain(next(_ids), result="loss", labels=bad)), "labels")
            _refused(S.INVALID_ARGUMENT, lambda: alice.client.request(
                MessageType.INFER, _plain(next(_ids), result="loss", labels=-bad)), "labels")
            assert not split_server.segment(alice).graphs
            assert torch.isfinite(_train_step(alice, _tokens(6), 0))
        finally:
            alice.close()


@pytest.mark.parametrize("tail", [
    ["trainable"], {"mode": "lora", "lora": "c_attn"}, {"mode": "lora", "lora": {"target_modules": [3]}},
    {"mode": "lora", "lora": {"target_modules": ["no_such_module"]}}, {"mode": "lora", "lora": {
        "target_modules": ["c_attn"], "r": "wide"}}, {"mode": "trainable", "optimizer": "SGD"},
    {"mode": "trainable", "optimizer": {"name": "SGD", "lr": "fast"}},
    {"mode": "trainable", "optimizer": {"name": "SGD", "lr": -1.0}},
    # found by the fuzzer (were INTERNAL): infinity for an int, a tensor for a number, a dict for a name
    {"mode": "lora", "lora": {"target_modules": ["c_attn"], "r": float("inf")}},
    {"mode": "trainable", "optimizer": {"name": "SGD", "lr": torch.zeros(3)}},
    {"mode": "trainable", "optimizer": {"name": {"a": 1}}},
    # a rank that would take seconds and gigabytes to build before the budget could refuse it
    {"mode": "lora", "lora": {"target_modules": ["c_attn"], "r": 1_000_000}},
    {"mode": "lora", "lora": {"target_modules": ["c_attn"], "r": 0}},
    {"mode": "lora", "lora": {"target_modules": ["c_attn"], "dropout": 1.5}},
], ids=["not-a-dict", "lora-not-a-dict", "lora-modules-not-names", "lora-modules-not-found", "lora-r-not-a-number",
        "optimizer-not-a-dict", "lr-not-a-number", "lr-negative", "lora-r-infinite", "lr-a-tensor",
        "optimizer-name-a-dict", "lora-r-huge", "lora-r-zero", "lora-dropout-out-of-range"])
def test_a_malformed_tail_option_is_refused_at_the_handshake(split_server, tail: Any) -> None:
    address, tls_for = split_server(GPT2, SPEC)
    with pytest.raises((RemoteError, WireError)) as err:  # WireError: no TailConfig can say it
        open_split(address, "alice", tls_for("alice"), source=GPT2, spec=SPEC, tail=tail)
    assert err.value.code == S.INVALID_ARGUMENT, err.value
    alice = _connect(address, tls_for, "alice")  # the server serves on
    try:
        assert torch.isfinite(_train_step(alice, _tokens(5), 0))
    finally:
        alice.close()


# -- the KV cache ---------------------------------------------------------------------------------


def _decode_step(past: int, batch: int = 2, **cache: Any) -> dict[str, Any]:
    """An INFER generation step of one new token on the session's cache."""
    return {"hidden": torch.randn(batch, 1, WIDTH), "block": {"kv_cache": True, "use_cache": True},
            "result": "logits", "top_k": 0, "logits_to_keep": 1, "cache": {"past": past, "new": 1, **cache}}


CACHE_CASES: dict[str, tuple[int, Callable[[int], dict[str, Any]], S, str]] = {
    "reorder_past_batch": (MessageType.CACHE, lambda t: {"op": "reorder", "beam_idx": torch.tensor([0, 2])},
                           S.INVALID_ARGUMENT, "beam_idx"),
    "reorder_negative": (MessageType.CACHE, lambda t: {"op": "reorder", "beam_idx": torch.tensor([-1, 0])},
                         S.INVALID_ARGUMENT, "beam_idx"),
    "reorder_huge": (MessageType.CACHE, lambda t: {"op": "reorder", "beam_idx": torch.tensor([2**40, 0])},
                     S.INVALID_ARGUMENT, "beam_idx"),
    "reorder_float": (MessageType.CACHE, lambda t: {"op": "reorder", "beam_idx": torch.tensor([1.0, 0.0])},
                      S.INVALID_ARGUMENT, "beam_idx"),
    "reorder_2d": (MessageType.CACHE, lambda t: {"op": "reorder", "beam_idx": torch.tensor([[1, 0]])},
                   S.INVALID_ARGUMENT, "beam_idx"),
    "reorder_empty": (MessageType.CACHE, lambda t: {"op": "reorder", "beam_idx": torch.tensor([], dtype=torch.long)},
                      S.INVALID_ARGUMENT, "beam_idx"),
    "step_reorder_past_batch": (MessageType.INFER, lambda t: _decode_step(t, reorder=torch.tensor([1, 5])),
                                S.INVALID_ARGUMENT, "beam_idx"),
    "negative_past": (MessageType.INFER, lambda t: _decode_step(-1), S.INVALID_ARGUMENT, "past"),
    "huge_past": (MessageType.INFER, lambda t: _decode_step(2**40), S.INVALID_ARGUMENT, "past"),
    "huge_new": (MessageType.INFER, lambda t: {**_decode_step(t), "cache": {"past": t, "new": 2**40}},
                 S.INVALID_ARGUMENT, "new"),
    "new_not_the_hidden_state": (MessageType.INFER, lambda t: {**_decode_step(t), "cache": {"past": t, "new": 3}},
                                 S.INVALID_ARGUMENT, "new"),
    "past_out_of_step": (MessageType.INFER, lambda t: _decode_step(t + 3), S.FAILED_PRECONDITION, "out of step"),
    "batch_not_the_cache": (MessageType.INFER, lambda t: _decode_step(t, batch=5), S.FAILED_PRECONDITION,
                            "sequences"),
    "unknown_op": (MessageType.CACHE, lambda t: {"op": "shrink"}, S.INVALID_ARGUMENT, "op"),
    # speculative decoding's crop: only ever to fewer tokens than held, and only as a bool
    "crop_growing": (MessageType.INFER, lambda t: _decode_step(t + 3, crop=True), S.FAILED_PRECONDITION,
                     "out of step"),
    "crop_not_a_bool": (MessageType.INFER, lambda t: _decode_step(t - 1, crop="yes"), S.INVALID_ARGUMENT, "crop"),
    "crop_then_refused": (MessageType.INFER, lambda t: _decode_step(t - 2, batch=5, crop=True),
                          S.FAILED_PRECONDITION, "sequences"),
}


@pytest.mark.parametrize("fast_decode", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", list(CACHE_CASES))
def test_hostile_cache_request(split_server, name: str, fast_decode: bool) -> None:
    """Refused with the cache untouched: generation goes on from where it was and makes exactly the
    tokens a fresh session makes; bob's training step is his step alone."""
    kind, body, code, word = CACHE_CASES[name]
    address, tls_for = split_server(GPT2, SPEC, fast_decode=fast_decode)
    ids = _tokens(3, length=6)
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with _bob_steps_as_alone(split_server, address, tls_for):
        alice = _connect(address, tls_for, "alice")
        try:
            model = alice.model.eval()
            want = model.generate(ids, **greedy)
            info = alice.client.request(MessageType.CACHE, {"op": "info"}).body
            assert info["tokens"] == ids.shape[1] + 3
            _refused(code, lambda: alice.client.request(kind, body(info["tokens"])), word)
            assert alice.client.request(MessageType.CACHE, {"op": "info"}).body == info
            assert torch.equal(model.generate(ids, **greedy), want)
        finally:
            alice.close()


@pytest.mark.parametrize("fast_decode", [False, True], ids=["dynamic", "static"])
def test_kv_cache_over_max_cache_bytes_is_refused_and_holds_nothing(split_server, fast_decode: bool) -> None:
    """The server counts the cache's bytes itself (batch x tokens x layers x 2 x kv_heads x head_dim x
    4 bytes; a static cache its whole capacity) and refuses a step before it allocates anything."""
    per_token = 3 * 2 * WIDTH * 4  # three server blocks, keys and values of n_embd floats
    limit = 2 * 16 * per_token  # two sequences of 16 tokens
    if fast_decode:  # a static cache holds its capacity: at least 256 tokens
        limit = 2 * 256 * per_token
    address, tls_for = split_server(GPT2, SPEC, fast_decode=fast_decode, max_cache_bytes=limit)
    alice = _connect(address, tls_for, "alice")
    try:
        model, segment = alice.model.eval(), split_server.segment(alice)
        greedy = dict(do_sample=False, pad_token_id=0)
        model.generate(_tokens(1, batch=2), max_new_tokens=4, **greedy)  # within the limit
        held = segment.held_bytes()["kv_cache"]
        assert held == segment.kv.nbytes() > 0  # the projection is what the cache holds
        if not fast_decode:  # longer sequences: the 17th token of two is over the limit
            _refused(S.RESOURCE_EXHAUSTED, lambda: model.generate(_tokens(1, batch=2, length=14), max_new_tokens=8,
                                                                   **greedy), "max_cache_bytes")
            assert segment.kv.tokens() == 16  # the last step was refused, the cache as it was
        prompt = _tokens(2, batch=3, length=12)  # three sequences: over the limit from the prompt on
        _refused(S.RESOURCE_EXHAUSTED, lambda: model.generate(prompt, max_new_tokens=2, **greedy), "max_cache_bytes")
        info = alice.client.request(MessageType.CACHE, {"op": "info", "held": True}).body
        assert info["held"]["kv_cache"] <= limit and info["bytes"] <= limit
        alice.client.request(MessageType.CACHE, {"op": "reset"})
        info = alice.client.request(MessageType.CACHE, {"op": "info", "held": True}).body
        tail = tail_bytes(split_server.servers[-1].handler.segment, TRAIN)  # the session's own weights
        assert info == {"tokens": 0, "bytes": 0, "held": {"graphs": 0, "kv_cache": 0, "tail": tail}}
        _refused(S.RESOURCE_EXHAUSTED, lambda: model.generate(prompt, max_new_tokens=2, **greedy), "max_cache_bytes")
        assert segment.kv.nbytes() == 0 and segment.held_bytes()["kv_cache"] == 0  # nothing was allocated
        if fast_decode:
            assert segment.fast.cache is None
        assert model.generate(_tokens(1, batch=2), max_new_tokens=4, **greedy).shape == (2, 12)  # it serves on
    finally:
        alice.close()


def test_beam_reorder_to_a_larger_batch_is_charged_first(split_server) -> None:
    """A reorder that grows the batch (only a DynamicCache follows it) is refused over the limit,
    and the cache keeps its rows."""
    per_token = 3 * 2 * WIDTH * 4
    address, tls_for = split_server(GPT2, SPEC, max_cache_bytes=3 * 11 * per_token)
    alice = _connect(address, tls_for, "alice")
    try:
        alice.model.eval().generate(_tokens(1, batch=2), max_new_tokens=4, do_sample=False, pad_token_id=0)
        segment = split_server.segment(alice)
        before = segment.held_bytes()
        _refused(S.RESOURCE_EXHAUSTED, lambda: alice.client.request(
            MessageType.CACHE, {"op": "reorder", "beam_idx": torch.tensor([0, 1, 1, 0, 0])}), "max_cache_bytes")
        assert segment.kv.batch() == 2 and segment.held_bytes() == before
        info = alice.client.request(MessageType.CACHE, {"op": "reorder", "beam_idx": torch.tensor([1, 1, 0])}).body
        assert segment.kv.batch() == 3 and segment.held_bytes()["kv_cache"] == info["bytes"] == 3 * 11 * per_token
    finally:
        alice.close()


# -- memory budgets -------------------------------------------------------------------------------


NODE_BUDGET = ChannelConfig(memory_bytes=0, node_memory_bytes=1 << 20)  # 1 MiB per node, no server total


def test_a_node_over_its_memory_budget_is_refused_and_others_go_on(split_server) -> None:
    """Saved activations and KV cache are charged to the node: alice's forward of 8 sequences (about
    1.4 MiB of saved activations) and her cache of 32 are refused, bob's steps go on exactly."""
    address, tls_for = split_server(GPT2, SPEC, config=NODE_BUDGET)
    server = split_server.servers[-1]
    # Each trainable tail is charged its copy, gradients and optimizer state when it is made: the
    # 1 MiB is what is left per node for activations and caches on top of that.
    tail = tail_bytes(server.handler.segment, TRAIN)
    server.budget.node_bytes = tail + (1 << 20)
    with _bob_steps_as_alone(split_server, address, tls_for):
        alice = _connect(address, tls_for, "alice")
        try:
            segment = split_server.segment(alice)
            alice.client.request(MessageType.FORWARD, _plain(1))  # two sequences: within the budget
            kept = segment.held_bytes()["graphs"]
            assert 0 < kept < 1 << 20 and server.budget.account("alice").used >= kept + tail
            _refused(S.RESOURCE_EXHAUSTED, lambda: alice.client.request(MessageType.FORWARD, _plain(2, batch=8)),
                     "memory budget")
            _refused(S.RESOURCE_EXHAUSTED, lambda: alice.client.request(MessageType.FORWARD, _fused(batch=8)),
                     "memory budget")
            assert list(segment.graphs) == [1] and segment.held_bytes()["graphs"] == kept
            _refused(S.RESOURCE_EXHAUSTED, lambda: alice.model.eval().generate(
                _tokens(4, batch=32, length=30), max_new_tokens=2, do_sample=False, pad_token_id=0), "memory budget")
            assert segment.held_bytes()["kv_cache"] == 0
            alice.client.request(MessageType.BACKWARD, {"id": 1, "grads": {}})
            assert segment.held_bytes() == {"graphs": 0, "kv_cache": 0, "tail": tail}
            assert torch.isfinite(_train_step(alice, _tokens(5), 0))
        finally:
            alice.close()
    assert wait_for(lambda: not server.budget.usage())  # every session closed: everything charged came back


def test_trainable_tails_are_charged_before_they_are_made(split_server) -> None:
    """A trainable tail copies the segment and keeps gradients and optimizer state: a node whose
    budget holds two such tails gets a third refused at the handshake, before the copy is made,
    while another node opens its own."""
    adam = {"mode": "trainable", "optimizer": {"name": "AdamW", "lr": 1e-3}}
    address, tls_for = split_server(GPT2, SPEC, config=ChannelConfig(memory_bytes=0, node_memory_bytes=1 << 30))
    server = split_server.servers[-1]
    tail = tail_bytes(server.handler.segment, adam)
    params = sum(p.numel() * p.element_size() for p in server.handler.segment.parameters())
    assert tail >= 5 * params  # the copy, its gradients, fused-call gradients, two AdamW moments
    server.budget.node_bytes = 2 * tail + (1 << 16)
    opened = [open_split(address, "alice", tls_for("alice"), source=GPT2, spec=SPEC, tail=adam) for _ in range(2)]
    try:
        used = server.budget.account("alice").used  # the tails, and a payload buffer per stream
        assert 2 * tail <= used < 2 * tail + (1 << 16)
        with pytest.raises(RemoteError) as err:
            open_split(address, "alice", tls_for("alice"), source=GPT2, spec=SPEC, tail=adam)
        assert err.value.code == S.RESOURCE_EXHAUSTED and "trainable tail" in err.value.message
        assert len(server.sessions) == 2 and server.budget.account("alice").used == used
        frozen = open_split(address, "alice", tls_for("alice"), source=GPT2, spec=SPEC)  # costs no copy
        bob = open_split(address, "bob", tls_for("bob"), source=GPT2, spec=SPEC, tail=adam)
        assert tail <= server.budget.account("bob").used < tail + (1 << 16)
        frozen.close()
        bob.close()
    finally:
        for remote in opened:
            remote.close()
    assert wait_for(lambda: not server.budget.usage())


def test_lora_adapters_are_charged_before_they_are_made(split_server) -> None:
    """LoRA adapters are counted from the target modules' shapes before peft builds them: the count
    equals what was built, and a rank over the node's budget is refused before anything is made."""
    lora = {"mode": "lora", "lora": {"target_modules": ["c_attn", "c_proj"], "r": 4},
            "optimizer": {"name": "Adam", "lr": 1e-3}}
    address, tls_for = split_server(GPT2, SPEC, config=ChannelConfig(memory_bytes=0, node_memory_bytes=1 << 30))
    server = split_server.servers[-1]
    counted = tail_bytes(server.handler.segment, lora)
    alice = open_split(address, "alice", tls_for("alice"), source=GPT2, spec=SPEC, tail=lora)
    try:
        adapters = split_server.segment(alice).trainable
        built = sum(p.numel() * p.element_size() for p in adapters)
        assert adapters and counted == built * 5  # values, gradients, fused-call gradients, two Adam moments
        wide = {**lora, "lora": {**lora["lora"], "r": 1024}}
        server.budget.node_bytes = tail_bytes(server.handler.segment, wide) - 1
        with pytest.raises(RemoteError) as err:
            open_split(address, "alice", tls_for("alice"), source=GPT2, spec=SPEC, tail=wide)
        assert err.value.code == S.RESOURCE_EXHAUSTED and "trainable tail" in err.value.message
        assert len(server.sessions) == 1
        assert torch.isfinite(_train_step(alice, _tokens(5), 0))
    finally:
        alice.close()
    assert wait_for(lambda: not server.budget.usage())


def test_forwards_without_backward_stay_bounded_and_are_freed_at_close(split_server, monkeypatch) -> None:
    """70 forwards whose backward never comes: 64 graphs kept (the oldest dropped), their bytes
    charged to the node; closing the session gives everything back and frees the session's module
    and every tensor autograd saved at once, with no garbage collection."""
    from lightning_split.server import session_memory

    saved: list[weakref.ref] = []
    pack = session_memory.SavedBytes.pack

    def pack_and_watch(self: Any, t: torch.Tensor) -> torch.Tensor:
        packed = pack(self, t)
        saved.append(weakref.ref(packed))
        return packed

    monkeypatch.setattr(session_memory.SavedBytes, "pack", pack_and_watch)
    address, tls_for = split_server(GPT2, SPEC)
    server = split_server.servers[-1]
    alice = _connect(address, tls_for, "alice")
    segment = split_server.segment(alice)
    for micro_id in range(70):
        alice.client.request(MessageType.FORWARD, _plain(micro_id))
    assert list(segment.graphs) == list(range(6, 70))
    held = segment.held_bytes()["graphs"]
    assert held == sum(segment.memory.graphs.values()) and len(segment.memory.graphs) == 64
    assert server.budget.account("alice").held((segment.memory.session_id, "graphs")) == held
    _refused(S.INVALID_ARGUMENT, lambda: alice.client.request(MessageType.BACKWARD, {"id": 0, "grads": {}}),
             "no pending forward")
    alice.client.request(MessageType.FORWARD, _fused())  # the session trains on
    module = weakref.ref(segment.module)
    del segment
    gc.disable()
    try:
        alice.close()
        assert wait_for(lambda: module() is None)  # no reference cycle kept its weights and graphs alive
        assert len(saved) > 64 and wait_for(lambda: all(ref() is None for ref in saved))
    finally:
        gc.enable()
    assert wait_for(lambda: not server.budget.usage())


# -- steps ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["fused-then-step", "two-round-trips-step-on-backward"])
def test_a_replayed_step_discards_its_gradients(split_server, fused: bool) -> None:
    """Step 0, step 0 again (a retry: acknowledged, not applied), step 1: the weights are exactly
    those of steps 0 and 1 alone; the retry's gradients never reach step 1."""
    address, tls_for = split_server(GPT2, SPEC)
    first, retry, second = _tokens(10), _tokens(11), _tokens(12)

    def run(replay: bool) -> dict[str, torch.Tensor]:
        remote = _connect(address, tls_for, "alice")
        remote.runner.fuse_loss_backward = fused
        try:
            _train_step(remote, first, 0)
            if replay:
                remote.runner.step = 0
                loss = remote.model.train()(input_ids=retry, labels=retry).loss
                if fused:
                    loss.backward()
                    remote.runner.confirm()
                    reply = remote.client.request(MessageType.OPTIMIZER_STEP, {"lr": LR}, step=0).body
                    assert reply == {"applied": False, "last_step": 0}
                else:  # the step rides on the backward, as the strategy sends it
                    remote.runner.pending_step = {"lr": LR, "step": 0}
                    loss.backward()
                    assert remote.runner.pending_step is None
            _train_step(remote, second, 1)
            return _weights(split_server, remote)
        finally:
            remote.close()

    _assert_same_weights(run(replay=True), run(replay=False))


def test_a_replayed_step_drops_its_pending_fused_calls(split_server) -> None:
    """A fused call of step 0 still waiting for its BACKWARD when step 0 is retried belongs to that
    step: it is dropped, and its late BACKWARD is a clear error."""
    address, tls_for = split_server(GPT2, SPEC)
    alice = _connect(address, tls_for, "alice")
    try:
        _train_step(alice, _tokens(1), 0)
        call = next(_ids)
        alice.client.request(MessageType.FORWARD, _fused(call), step=0)
        later = next(_ids)
        alice.client.request(MessageType.FORWARD, _fused(later), step=1)  # the next step's: kept
        assert not alice.client.request(MessageType.OPTIMIZER_STEP, {"lr": LR}, step=0).body["applied"]
        segment = split_server.segment(alice)
        assert call not in segment.call_grads and later in segment.call_grads
        _refused(S.INVALID_ARGUMENT, lambda: alice.client.request(MessageType.BACKWARD, {"call": call, "scale": 1.0}),
                 "no pending fused call")
        alice.client.request(MessageType.BACKWARD, {"call": later, "scale": 1.0})
        assert alice.client.request(MessageType.OPTIMIZER_STEP, {"lr": LR}, step=1).body["applied"]
    finally:
        alice.close()


def test_allow_nonfinite_lets_nan_through(split_server) -> None:
    """SplitService(allow_nonfinite=True) (serve.yaml: server.allow_nonfinite): the server computes
    with what it is given; a negative learning rate is still refused."""
    address, tls_for = split_server(GPT2, SPEC, allow_nonfinite=True)
    alice = _connect(address, tls_for, "alice")
    try:
        reply = alice.client.request(MessageType.FORWARD, _fused(hidden=torch.full((2, 8, WIDTH), NAN))).body
        assert torch.isnan(reply["loss"])
        reply = alice.client.request(MessageType.INFER, _plain(1, hidden=torch.full((2, 8, WIDTH), INF))).body
        assert not torch.isfinite(reply["logits"]).all()
        _refused(S.INVALID_ARGUMENT, lambda: alice.client.request(MessageType.OPTIMIZER_STEP, {"lr": -1.0}, step=0),
                 "learning rate")
    finally:
        alice.close()
