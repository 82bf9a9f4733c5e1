"""Several sessions' INFER steps run as one batched forward of the server's shared segment.

Real clients on real mTLS channels, each in its own thread (as separate terminals would be),
against one server with batching on (on CPU it is off by default; a long window here, so that
steps from different sessions surely meet). Every session gets exactly the tokens or outputs it
gets from the same model run locally, and the batcher did batch them.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lightning_split.server.activity import Reading, status_line
from lightning_split.split.build import build_model
from lightning_split.split.connect import open_split
from lightning_split.split.spec import SplitSpec
from tests.split_cases import GPT2, LLAMA, MLP

SOURCES = {"gpt2": GPT2, "llama": LLAMA}
SHAPES = {"u_shape": SplitSpec(cut=1, end=3, shape="u_shape"), "two_part": SplitSpec(cut=1, shape="two_part")}
CLIENTS = 3


def _service(split_server):  # noqa: ANN001, ANN202
    return split_server.servers[-1].handler


def _in_threads(fn, n: int) -> list:  # noqa: ANN001
    """``fn(i)`` in n threads started together; their results, or the first error raised."""
    results, errors = [None] * n, []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def _concurrent_generation(split_server, family: str, shape: str, device: str = "cpu",  # noqa: ANN001
                           graphs: bool = False, **service_kw) -> None:
    source, spec = SOURCES[family], SHAPES[shape]
    address, tls_for = split_server(source, spec, device=device, fast_decode=True, batch_window_ms=200, **service_kw)
    service = _service(split_server)
    if device == "cpu":  # the batch's graph bookkeeping, with the step rerun at each replay
        service.batcher.graphs = service.batcher.emulate_graphs = graphs
    local = build_model(source, device=device).eval()
    # Prompts of different lengths: each row of a batch sits at its own position.
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 128, (1, 4 + 3 * i), generator=g).to(device) for i in range(CLIENTS)]
    remotes = [open_split(address, "alice", tls_for("alice"), source=source, spec=spec, device=device)
               for _ in range(CLIENTS)]
    try:
        kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
        got = _in_threads(lambda i: remotes[i].model.eval().generate(prompts[i], **kw), CLIENTS)
        for i in range(CLIENTS):
            assert torch.equal(got[i], local.generate(prompts[i], **kw)), f"client {i}"
        stats = service.batcher.stats
        assert max(stats.sizes) > 1, f"no decode steps were batched: {dict(stats.sizes)}"
        decoders = [split_server.segment(r).fast for r in remotes]
        assert sum(d.stats["batched_steps"] for d in decoders) >= CLIENTS * 4
        if graphs:  # the same stack came back: its step replayed a graph
            assert stats.graphs["graph_steps"] >= 4 and stats.graphs["captures"] >= 1, stats.graphs
        # The operator sees it: batch sizes, queue wait, each session's KV cache.
        line, _ = status_line(split_server.servers[-1], service.activity, Reading())
        assert "sessions' steps on average" in line and "ms queue wait" in line and "MiB/session" in line, line
    finally:
        for r in remotes:
            r.close()


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-emulated"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("family", list(SOURCES))
def test_concurrent_generation_is_batched_and_exact(split_server, family, shape, graphs):
    _concurrent_generation(split_server, family, shape, graphs=graphs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("family", list(SOURCES))
def test_cuda_concurrent_generation_is_batched_and_exact(split_server, family, shape, exact_matmuls):
    """On a GPU: the sessions' solo steps replay their CUDA graphs, their batched steps share a stack."""
    _concurrent_generation(split_server, family, shape, device="cuda", graphs=True)
    assert _service(split_server).batcher.stats.graphs["graph_steps"] > 0


def test_a_session_alone_is_not_batched(split_server):
    """One client decoding alone runs its own path (on a GPU: its CUDA graph), never waiting."""
    spec = SHAPES["two_part"]
    address, tls_for = split_server(GPT2, spec, fast_decode=True, batch_window_ms=200)
    remote = open_split(address, "alice", tls_for("alice"), source=GPT2, spec=spec)
    try:
        ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(1))
        remote.model.eval().generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        stats = _service(split_server).batcher.stats
        assert stats.batches == 0 and stats.solo >= 5
        assert split_server.segment(remote).fast.stats["static_steps"] == 6
    finally:
        remote.close()


def test_sessions_that_join_and_leave_keep_their_tokens(split_server):
    """Sessions meeting in changing company (a new stack, rows of an older one) stay exact."""
    spec = SHAPES["u_shape"]
    address, tls_for = split_server(LLAMA, spec, fast_decode=True, batch_window_ms=100)
    batcher = _service(split_server).batcher
    batcher.graphs = batcher.emulate_graphs = True  # stacks made, left and replayed in changing company
    local = build_model(LLAMA).eval()
    g = torch.Generator().manual_seed(3)
    lengths = [(5, 16), (9, 6), (3, 10), (6, 3)]  # (prompt, new tokens): they finish at different times
    prompts = [torch.randint(3, 128, (1, n), generator=g) for n, _ in lengths]
    remotes = [open_split(address, "alice", tls_for("alice"), source=LLAMA, spec=spec) for _ in lengths]
    try:
        def generate_twice(i: int) -> list[torch.Tensor]:
            kw = {"max_new_tokens": lengths[i][1], "do_sample": False, "pad_token_id": 0}
            return [remotes[i].model.eval().generate(prompts[i], **kw) for _ in range(2)]

        got = _in_threads(generate_twice, len(lengths))
        for i, (_, new) in enumerate(lengths):
            want = local.generate(prompts[i], max_new_tokens=new, do_sample=False, pad_token_id=0)
            for run in got[i]:
                assert torch.equal(run, want), f"client {i}"
        assert max(_service(split_server).batcher.stats.sizes) > 1
    finally:
        for r in remotes:
            r.close()


def test_stateless_inference_of_equal_shape_is_batched(split_server):
    """INFER without a KV cache (a classifier's prediction): equal shapes run as one forward."""
    spec = SplitSpec(cut=1, shape="two_part")
    address, tls_for = split_server(MLP, spec, batch_window_ms=200)
    local = build_model(MLP).eval()
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn(4, 16, generator=g) for _ in range(CLIENTS)]
    remotes = [open_split(address, "alice", tls_for("alice"), source=MLP, spec=spec) for _ in range(CLIENTS)]
    try:
        def predict(i: int) -> list[torch.Tensor]:
            with torch.no_grad():
                return [remotes[i].model.eval()(inputs[i]) for _ in range(4)]

        got = _in_threads(predict, CLIENTS)
        with torch.no_grad():
            for i in range(CLIENTS):
                want = local(inputs[i])
                for out in got[i]:
                    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        assert max(_service(split_server).batcher.stats.sizes) > 1
    finally:
        for r in remotes:
            r.close()


def test_batching_is_off_on_cpu_by_default(split_server):
    split_server(GPT2, SHAPES["two_part"], fast_decode=True)
    assert _service(split_server).batcher is None


def test_a_full_pool_leaves_a_session_to_its_own_path(split_server):
    """More sessions than the pool has rows (max_batch): the ones without a row decode alone, exactly."""
    spec = SHAPES["two_part"]
    address, tls_for = split_server(GPT2, spec, fast_decode=True, batch_window_ms=200, max_batch=2)
    batcher = _service(split_server).batcher
    batcher.graphs = batcher.emulate_graphs = True
    local = build_model(GPT2).eval()
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 128, (1, 5 + i), generator=g) for i in range(CLIENTS)]
    remotes = [open_split(address, "alice", tls_for("alice"), source=GPT2, spec=spec) for _ in range(CLIENTS)]
    try:
        kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
        got = _in_threads(lambda i: remotes[i].model.eval().generate(prompts[i], **kw), CLIENTS)
        for i in range(CLIENTS):
            assert torch.equal(got[i], local.generate(prompts[i], **kw)), f"client {i}"
        assert batcher.stats.graphs["admitted"] == 2 and max(batcher.stats.sizes) == 2
        steps = [split_server.segment(r).fast.stats["batched_steps"] for r in remotes]
        assert sorted(steps)[0] == 0 and sum(steps) > 0, steps  # one session never had a row
    finally:
        for r in remotes:
            r.close()


def test_a_closed_session_frees_its_row_for_the_next(split_server):
    spec = SHAPES["u_shape"]
    address, tls_for = split_server(LLAMA, spec, fast_decode=True, batch_window_ms=200, max_batch=2)
    batcher = _service(split_server).batcher
    local = build_model(LLAMA).eval()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 128, (1, 6), generator=g) for _ in range(2)]
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    want = [local.generate(p, **kw) for p in prompts]
    remotes = [open_split(address, "alice", tls_for("alice"), source=LLAMA, spec=spec) for _ in range(2)]
    try:
        got = _in_threads(lambda i: remotes[i].model.eval().generate(prompts[i], **kw), 2)
        assert all(torch.equal(got[i], want[i]) for i in range(2)) and batcher.stats.graphs["admitted"] == 2
        remotes[0].close()
        remotes[0] = open_split(address, "alice", tls_for("alice"), source=LLAMA, spec=spec)
        got = _in_threads(lambda i: remotes[i].model.eval().generate(prompts[i], **kw), 2)
        assert all(torch.equal(got[i], want[i]) for i in range(2))
        assert batcher.stats.graphs["admitted"] == 3  # the new session took the closed one's row
        assert split_server.segment(remotes[0]).fast.stats["batched_steps"] > 0
    finally:
        for r in remotes:
            r.close()
