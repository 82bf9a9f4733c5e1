"""Speculative decoding through the split: Hugging Face's assisted generation (a draft model the
user passes as ``assistant_model``, or prompt lookup) on the client's split model. The server's
segment verifies each round's drafts in one round trip and cuts its KV cache back to what the
client kept (``cache.crop``). Greedy tokens equal local ``generate`` without drafting, seeded
sampling equals local assisted sampling, on the dynamic and the static (graph-emulated) cache,
and ``generation_metrics`` counts the round trips and accepted drafts."""

from __future__ import annotations

import io

import pytest
import torch

from lightning_split.split.build import ModelSource, build_model
from lightning_split.split.connect import open_split
from lightning_split.split.decode_stats import SplitProgress
from lightning_split.wire import MessageType
from tests.split_cases import GPT2, LLAMA, SAMPLING
from tests.test_generation import SPECS

SOURCES = {"gpt2": GPT2, "llama": LLAMA}
GREEDY = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)


def _draft(family: str) -> torch.nn.Module:
    """A smaller model of the same vocabulary (one block), as a user would pass as ``assistant_model``."""
    src = SOURCES[family]
    layers = "n_layer" if family == "gpt2" else "num_hidden_layers"
    return build_model(ModelSource(src.target, {**src.config, layers: 1}, seed=99)).eval()


def _repeating_prompt() -> torch.Tensor:
    """A phrase said three times: what prompt lookup finds its drafts in (an edit of a given text)."""
    phrase = torch.randint(3, 128, (6,), generator=torch.Generator().manual_seed(5))
    return torch.cat([phrase, phrase, phrase[:3]]).unsqueeze(0)


def _drafting(kind: str, family: str) -> dict:
    return {"prompt_lookup_num_tokens": 3} if kind == "prompt_lookup" else {"assistant_model": _draft(family)}


@pytest.fixture
def connect(split_server):  # noqa: ANN001
    """``connect(family, spec, fast_decode) -> (local model, split model)``; the static cache's
    graphs are emulated on CPU (test_fast_decode.py), so its capture and replay paths run too."""
    made = []

    def _make(family: str, spec: str, fast_decode: bool = False, device: str = "cpu"):  # noqa: ANN202
        source = SOURCES[family]
        address, tls_for = split_server(source, SPECS[spec], fast_decode=fast_decode, device=device)
        remote = open_split(address, "alice", tls_for("alice"), source=source, spec=SPECS[spec], device=device)
        made.append(remote)
        if fast_decode:
            remote.decoder = split_server.segment(remote).fast  # the server's static decoder
            remote.decoder.emulate_graphs = device == "cpu"
        return build_model(source, device=device).eval(), remote

    yield _make
    for remote in made:
        remote.close()


@pytest.mark.parametrize("fast_decode", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("family", list(SOURCES))
@pytest.mark.parametrize("drafting", ["prompt_lookup", "assistant"])
def test_greedy_assisted_equals_local_plain(connect, drafting, family, spec, fast_decode) -> None:
    local, remote = connect(family, spec, fast_decode)
    ids = _repeating_prompt()
    expected = local.generate(ids, **GREEDY)  # no drafting: what greedy decoding must give
    model, before = remote.model.eval(), remote.client.stats.snapshot()
    got = model.generate(ids, **GREEDY, **_drafting(drafting, family))
    assert torch.equal(got, expected)
    m = model.generation_metrics
    # Each round trip yields one token of the server's own plus the drafts it confirmed.
    assert m.new_tokens == GREEDY["max_new_tokens"] and m.accepted == m.new_tokens - m.round_trips
    assert 0 < m.drafted and 0 <= m.accepted <= m.drafted and m.round_trips <= m.new_tokens
    assert m.round_trips == (remote.client.stats - before).messages  # counted by the channel, reply by reply
    # The server held every verified token; the rejected drafts of the last round are all it holds more.
    held = remote.client.request(MessageType.CACHE, {"op": "info"}).body["tokens"]
    assert got.shape[1] - 1 <= held <= got.shape[1] - 1 + 3


def test_prompt_lookup_on_a_repeating_prompt_saves_round_trips(connect) -> None:
    """A phrase repeated, and a model that continues it (a prompt of its own greedy output): the
    lookup's drafts are right, and each round trip brings several tokens."""
    local, remote = connect("gpt2", "u_shape")
    start = _repeating_prompt()
    said = local.generate(start, **{**GREEDY, "max_new_tokens": 15})  # the start and what follows it
    ids = torch.cat([said, start], dim=1)  # then the start again: the lookup finds what followed it
    greedy = {**GREEDY, "max_new_tokens": 15}
    expected = local.generate(ids, **greedy)
    model = remote.model.eval()
    assert torch.equal(model.generate(ids, **greedy, prompt_lookup_num_tokens=5), expected)
    m = model.generation_metrics
    assert m.tokens_per_round_trip > 2 and m.acceptance_rate > 0.5, m
    result = model.generate(ids, **greedy, prompt_lookup_num_tokens=5, return_dict_in_generate=True)
    assert torch.equal(result.sequences, expected) and result.split_metrics.accepted == m.accepted


def test_verify_steps_replay_graphs_only_for_shapes_that_recur(connect) -> None:
    """Prompt lookup sends 1 + k tokens per round, k changing with what the prompt offers: a graph
    per new length would cost a capture a round. Shapes seen before replay one; the others run
    eagerly on the static cache, and the tokens stay local's."""
    local, remote = connect("gpt2", "u_shape", fast_decode=True)
    start = _repeating_prompt()
    said = local.generate(start, **{**GREEDY, "max_new_tokens": 15})
    ids = torch.cat([said, start], dim=1)
    greedy = {**GREEDY, "max_new_tokens": 15}
    model = remote.model.eval()
    assert torch.equal(model.generate(ids, **greedy, prompt_lookup_num_tokens=5), local.generate(ids, **greedy))
    stats, rounds = remote.decoder.stats, model.generation_metrics.round_trips
    assert stats["declined"] == 0 and stats["static_steps"] == rounds
    assert stats["captures"] < rounds - 1  # not one per verify step
    assert stats["graph_steps"] > 0  # the recurring shapes replayed


@pytest.mark.parametrize("spec", list(SPECS))
def test_seeded_assisted_sampling_equals_local_assisted_sampling(connect, spec) -> None:
    """Hugging Face's assisted-sampling rule runs on the client; the split's logits are the local
    ones, so the same seed draws the same tokens."""
    local, remote = connect("gpt2", spec)
    draft, ids = _draft("gpt2"), _repeating_prompt()
    torch.manual_seed(7)
    expected = local.generate(ids, assistant_model=draft, **SAMPLING)
    torch.manual_seed(7)
    got = remote.model.eval().generate(ids, assistant_model=draft, **SAMPLING)
    assert torch.equal(got, expected)


def test_batched_drafting_fails_as_it_does_locally(connect) -> None:
    """Assisted generation of more than one sequence: Hugging Face's own error, as without the split."""
    local, remote = connect("gpt2", "two_part")
    ids = _repeating_prompt().repeat(2, 1)
    with pytest.raises(ValueError) as local_error:
        local.generate(ids, **GREEDY, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError) as split_error:
        remote.model.eval().generate(ids, **GREEDY, prompt_lookup_num_tokens=3)
    assert str(split_error.value) == str(local_error.value)


def test_progress_line_streams_the_figures(connect) -> None:
    _, remote = connect("gpt2", "u_shape")
    out = io.StringIO()
    model = remote.model.eval()
    model.generate(_repeating_prompt(), **GREEDY, prompt_lookup_num_tokens=3,
                   streamer=SplitProgress(remote.runner.decode_log, out, every_s=0))
    lines = out.getvalue().rstrip("\n").split("\r")[1:]
    assert len(lines) > 2  # one per streamed round, and the last
    last, done = lines[-1], model.generation_metrics.line()
    assert last.startswith(f"{GREEDY['max_new_tokens']} tokens in") and "drafts accepted" in last
    assert last.split("tokens/s), ")[1] == done.split("tokens/s), ")[1]  # the same figures but the time


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("family", list(SOURCES))
def test_cuda_graphs_verify_drafts_exactly(connect, family, spec) -> None:
    """On a GPU the server replays a CUDA graph per verify length on its static cache, cropped
    between rounds: greedy tokens still equal local plain decoding (fp32, no TF32)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        local, remote = connect(family, spec, fast_decode=True, device="cuda")
        ids = _repeating_prompt().cuda()
        expected = local.generate(ids, **GREEDY)
        model = remote.model.eval()
        for drafting in ("prompt_lookup", "assistant"):
            kw = _drafting(drafting, family)
            if "assistant_model" in kw:
                kw["assistant_model"] = kw["assistant_model"].cuda()
            assert torch.equal(model.generate(ids, **GREEDY, **kw), expected), drafting
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("fast_decode", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("spec", ["u_shape", "u_shape_last"])
@pytest.mark.parametrize("family", list(SOURCES))
def test_early_exit_draft_of_the_clients_own_blocks(connect, family, spec, fast_decode) -> None:
    """``early_exit_draft``: the client's first block, final norm and output layer draft (weights
    shared, nothing copied); greedy tokens equal local plain decoding, the drafts are verified by
    the server, and the client's split model is untouched (it still generates through the server)."""
    local, remote = connect(family, spec, fast_decode)
    ids = _repeating_prompt()
    expected = local.generate(ids, **GREEDY)
    model = remote.model.eval()
    draft = remote.early_exit_draft(1)
    draft.generation_config.assistant_confidence_threshold = 0.0  # a random model's drafts: all kept
    # The draft is the local model's first block and head: its logits are exactly theirs.
    source = SOURCES[family]
    layers = "n_layer" if family == "gpt2" else "num_hidden_layers"
    one = build_model(ModelSource(source.target, {**source.config, layers: 1}, seed=source.seed)).eval()
    one.load_state_dict({k: v for k, v in local.state_dict().items() if k in one.state_dict()})
    with torch.no_grad():
        torch.testing.assert_close(draft(ids).logits, one(ids).logits, rtol=1e-5, atol=1e-5)
    assert {id(p) for p in draft.parameters()} <= {id(p) for p in model.parameters()}  # shared, not copied
    before = remote.client.stats.snapshot()
    got = model.generate(ids, **GREEDY, assistant_model=draft)
    assert torch.equal(got, expected)
    m = model.generation_metrics
    assert m.drafted > 0 and m.round_trips == (remote.client.stats - before).messages
    assert m.accepted == m.new_tokens - m.round_trips
    if family == "gpt2":  # this random GPT-2's first block agrees with the whole (this Llama's does not)
        assert m.round_trips < GREEDY["max_new_tokens"]
    assert torch.equal(model.generate(ids, **GREEDY), expected)  # the split model itself is as it was


def test_early_exit_draft_needs_the_output_layer_and_the_clients_blocks(connect) -> None:
    _, two_part = connect("gpt2", "two_part")
    with pytest.raises(ValueError, match="U-shaped"):
        two_part.early_exit_draft(1)
    _, u_shape = connect("gpt2", "u_shape")
    with pytest.raises(ValueError, match="1 to 1"):
        u_shape.early_exit_draft(2)


@pytest.mark.parametrize("spec", ["u_shape", "two_part"])
@pytest.mark.parametrize("family", list(SOURCES))
def test_client_static_cache_on_the_servers_static_decoder(connect, family, spec) -> None:
    """The client's blocks on Hugging Face's static cache, the server's on its own (graph-emulated)
    static decoder: the client's capacity-wide mask is cut to the tokens the server holds; tokens
    equal local plain decoding, and every step after the prompt ran on the server's fast path."""
    local, remote = connect(family, spec, True)
    ids = _repeating_prompt()
    expected = local.generate(ids, **GREEDY)
    got = remote.model.eval().generate(ids, **GREEDY, cache_implementation="static")
    assert torch.equal(got, expected)
    assert remote.decoder.stats["static_steps"] == GREEDY["max_new_tokens"]
