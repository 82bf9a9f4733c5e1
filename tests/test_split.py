"""The split forward and backward equal the whole model's, for every family and both shapes.

Real parts: a SplitService behind a real ChannelServer on a loopback port with mutual TLS from
our own certificates; the client builds its skeleton on the meta device and loads shipped weights.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from lightning_split.channel import ChannelConfig
from lightning_split.split.build import build_model
from lightning_split.split.connect import open_split
from lightning_split.split.shipping import part_nbytes
from lightning_split.split.spec import SplitSpec
from tests.split_cases import CASES, GPT2, main_output

ATOL = 1e-5


def _run(model: torch.nn.Module, inputs: dict, case_kind: str, result: str | None = None):
    """Forward, then backward of a fixed random projection of the output; returns output and grads."""
    inputs = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    if case_kind == "tensor":
        out = model(inputs["x"])
    else:
        kwargs = dict(inputs)
        if result is not None:
            kwargs["result"] = result
        out = model(**kwargs)
    y = main_output(out)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    loss = (y * weight).sum()
    if getattr(out, "loss", None) is not None:
        loss = loss + out.loss
    loss.backward()
    grad_in = next(v.grad for k, v in inputs.items() if k in ("x", "inputs_embeds"))
    return out, y.detach(), grad_in


@contextlib.contextmanager
def _connected(split_server, source, spec, service_kw=None, **open_kw):  # noqa: ANN001, ANN202
    """A SplitService for ``source`` cut by ``spec`` behind a mTLS server, and alice's client part."""
    address, tls_for = split_server(source, spec, **(service_kw or {}))
    remote = open_split(address, "alice", tls_for("alice"), source=source, spec=spec, **open_kw)
    try:
        yield remote
    finally:
        remote.close()


def _assert_same_run(split_run: tuple, local_run: tuple, client: torch.nn.Module, local: torch.nn.Module) -> None:
    """Outputs, input gradients, the loss and every client parameter gradient equal the local run's."""
    (out_r, y_r, gin_r), (out_l, y_l, gin_l) = split_run, local_run
    torch.testing.assert_close(y_r, y_l, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(gin_r, gin_l, atol=ATOL, rtol=1e-5)
    if getattr(out_l, "loss", None) is not None:
        torch.testing.assert_close(out_r.loss, out_l.loss, atol=ATOL, rtol=1e-5)
    _assert_client_grads_match(client, local)


def _assert_client_grads_match(client: torch.nn.Module, local: torch.nn.Module) -> None:
    """Every parameter of the client's part has the gradient its twin has in the whole model."""
    local_params = dict(local.named_parameters())
    client_params = dict(client.named_parameters())
    assert client_params, "the client part has parameters"
    checked = 0
    for name, p in client_params.items():
        ref = local_params[name]
        if ref.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, ref.grad, atol=ATOL, rtol=1e-5, msg=name)
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("shape", ["u_shape", "two_part"])
@pytest.mark.parametrize("family", list(CASES))
def test_split_matches_local(family, shape, split_server):
    case = CASES[family]
    spec = case.spec(shape)
    local = build_model(case.source)
    local.eval()
    inputs = case.inputs(local)
    if shape == "two_part" and hasattr(local, "lm_head"):
        # A two-part split unties tied embeddings: the output layer's copy lives on the server, so
        # the client's embedding gradient has no output-layer share. The reference unties them too.
        local.lm_head.weight = torch.nn.Parameter(local.lm_head.weight.detach().clone())

    address, tls_for = split_server(case.source, spec)
    remote = open_split(address, "alice", tls_for("alice"), source=case.source, spec=spec)
    try:
        remote.model.eval()
        result = None
        if shape == "two_part" and case.kind != "tensor":  # ask for more than the loss alone
            result = "hidden_states" if case.kind == "encoder" else "logits"
        out_l, y_l, gin_l = _run(local, inputs, case.kind)
        out_r, y_r, gin_r = _run(remote.model, inputs, case.kind, result)
        _assert_same_run((out_r, y_r, gin_r), (out_l, y_l, gin_l), remote.model, local)
    finally:
        remote.close()


@pytest.mark.parametrize("shape", ["u_shape", "two_part"])
def test_client_holds_only_its_part(shape, split_server):
    source = copy.deepcopy(GPT2)
    source.config.update(n_layer=12)
    spec = SplitSpec(cut=2, shape=shape)
    local = build_model(source)
    t = local.transformer
    expected = [t.wte, t.wpe, t.h[0], t.h[1]] + ([t.ln_f] if shape == "u_shape" else [])
    expected_bytes = sum(part_nbytes(m) for m in expected)  # lm_head is tied to wte in the U-shape

    address, tls_for = split_server(source, spec)
    remote = open_split(address, "alice", tls_for("alice"), source=source, spec=spec)
    try:
        assert part_nbytes(remote.model) == expected_bytes
        assert part_nbytes(remote.model) < part_nbytes(local) / 3
        names = {n for n, _ in remote.model.named_parameters()}
        assert not any(n.startswith("transformer.h.2.") or n.startswith("transformer.h.11.") for n in names)
        if shape == "u_shape":
            assert remote.model.lm_head.weight is remote.model.transformer.wte.weight
    finally:
        remote.close()


def test_architecture_mismatch_is_refused_at_handshake(split_server):
    from lightning_split.channel import RemoteError

    spec = SplitSpec(cut=1, shape="u_shape")
    address, tls_for = split_server(GPT2, spec)
    other = copy.deepcopy(GPT2)
    other.config.update(n_embd=32)
    with pytest.raises(RemoteError) as err:
        open_split(address, "alice", tls_for("alice"), source=other, spec=spec)
    assert "architecture mismatch" in str(err.value)


@pytest.mark.parametrize("family,shape,connections", [
    ("gpt2", "two_part", 1), ("gpt2", "two_part", 3), ("llama", "u_shape", 3), ("user_module", "u_shape", 1),
])
def test_micro_batches_in_flight_match_local(family, shape, connections, split_server):
    """A batch cut into micro-batches (all requests in flight at once) gives the whole batch's numbers,
    also over a stream bonded over several connections (16 KiB fragments: each carries some)."""
    case = CASES[family]
    spec = case.spec(shape)
    local = build_model(case.source).eval()
    if shape == "two_part" and hasattr(local, "lm_head"):
        local.lm_head.weight = torch.nn.Parameter(local.lm_head.weight.detach().clone())
    inputs = case.inputs(local)
    inputs = {k: torch.cat([v, v.flip(0), v]) for k, v in inputs.items()}  # batch 6 (3 for the MLPs: 9)
    if "labels" in inputs:
        inputs["labels"][1, :4] = -100  # uneven target counts: the loss weights micro-batches by them

    address, tls_for = split_server(case.source, spec, config=ChannelConfig(chunk_size=16 << 10))
    remote = open_split(address, "alice", tls_for("alice"), source=case.source, spec=spec, micro_batches=4,
                        config=ChannelConfig(chunk_size=16 << 10, connections=connections))
    try:
        assert len(remote.client._stream.calls) == connections
        remote.model.eval()
        out_l, y_l, gin_l = _run(local, inputs, case.kind)
        sent_before = remote.client.stats.messages
        out_r, y_r, gin_r = _run(remote.model, inputs, case.kind, "logits" if shape == "two_part" else None)
        assert remote.client.stats.messages - sent_before == 8  # 4 forwards and 4 backwards
        _assert_same_run((out_r, y_r, gin_r), (out_l, y_l, gin_l), remote.model, local)
    finally:
        remote.close()


def test_two_part_training_returns_the_loss_alone(split_server):
    """With labels and no result type asked for, the server answers with the loss only (no logits);
    it backpropagates at once, so the input gradient comes with it and the backward waits for nothing."""
    with _connected(split_server, GPT2, SplitSpec(cut=1, shape="two_part")) as remote:
        ids = torch.randint(0, 128, (2, 16))
        before = remote.client.stats.snapshot()
        out = remote.model(input_ids=ids, labels=ids)
        received = remote.client.stats.bytes_received - before.bytes_received
        assert out.logits is None and out.loss.dim() == 0
        grad_input_bytes = 2 * 16 * 64 * 4
        assert grad_input_bytes < received < grad_input_bytes + 1024  # not 2 x 16 x 128 logits (16 KiB)
        out.loss.backward()
        assert remote.runner.unconfirmed  # the BACKWARD (the scale for the server's gradients) not awaited
        remote.runner.confirm()


@pytest.mark.parametrize("fused,graphs", [(True, False), (True, True), (False, False)],
                         ids=["fused", "fused-graphs", "two-round-trips"])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_two_part_loss_training_matches_local(fused, graphs, micro_batches, split_server):
    """A loss-only training call, with the server's backward run at once (fused) or on the BACKWARD:
    the loss, the client's and the server's gradients equal the whole model's, over two accumulated
    batches whose losses are scaled (by 0.5, then 0.25) and whose micro-batches count uneven targets.
    ``graphs``: fused micro-batches whose shape recurs take the CUDA-graph path's bookkeeping (static
    buffers, gradients copied into the call's), the step run on CPU at each replay."""
    spec = SplitSpec(cut=1, shape="two_part")
    local = build_model(GPT2).train()
    local.lm_head.weight = torch.nn.Parameter(local.lm_head.weight.detach().clone())  # untied, like the split
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 128, (6, 16), generator=g) for _ in range(2)]
    labels = [ids.clone() for ids in batches]
    labels[0][1, :5] = -100
    labels[1][4, 2:] = -100
    with _connected(split_server, GPT2, spec, tail={"mode": "trainable"}, micro_batches=micro_batches) as remote:
        remote.runner.fuse_loss_backward = fused
        split_server.segment(remote).train_graphs.emulate = graphs
        model = remote.model.train()
        before = remote.client.stats.messages
        for ids, lab, scale in zip(batches, labels, (0.5, 0.25), strict=True):
            loss_l = local(input_ids=ids, labels=lab).loss
            (loss_l * scale).backward()
            loss_r = model(input_ids=ids, labels=lab).loss
            (loss_r * scale).backward()
            torch.testing.assert_close(loss_r, loss_l, atol=ATOL, rtol=1e-5)
        remote.runner.confirm()
        calls = 2 * (micro_batches + 1) if fused else 2 * 2 * micro_batches
        assert remote.client.stats.messages - before == calls
        _assert_client_grads_match(model, local)
        segment = split_server.segment(remote)
        assert not segment.call_grads.calls  # every fused call's gradients were applied
        # The first micro-batch of a shape runs eagerly, later ones replay: 3 ramped micro-batches
        # have 2, 3 and 1 rows, so only the second batch's replay.
        assert segment.train_graphs.stats["graph_steps"] == ({1: 1, 3: 3}[micro_batches] if graphs else 0)
        server = segment.module
        checked = 0
        for i, block in enumerate(server.blocks):
            for (n, p), (_, q) in zip(block.named_parameters(), local.transformer.h[spec.cut + i].named_parameters(),
                                      strict=True):
                torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=1e-5, msg=f"server block {i} {n}")
                checked += 1
        assert checked > 0


def test_result_output_types(split_server):
    """The result output instruction: the server returns exactly the type asked for, nothing more."""
    local = build_model(GPT2).eval()
    ids = torch.randint(0, 128, (3, 10))
    with _connected(split_server, GPT2, SplitSpec(cut=1, shape="two_part")) as remote:
        model = remote.model.eval()
        with torch.no_grad():
            want = local(input_ids=ids, labels=ids, output_hidden_states=True)
            top = model(input_ids=ids, result="topk", top_k=5)
            hidden = model(input_ids=ids, result="hidden_states")
            loss = model(input_ids=ids, labels=ids, result="loss")
            logits = model(input_ids=ids)
        assert set(top) - {"cache"} == {"topk_ids", "topk_scores"}  # cache: the client's own KV cache
        scores, idx = torch.topk(want.logits[:, -1, :], 5)
        torch.testing.assert_close(top.topk_scores, scores, atol=1e-5, rtol=1e-5)
        assert torch.equal(top.topk_ids, idx)
        # hidden states after the server's blocks, before the final norm (the last block's output)
        assert set(hidden) - {"cache"} == {"hidden_states"} and hidden.hidden_states.shape == (3, 10, 64)
        assert loss.logits is None
        torch.testing.assert_close(loss.loss, want.loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits.logits, want.logits, atol=1e-5, rtol=1e-5)


def test_forwards_without_backward_stay_bounded(split_server):
    """The server keeps at most max_graphs pending graphs; a backward for an evicted one is a clear error."""
    from lightning_split.channel import RemoteError

    spec = SplitSpec(cut=1, end=3)
    with _connected(split_server, CASES["sequential"].source, spec, service_kw={"max_graphs": 2}) as remote:
        x = torch.randn(4, 16)
        outs = [remote.model(x) for _ in range(3)]  # three forwards with autograd on, no backward yet
        with pytest.raises(RemoteError) as err:
            outs[0].sum().backward()
        assert "no pending forward for micro-batch" in str(err.value)
        outs[2].sum().backward()  # the newest ones are still there
        outs[1].sum().backward()


def test_segment_device_map(split_server):
    """A server segment placed block by block (here all on the CPU) gives the same numbers."""
    case = CASES["llama"]
    service_kw = {"device_map": {0: "cpu", 2: "cpu"}}
    with _connected(split_server, case.source, case.spec("two_part"), service_kw=service_kw) as remote:
        local = build_model(case.source).eval()
        ids = torch.randint(0, 128, (2, 8))
        torch.testing.assert_close(remote.model.eval()(input_ids=ids, labels=ids).loss,
                                   local(input_ids=ids, labels=ids).loss, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("body", [
    {"fused": {"call": "x", "weight": torch.tensor(0.5)}},
    {"fused": {"call": 1, "weight": torch.ones(3)}},
    {"fused": {"call": 1, "weight": torch.tensor(1)}},
    {"fused": {"weight": torch.tensor(0.5)}},
    {"fused": {"call": 1, "weight": torch.tensor(0.5)}, "result": "logits"},
    {"keep_last": -2, "_infer": True},
    {"keep_last": 999, "_infer": True},
], ids=["call-not-int", "weight-not-scalar", "weight-not-float", "no-call", "fused-logits", "keep-negative",
        "keep-too-many"])
def test_malformed_training_and_result_instructions(body, split_server):
    """Each gets INVALID_ARGUMENT with a message; the session keeps serving (and training) after it."""
    from lightning_split.channel import RemoteError
    from lightning_split.wire import MessageType, WireError

    spec = SplitSpec(cut=1, shape="two_part")
    with _connected(split_server, GPT2, spec, tail={"mode": "trainable"}) as remote:
        ids = torch.randint(0, 128, (2, 8))
        hidden = torch.randn(2, 8, 64)
        request = {"hidden": hidden, "id": 10_000, "labels": ids, "args": (), "kwargs": {}, "training": True}
        kind = MessageType.INFER if body.pop("_infer", False) else MessageType.FORWARD
        if kind == MessageType.INFER:
            request = {"hidden": hidden, "args": (), "kwargs": {}}
        # refused by the typed body's schema before it is sent (a wrong type), or by the server
        with pytest.raises((RemoteError, WireError)) as err:
            remote.client.request(kind, {**request, **body})
        assert err.value.code.name == "INVALID_ARGUMENT" and err.value.message
        with pytest.raises(RemoteError) as err:  # a fused call never opened, or a bad scale
            remote.client.request(MessageType.BACKWARD, {"id": 1, "call": 12345, "scale": torch.ones(2)})
        assert err.value.code.name == "INVALID_ARGUMENT"
        loss = remote.model.train()(input_ids=ids, labels=ids).loss
        loss.backward()
        remote.runner.confirm()
        assert torch.isfinite(loss)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_fused_loss_step_with_a_differentiable_block_argument(micro_batches, graphs, split_server):
    """A user module whose blocks take an argument computed from the input (``scale``): in the fused
    step its gradient comes back with the loss too, cut per micro-batch, scaled like the input's
    (``graphs``: the second of the two calls replays the graph path's bookkeeping)."""
    import torch.nn.functional as F

    case = CASES["user_module"]
    spec = case.spec("two_part")
    local = build_model(case.source).train()
    x = torch.randn(6, case.source.config["in_features"], generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 3, 1, 2, 4, 1]) % case.source.config.get("out_features", 5)
    x_l = x.clone().requires_grad_(True)
    (F.cross_entropy(local(x_l), labels) * 0.5).backward()
    with _connected(split_server, case.source, spec, tail={"mode": "trainable"}, micro_batches=micro_batches) as remote:
        segment = split_server.segment(remote)
        segment.train_graphs.emulate = graphs
        if graphs:  # a first call of the same shape, its gradients set aside: the next one replays
            remote.model.train()(x.clone().requires_grad_(True), labels=labels).backward()
            remote.runner.confirm()
            remote.model.zero_grad(set_to_none=True)
            for p in segment.module.parameters():
                p.grad = None
        x_r = x.clone().requires_grad_(True)
        before = remote.client.stats.messages
        loss = remote.model.train()(x_r, labels=labels)
        (loss * 0.5).backward()
        remote.runner.confirm()
        assert segment.train_graphs.stats["graph_steps"] == (2 * micro_batches - 1 if graphs else 0)
        assert remote.client.stats.messages - before == micro_batches + 1  # fused: no BACKWARD round trips
        torch.testing.assert_close(loss, F.cross_entropy(local(x), labels), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(x_r.grad, x_l.grad, atol=ATOL, rtol=1e-5)  # via the blocks and via scale
        _assert_client_grads_match(remote.model, local)


def test_many_loss_only_calls_before_one_backward(split_server):
    """Six loss-only calls before one backward (their losses summed): the first four are fused (the
    server keeps at most four calls' gradients apart), the rest run unfused; all equal local."""
    spec = SplitSpec(cut=1, shape="two_part")
    local = build_model(GPT2).train()
    local.lm_head.weight = torch.nn.Parameter(local.lm_head.weight.detach().clone())
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 128, (2, 10), generator=g) for _ in range(6)]
    sum(local(input_ids=ids, labels=ids).loss for ids in batches).backward()
    with _connected(split_server, GPT2, spec, tail={"mode": "trainable"}, micro_batches=1) as remote:
        model = remote.model.train()
        before = remote.client.stats.messages
        total = sum(model(input_ids=ids, labels=ids).loss for ids in batches)
        assert len(remote.runner.pending_loss_steps) == 4
        total.backward()
        remote.runner.confirm()
        assert remote.client.stats.messages - before == 4 * 2 + 2 * 2  # fused: 1 + 1; unfused: 2 round trips
        _assert_client_grads_match(model, local)
        segment = split_server.segment(remote)
        assert not segment.call_grads.calls and not remote.runner.pending_loss_steps
        for i, block in enumerate(segment.module.blocks):
            for (n, p), (_, q) in zip(block.named_parameters(), local.transformer.h[1 + i].named_parameters(),
                                      strict=True):
                torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=1e-5, msg=f"server block {i} {n}")


def test_a_failed_fused_backward_surfaces_at_the_next_check(split_server):
    """The fused BACKWARD is not awaited, but its failure is not lost: a second backward of the same
    loss (retain_graph) names a call the server already applied; confirm() raises its error, and a
    check that does not wait raises it too once the reply is in."""
    from lightning_split.channel import RemoteError

    spec = SplitSpec(cut=1, shape="two_part")
    with _connected(split_server, GPT2, spec, tail={"mode": "trainable"}) as remote:
        model = remote.model.train()
        ids = torch.randint(0, 128, (2, 8))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(retain_graph=True)
        loss.backward()
        with pytest.raises(RemoteError) as err:
            remote.runner.confirm()
        assert err.value.code.name == "INVALID_ARGUMENT" and "no pending fused call" in err.value.message
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward(retain_graph=True)
        loss.backward()
        remote.runner.unconfirmed[-1].exception(timeout=30)  # the reply is in
        with pytest.raises(RemoteError):
            model(input_ids=ids, labels=ids)  # the next training call checks without waiting
        model(input_ids=ids, labels=ids).loss.backward()  # and the session trains on
        remote.runner.confirm()


@pytest.mark.parametrize("ramp", [False, True])
def test_batch_ranges_cover_the_batch_once(ramp):
    """Micro-batch ranges are contiguous, non-empty and cover every row once; ramped, the first and
    the last hold about half the rows of the middle ones (and never more)."""
    from lightning_split.split.remote_autograd import batch_ranges

    for batch in range(0, 33):
        for chunks in range(1, 9):
            ranges = batch_ranges(batch, chunks, ramp)
            assert ranges[0][0] == 0 and ranges[-1][1] == batch
            assert all(a == b_prev for (_, b_prev), (a, _) in zip(ranges, ranges[1:], strict=False))
            sizes = [b - a for a, b in ranges]
            assert len(sizes) == min(chunks, max(batch, 1)) or (ramp and len(sizes) < chunks)
            if batch:
                assert min(sizes) > 0
            if ramp and chunks >= 3 and batch >= 2 * (chunks - 1):
                middle = sizes[1:-1]
                assert max(sizes[0], sizes[-1]) <= min(middle) and 2 * max(sizes[0], sizes[-1]) >= min(middle) - 1
    assert [b - a for a, b in batch_ranges(8, 4, ramp=True)] == [1, 3, 3, 1]
    assert [b - a for a, b in batch_ranges(8, 4)] == [2, 2, 2, 2]


def test_training_graphs_stay_bounded_when_shapes_keep_changing(split_server):
    """A client whose batch shape cycles through three sizes (more than a session's two graphs):
    the captures stop at MAX_CAPTURES, later calls run eagerly, and every loss still equals local."""
    from lightning_split.server.train_graphs import MAX_CAPTURES

    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 128, (2 + i % 3, 8), generator=g) for i in range(3 * (MAX_CAPTURES + 2))]
    graphs = _loss_only_calls_through_emulated_graphs(split_server, batches)
    assert graphs.stats["captures"] == MAX_CAPTURES and len(graphs.graphs) <= graphs.max_graphs
    assert graphs.stats["graph_steps"] > 0


def _loss_only_calls_through_emulated_graphs(split_server, batches: list[torch.Tensor]):  # noqa: ANN001, ANN202
    """Backpropagate a two-part GPT-2's loss-only call for each batch, the server's training graphs
    emulated on CPU; each loss equals local's. Returns the session's TrainGraphs."""
    spec = SplitSpec(cut=1, shape="two_part")
    local = build_model(GPT2).eval()
    with _connected(split_server, GPT2, spec, tail={"mode": "trainable"}, micro_batches=1) as remote:
        graphs = split_server.segment(remote).train_graphs
        graphs.emulate = True
        model = remote.model.eval()
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.testing.assert_close(loss, local(input_ids=ids, labels=ids).loss, atol=ATOL, rtol=1e-5)
        remote.runner.confirm()
    return graphs


def test_a_failed_training_graph_capture_leaves_that_shape_eager(split_server, monkeypatch):
    """A capture that raises (as one of an op CUDA graphs cannot hold would) is logged, its
    signature runs eagerly from then on and is never captured again, and the losses stay exact."""
    import lightning_split.server.train_graphs as train_graphs

    def not_capturable(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(train_graphs, "segment_reply", not_capturable)  # the graph path's only
    batches = [torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    graphs = _loss_only_calls_through_emulated_graphs(split_server, batches)
    assert graphs.stats["capture_failed"] == 1 and graphs.stats["captures"] == 0
    assert graphs.stats["graph_steps"] == 0 and len(graphs.failed) == 1
