"""Generation through the split equals local ``generate``: greedy, sampling, padding, beams, streaming.

The server keeps the KV cache of its layers per session; each new token moves one hidden state.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig
from transformers.generation.streamers import BaseStreamer

from lightning_split.split.build import build_model
from lightning_split.split.connect import open_split
from lightning_split.split.spec import SplitSpec
from lightning_split.wire import MessageType
from tests.split_cases import GPT2, LLAMA, sample_both

SOURCES = {"gpt2": GPT2, "llama": LLAMA}


class TokenCollector(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.clone())

    def end(self) -> None:
        self.chunks.append(torch.tensor([-1]))


# u_shape: the client also holds a block after the server's; u_shape_last: the server's blocks are
# the last (generation then gets back only the positions the output layer reads).
SPECS = {"u_shape": SplitSpec(cut=1, end=3, shape="u_shape"), "u_shape_last": SplitSpec(cut=1, shape="u_shape"),
         "two_part": SplitSpec(cut=1, shape="two_part")}


@pytest.fixture(params=list(SPECS))
def pair(request, split_server):  # noqa: ANN001
    """(local model, connected split model) for each family in turn."""
    made = []

    def _make(family: str):  # noqa: ANN202
        source = SOURCES[family]
        spec = SPECS[request.param]
        address, tls_for = split_server(source, spec)
        remote = open_split(address, "alice", tls_for("alice"), source=source, spec=spec)
        made.append(remote)
        return build_model(source).eval(), remote

    yield _make
    for remote in made:
        remote.close()


def _prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 128, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding, as for decoder-only generation
        ids[1, :3] = 0
        mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("family", list(SOURCES))
@pytest.mark.parametrize("batch", [1, 3])
def test_client_on_hugging_faces_static_cache(pair, family, batch):
    """``generate(cache_implementation="static")`` on the client's split model (its own blocks on a
    static cache, what a user who wants speed passes): the same tokens as local generation with
    and without it, padded batches too. The client's mask spans the static cache's capacity; the
    server's cache holds the tokens so far, and gets the mask's columns for those."""
    local, remote = pair(family)
    ids, mask = _prompts(batch)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = local.generate(ids, **kw)
    assert torch.equal(local.generate(ids, **kw, cache_implementation="static"), expected)
    got = remote.model.eval().generate(ids, **kw, cache_implementation="static")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", list(SOURCES))
def test_hugging_face_compiling_the_clients_step(pair, family, monkeypatch):
    """On a GPU, ``generate(cache_implementation="static")`` compiles the model's decode step
    (torch.compile). The network call is never traced (it failed in Inductor on the GPU: a pinned
    wire buffer); Dynamo runs it eagerly between the client's compiled blocks. Here on a CPU the
    same compile is asked for (``_compile_all_devices``), with the eager backend."""
    local, remote = pair(family)
    ids, mask = _prompts(2)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = local.generate(ids, **kw)
    runner = remote.proxy.runner
    traced = []

    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        traced.append(torch.compiler.is_compiling())
        return runner(*args, **kwargs)

    monkeypatch.setattr(remote.proxy, "runner", run)
    torch._dynamo.reset()
    config = CompileConfig(backend="eager", fullgraph=False)
    config._compile_all_devices = True  # Hugging Face's own flag for compiling on a CPU (tests)
    got = remote.model.eval().generate(ids, **kw, cache_implementation="static", compile_config=config)
    assert torch.equal(got, expected)
    assert traced and not any(traced)  # every call ran outside the compiled graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was compiled


@pytest.mark.parametrize("family", list(SOURCES))
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_matches_local(pair, family, batch):
    local, remote = pair(family)
    ids, mask = _prompts(batch)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    expected = local.generate(ids, **kw)
    got = remote.model.eval().generate(ids, **kw)
    assert torch.equal(got, expected)
    # The server's cache holds its layers' keys and values for every position but the last token.
    info = remote.client.request(MessageType.CACHE, {"op": "info"}).body
    assert info["tokens"] == ids.shape[1] + 10 - 1 and info["bytes"] > 0


@pytest.mark.parametrize("family", list(SOURCES))
def test_sampling_with_seed_matches_local(pair, family):
    local, remote = pair(family)
    ids, mask = _prompts(2)
    got, expected = sample_both(local, remote.model, ids, mask)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", list(SOURCES))
def test_beam_search_reorders_the_server_cache(pair, family):
    local, remote = pair(family)
    ids, mask = _prompts(2)
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(remote.model.eval().generate(ids, **kw), local.generate(ids, **kw))


def test_tokens_stream_as_they_are_made(pair):
    local, remote = pair("gpt2")
    ids, _ = _prompts(1)
    streamer = TokenCollector()
    out = remote.model.eval().generate(ids, max_new_tokens=5, do_sample=False, streamer=streamer, pad_token_id=0)
    assert len(streamer.chunks) == 1 + 5 + 1  # the prompt, one chunk per new token, the end
    assert torch.equal(torch.cat([c.view(-1) for c in streamer.chunks[1:-1]]), out[0, ids.shape[1]:])


def test_cache_limit_is_a_clear_error(split_server):
    from lightning_split.channel import RemoteError

    spec = SplitSpec(cut=1, end=3)
    address, tls_for = split_server(GPT2, spec, max_cache_tokens=12)
    remote = open_split(address, "alice", tls_for("alice"), source=GPT2, spec=spec)
    try:
        ids, _ = _prompts(1)
        with pytest.raises(RemoteError) as err:
            remote.model.eval().generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert "max_cache_tokens" in str(err.value)
        # The session survives: a shorter generation works afterwards.
        out = remote.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, ids.shape[1] + 3)
    finally:
        remote.close()


@pytest.mark.parametrize("family", list(SOURCES))
def test_two_part_decode_top_k_gives_the_same_tokens_for_fewer_bytes(split_server, family):
    """decode_top_k: each generation step brings back k logits, not the vocabulary row; greedy
    decoding and sampling with top_k <= k make exactly the local tokens."""
    source = SOURCES[family]
    spec = SplitSpec(cut=1, shape="two_part")
    address, tls_for = split_server(source, spec)
    local = build_model(source).eval()
    ids, mask = _prompts(3)
    greedy = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    sampled = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=5, pad_token_id=0)
    received = {}
    for k in (0, 5):
        remote = open_split(address, "alice", tls_for("alice"), source=source, spec=spec, decode_top_k=k)
        try:
            model = remote.model.eval()
            before = remote.client.stats.snapshot()
            assert torch.equal(model.generate(ids, **greedy), local.generate(ids, **greedy))
            received[k] = (remote.client.stats - before).bytes_received
            torch.manual_seed(3)
            expected = local.generate(ids, **sampled)
            torch.manual_seed(3)
            assert torch.equal(model.generate(ids, **sampled), expected)
        finally:
            remote.close()
    vocab = source.config["vocab_size"]
    assert received[5] < received[0] / 2, (received, vocab)


@pytest.mark.parametrize("family", list(SOURCES))
def test_u_shape_prompt_returns_only_the_last_position(family, split_server):
    """Where the server's blocks are the last, a generation step gets back the positions the client's
    output layer reads (one per sequence), not the prompt's hidden states; a plain forward gets all."""
    source, spec = SOURCES[family], SPECS["u_shape_last"]
    address, tls_for = split_server(source, spec)
    remote = open_split(address, "alice", tls_for("alice"), source=source, spec=spec)
    try:
        local, model = build_model(source).eval(), remote.model.eval()
        ids, mask = _prompts(2)
        hidden = local.config.hidden_size
        before = remote.client.stats.bytes_received
        got = model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
        received = remote.client.stats.bytes_received - before
        assert torch.equal(got, local.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                               pad_token_id=0))
        assert received < 2 * hidden * 4 + 1024 < 2 * 7 * hidden * 4  # 1 position of 7 per sequence
        with torch.no_grad():  # no logits_to_keep: every position's logits, equal to local
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, local(ids, attention_mask=mask).logits,
                                       atol=1e-5, rtol=1e-5)
    finally:
        remote.close()
