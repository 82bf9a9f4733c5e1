"""Index attacks against a segment on the GPU: each is refused on the host, and the process lives on.

An index out of range that reached a CUDA kernel (a label past the vocabulary in the loss, a beam
index in a cache reorder, a cache slot) would be a device-side assert: the CUDA context of the
whole process, the server's and here the test's, is unusable after one. So every request below
must come back INVALID_ARGUMENT, and the same process must then still run CUDA work, generate
exactly the tokens it generated before and train. Skipped without CUDA (CI has none).
"""

from __future__ import annotations

import pytest
import torch

from lightning_split.wire import MessageType
from tests.test_server_hostile import (
    GPT2,
    SPEC,
    VOCAB,
    WIDTH,
    S,
    _connect,
    _decode_step,
    _fused,
    _ids,
    _plain,
    _refused,
    _tokens,
    _train_step,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GREEDY = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


def _hostile(tokens: int) -> list[tuple[int, dict]]:
    """Requests whose indices are out of range; ``tokens``: what the session's cache holds."""
    labels = torch.full((2, 8), VOCAB)
    return [
        (MessageType.FORWARD, _fused(labels=labels)),
        (MessageType.FORWARD, _fused(labels=torch.full((2, 8), -101))),
        (MessageType.FORWARD, _fused(labels=torch.full((2, 8), -(2**62)))),
        (MessageType.FORWARD, _plain(next(_ids), result="loss", labels=labels + 7)),
        (MessageType.INFER, _plain(next(_ids), result="loss", labels=-labels)),
        (MessageType.FORWARD, _plain(-1)),
        (MessageType.FORWARD, _fused(kwargs={"position_ids": torch.full((1, 8), -3)})),
        (MessageType.CACHE, {"op": "reorder", "beam_idx": torch.tensor([0, 2])}),
        (MessageType.CACHE, {"op": "reorder", "beam_idx": torch.tensor([-1, 0])}),
        (MessageType.CACHE, {"op": "reorder", "beam_idx": torch.tensor([2**40, 0])}),
        (MessageType.INFER, _decode_step(tokens, reorder=torch.tensor([1, 5]))),
        (MessageType.INFER, _decode_step(-1)),
        (MessageType.INFER, _decode_step(2**40)),
        (MessageType.INFER, {**_decode_step(tokens), "cache": {"past": tokens, "new": 2**40}}),
    ]


@pytest.mark.parametrize("fast_decode", [True, False], ids=["static-cache", "dynamic-cache"])
def test_index_attacks_on_a_cuda_segment(split_server, fast_decode: bool) -> None:
    address, tls_for = split_server(GPT2, SPEC, device="cuda", fast_decode=fast_decode)
    alice = _connect(address, tls_for, "alice")
    try:
        ids = _tokens(3, length=6)
        want = alice.model.eval().generate(ids, **GREEDY)
        info = alice.client.request(MessageType.CACHE, {"op": "info"}).body
        assert info["tokens"] == ids.shape[1] + GREEDY["max_new_tokens"] - 1
        for kind, body in _hostile(info["tokens"]):
            _refused(S.INVALID_ARGUMENT, lambda kind=kind, body=body: alice.client.request(kind, body))
        assert alice.client.request(MessageType.CACHE, {"op": "info"}).body == info
        torch.cuda.synchronize()  # the process's CUDA context is intact
        assert torch.equal(alice.model.eval().generate(ids, **GREEDY), want)
        assert torch.isfinite(_train_step(alice, _tokens(5), 0))
    finally:
        alice.close()


def test_labels_out_of_range_never_reach_a_training_graph(split_server) -> None:
    """Fused training calls of one shape replay a CUDA graph from the second on: labels out of
    range for that shape are refused before they are copied into its buffers."""
    address, tls_for = split_server(GPT2, SPEC, device="cuda")
    alice = _connect(address, tls_for, "alice")
    try:
        send = alice.client.request
        for labels in (None, None, torch.full((2, 8), VOCAB), torch.full((2, 8), -7), None):
            call = next(_ids)
            body = _fused(call) if labels is None else _fused(call, labels=labels)
            if labels is None:
                assert torch.isfinite(send(MessageType.FORWARD, body).body["loss"])
                send(MessageType.BACKWARD, {"call": call, "scale": None})
            else:  # refused before the call was opened: no BACKWARD
                _refused(S.INVALID_ARGUMENT, lambda body=body: send(MessageType.FORWARD, body), "labels")
        graphs = split_server.segment(alice).train_graphs
        assert graphs.stats["captures"] == 1 and graphs.stats["graph_steps"] == 2
        torch.cuda.synchronize()
        hidden = torch.randn(2, 8, WIDTH)
        assert torch.isfinite(alice.client.request(MessageType.FORWARD, _fused(hidden=hidden)).body["loss"])
    finally:
        alice.close()
