"""The server's fast decode path (static KV cache, CUDA-graph decode steps) gives local ``generate``'s tokens.

On CPU the static cache runs eagerly, and the graph bookkeeping (static input buffers, the padded
mask, the write slot set from a device tensor, re-capture on growth) runs with the step replayed
in place of a CUDA graph (``emulate_graphs``). The CUDA tests at the end replay real graphs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lightning_split.server.fast_decode import StaticDecoder
from lightning_split.server.segment_state import SessionSegment
from lightning_split.split.build import build_model
from lightning_split.split.client_model import install_two_part_forward
from lightning_split.split.connect import open_split
from lightning_split.split.remote import RemoteSegment, wire_arguments
from lightning_split.split.spec import SplitSpec
from lightning_split.split.surgery import cut_model
from lightning_split.wire import MessageType
from tests.split_cases import GPT2, LLAMA, sample_both

SOURCES = {"gpt2": GPT2, "llama": LLAMA}
# Eager attention: the client's masks are additive float masks, never None.
EAGER = {name: dataclasses.replace(source, config={**source.config, "attn_implementation": "eager"})
         for name, source in SOURCES.items()}
# u_shape_last: the server's blocks are the model's last (a step returns the last positions only).
SHAPES = ["u_shape", "u_shape_last", "two_part"]


def _spec(shape: str) -> SplitSpec:
    return SplitSpec(cut=1, end=3 if shape == "u_shape" else None, shape=shape.removesuffix("_last"))


def _prompts(batch: int, length: int = 7, seed: int = 11, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding, as for decoder-only generation
        ids[1, :3] = 0
        mask[1, :3] = 0
    return ids.to(device), mask.to(device)


def _decoder(split_server, remote) -> StaticDecoder:  # noqa: ANN001
    """The server-side static decoder of ``remote``'s session."""
    segment: SessionSegment = split_server.segment(remote)
    assert segment.fast is not None, "the fast decode path is off for this session"
    return segment.fast


@pytest.fixture(params=SHAPES)
def pair(request, split_server):  # noqa: ANN001
    """``make(family, graphs, **service_kw) -> (local model, connected split model, server decoder)``."""
    made = []

    def _make(family: str, graphs: bool = False, device: str = "cpu", attn: str = "sdpa", **service_kw):  # noqa: ANN202
        source, spec = (SOURCES if attn == "sdpa" else EAGER)[family], _spec(request.param)
        service_kw.setdefault("fast_decode", True)  # on CPU too: by default only on a GPU
        address, tls_for = split_server(source, spec, device=device, **service_kw)
        remote = open_split(address, "alice", tls_for("alice"), source=source, spec=spec, device=device)
        made.append(remote)
        decoder = _decoder(split_server, remote)
        decoder.emulate_graphs = graphs and device == "cpu"
        return build_model(source, device=device).eval(), remote, decoder

    yield _make
    for remote in made:
        remote.close()


def _generate_both(local, remote, ids, **kw):  # noqa: ANN001, ANN202
    expected = local.generate(ids, **kw)
    got = remote.model.eval().generate(ids, **kw)
    return got, expected


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-emulated"])
@pytest.mark.parametrize("family", list(SOURCES))
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_matches_local(pair, family, batch, graphs):
    local, remote, decoder = pair(family, graphs)
    ids, mask = _prompts(batch)
    new_tokens = 10
    got, expected = _generate_both(local, remote, ids, attention_mask=mask, max_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    # Every step ran on the static cache (the test fails if the path silently falls back).
    assert decoder.stats["static_steps"] == new_tokens and decoder.stats["declined"] == 0
    assert decoder.stats["graph_steps"] == (new_tokens - 1 if graphs else 0)
    assert decoder.stats["captures"] == (1 if graphs else 0)
    info = remote.client.request(MessageType.CACHE, {"op": "info"}).body
    assert info["tokens"] == ids.shape[1] + new_tokens - 1 and info["bytes"] == decoder.nbytes() > 0


@pytest.mark.parametrize("family", list(SOURCES))
@pytest.mark.parametrize("batch", [1, 3])
def test_eager_attention_float_masks(pair, family, batch):
    local, remote, decoder = pair(family, graphs=True, attn="eager")
    assert not decoder.sdpa
    ids, mask = _prompts(batch)
    got, expected = _generate_both(local, remote, ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(got, expected)
    assert decoder.stats["static_steps"] == 6 and decoder.stats["graph_steps"] == 5


@pytest.mark.parametrize("family", list(SOURCES))
def test_one_token_prompt(pair, family):
    """A first step of one token: a decode-shaped step on a cache not allocated yet runs eagerly."""
    local, remote, decoder = pair(family, graphs=True)
    ids, mask = _prompts(1, length=1)
    got, expected = _generate_both(local, remote, ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(got, expected)
    assert decoder.stats["static_steps"] == 5 and decoder.stats["graph_steps"] == 4
    # Again: the cache is allocated now, so even the first step replays the graph.
    got, expected = _generate_both(local, remote, ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(got, expected) and decoder.stats["graph_steps"] == 9


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-emulated"])
@pytest.mark.parametrize("family", list(SOURCES))
def test_sampling_with_seed_matches_local(pair, family, graphs):
    local, remote, decoder = pair(family, graphs)
    ids, mask = _prompts(2)
    got, expected = sample_both(local, remote.model, ids, mask)
    assert torch.equal(got, expected)
    assert decoder.stats["static_steps"] == 12 and decoder.stats["declined"] == 0


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-emulated"])
@pytest.mark.parametrize("family", list(SOURCES))
def test_beam_search_reorders_the_static_cache(pair, family, graphs):
    local, remote, decoder = pair(family, graphs)
    ids, mask = _prompts(2)
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    got, expected = _generate_both(local, remote, ids, **kw)
    assert torch.equal(got, expected)
    assert decoder.stats["static_steps"] == 8 and decoder.stats["declined"] == 0


@pytest.mark.parametrize("family", list(SOURCES))
def test_growth_and_reuse_across_generations(pair, family):
    """A cache that grows mid-sequence (graphs re-captured), then serves shorter sequences again."""
    local, remote, decoder = pair(family, graphs=True)
    decoder.min_tokens = 8  # a 7-token prompt starts in 8 slots: growth after the first token
    ids, mask = _prompts(3, length=7)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got, expected = _generate_both(local, remote, ids, **kw)
    assert torch.equal(got, expected)
    assert decoder.capacity == 32 and decoder.stats["captures"] == 3  # in 8 slots, then 16, then 32
    captures = decoder.stats["captures"]
    # The same batch size again, shorter: the cache and the graph are reused; the mask's tail is masked.
    ids2, mask2 = _prompts(3, length=5, seed=5)
    got, expected = _generate_both(local, remote, ids2, attention_mask=mask2, max_new_tokens=4, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(got, expected)
    assert decoder.stats["captures"] == captures and decoder.capacity == 32
    # Another batch size: a new cache.
    ids3, mask3 = _prompts(1, length=6, seed=6)
    got, expected = _generate_both(local, remote, ids3, attention_mask=mask3, max_new_tokens=5, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(got, expected) and decoder.batch == 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(SOURCES))
def test_a_recurring_prompt_shape_replays_a_graph(pair, family, attn):
    """The second prompt of a shape runs as a graph on the static cache; a long one stays eager."""
    local, remote, decoder = pair(family, graphs=True, attn=attn)
    ids, mask = _prompts(3)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for run in range(3):
        ids = ids.roll(run, dims=1) if run else ids  # other tokens, the same shape
        got, expected = _generate_both(local, remote, ids, **kw)
        assert torch.equal(got, expected)
        assert decoder.stats["graph_prompts"] == run and decoder.stats["declined"] == 0
    assert decoder.stats["captures"] == 2  # one for the decode steps, one for the prompt shape
    # Another batch size reallocates the cache: the shape's next prompt fills it on the eager path,
    # the one after replays the graph again.
    _generate_both(local, remote, ids[:1], **{**kw, "attention_mask": mask[:1]})
    for run in range(2):
        got, expected = _generate_both(local, remote, ids, **kw)
        assert torch.equal(got, expected) and decoder.stats["graph_prompts"] == 2 + run
    decoder.prompt_graph_tokens = 3 * 7 - 1  # this prompt is now "long": it stays eager
    for _ in range(2):
        got, expected = _generate_both(local, remote, ids, **kw)
        assert torch.equal(got, expected) and decoder.stats["graph_prompts"] == 3


def test_prompt_graphs_can_be_turned_off(pair):
    """SplitService(prompt_graph_tokens=0) (serve.yaml: server.prompt_graph_tokens): prompts always
    run on the eager path; decode steps still replay their graph."""
    local, remote, decoder = pair("gpt2", graphs=True, prompt_graph_tokens=0)
    ids, mask = _prompts(2)
    for _ in range(3):
        got, expected = _generate_both(local, remote, ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                       pad_token_id=0)
        assert torch.equal(got, expected)
    assert decoder.stats["graph_prompts"] == 0 and decoder.stats["graph_steps"] == 6


def test_cache_control_with_the_static_cache(pair):
    local, remote, decoder = pair("gpt2")
    ids, _ = _prompts(2)
    remote.model.eval().generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    info = remote.client.request(MessageType.CACHE, {"op": "info"}).body
    assert info == {"tokens": ids.shape[1] + 3, "bytes": decoder.nbytes()}
    info = remote.client.request(MessageType.CACHE, {"op": "reorder", "beam_idx": torch.tensor([1, 0])}).body
    assert info["tokens"] == ids.shape[1] + 3
    assert remote.client.request(MessageType.CACHE, {"op": "reset"}).body == {"tokens": 0, "bytes": 0}
    assert decoder.cache is None and not decoder.graphs


def test_cache_limit_is_a_clear_error(split_server):
    from lightning_split.channel import RemoteError

    spec = SplitSpec(cut=1, end=3)
    address, tls_for = split_server(GPT2, spec, max_cache_tokens=12, fast_decode=True)
    remote = open_split(address, "alice", tls_for("alice"), source=GPT2, spec=spec)
    try:
        decoder = _decoder(split_server, remote)
        ids, _ = _prompts(1)
        with pytest.raises(RemoteError) as err:
            remote.model.eval().generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert "max_cache_tokens" in str(err.value)
        assert decoder.capacity == 64  # max_cache_tokens rounded up to 64: never past the limit
        out = remote.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, ids.shape[1] + 3)
        assert torch.equal(out, build_model(GPT2).eval().generate(ids, max_new_tokens=3, do_sample=False,
                                                                   pad_token_id=0))
    finally:
        remote.close()


def test_the_path_is_off_on_cpu_by_default(split_server):
    spec = _spec("u_shape")
    address, tls_for = split_server(GPT2, spec)
    remote = open_split(address, "alice", tls_for("alice"), source=GPT2, spec=spec)
    try:
        segment = split_server.segment(remote)
        assert segment.fast is None  # a static cache without CUDA graphs is no faster than HF's
    finally:
        remote.close()


def test_the_path_can_be_turned_off(split_server):
    spec = _spec("u_shape")
    address, tls_for = split_server(GPT2, spec, fast_decode=False)
    remote = open_split(address, "alice", tls_for("alice"), source=GPT2, spec=spec)
    address2, tls_for2 = split_server(GPT2, spec, fast_decode=True)
    remote2 = open_split(address2, "alice", tls_for2("alice"), source=GPT2, spec=spec,
                         tail={"mode": "frozen", "fast_decode": False})
    try:
        for server, r in zip(split_server.servers, (remote, remote2), strict=True):
            segment = split_server.segment(r, server)
            assert segment.fast is None
            ids, _ = _prompts(1)
            r.model.eval().generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
            assert type(segment.cache).__name__ == "DynamicCache"
    finally:
        remote.close()
        remote2.close()


# -- step by step: the static cache against the DynamicCache ---------------------------------------


class _TwinRunner:
    """A proxy's runner that sends every step, as the wire would carry it, to two sessions (fast
    decode on and off), checks their outputs agree and continues with the DynamicCache's."""

    def __init__(self, proxy, fast: SessionSegment, slow: SessionSegment, atol: float, tamper=None) -> None:  # noqa: ANN001
        self.proxy, self.fast, self.slow, self.atol, self.tamper = proxy, fast, slow, atol, tamper
        self.steps = 0

    def __call__(self, hidden, args, kwargs):  # noqa: ANN001, ANN204
        args, kwargs, cache, _ = wire_arguments(args, kwargs)
        RemoteSegment._follow_reorders(cache)  # beam search: the reorders ride on the next step, as on the wire
        new = hidden.shape[1]
        body = {"hidden": hidden, "args": args, "kwargs": kwargs,
                "cache": {"past": cache.get_seq_length() - new, "new": new,
                          "reorder": getattr(cache, "_split_pending_reorder", None)}}
        cache._split_pending_reorder = None
        if self.proxy.hand_off:
            extra = self.proxy.extra
            body.update(result=extra.get("result"), top_k=0, logits_to_keep=int(extra.get("logits_to_keep", 0)))
        if self.tamper is not None:
            self.tamper(self.steps, body)
        got, want = self.fast.forward(dict(body), train=False), self.slow.forward(dict(body), train=False)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=self.atol, msg=f"step {self.steps}: {key}")
        self.steps += 1
        return want if self.proxy.hand_off else want["output"]


def _twin_generate(family: str, shape: str, device: str = "cpu", atol: float = 1e-5, tamper=None, batch: int = 3,  # noqa: ANN001, ANN202
                   graphs: bool = False, sources: dict = SOURCES, min_tokens: int = 256, **kw):  # noqa: ANN001
    source = sources[family]
    model = build_model(source, device=device).eval()
    local = build_model(source, device=device).eval()
    split = _spec(shape).resolve(model)
    cut = cut_model(model, split)
    cut.segment.eval().requires_grad_(False)
    fast = SessionSegment(cut.segment, {"mode": "frozen"}, model.config, fast_decode=True)
    slow = SessionSegment(cut.segment, {"mode": "frozen"}, model.config, fast_decode=False)
    assert fast.fast is not None and slow.fast is None
    fast.fast.emulate_graphs = graphs and device == "cpu"
    fast.fast.min_tokens = min_tokens
    if shape == "two_part":
        install_two_part_forward(model, cut.proxy)
    cut.proxy.runner = _TwinRunner(cut.proxy, fast, slow, atol, tamper)
    ids, mask = _prompts(batch, device=device)
    kw = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **kw}
    got = model.generate(ids, **kw)
    assert torch.equal(got, local.generate(ids, **kw))
    return fast.fast, cut.proxy.runner


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-emulated"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", list(SOURCES))
def test_static_step_equals_dynamic_step(family, shape, graphs):
    decoder, runner = _twin_generate(family, shape, graphs=graphs)
    assert runner.steps == 6 and decoder.stats["static_steps"] == 6
    assert decoder.stats["graph_steps"] == (5 if graphs else 0)


@pytest.mark.parametrize("family", list(SOURCES))
def test_beam_reorders_step_by_step(family):
    decoder, runner = _twin_generate(family, "two_part", graphs=True, num_beams=3, max_new_tokens=8)
    assert decoder.stats["graph_steps"] == 7 and decoder.batch == 9


@pytest.mark.parametrize("family", list(SOURCES))
def test_growing_cache_keeps_its_tokens(family):
    decoder, runner = _twin_generate(family, "u_shape", graphs=True, min_tokens=8, max_new_tokens=12)
    assert decoder.capacity == 32 and decoder.stats["captures"] == 3 and runner.steps == 12


@pytest.mark.parametrize("family", list(SOURCES))
def test_no_mask_with_eager_attention_is_causal(family):
    """Without a mask, eager attention gets an additive causal mask of the cache's width."""

    def drop_decode_masks(step: int, body: dict) -> None:
        if step > 0:  # without a mask a decode step attends to every token held: the same attention
            args, kwargs = body["args"], body["kwargs"]
            if "attention_mask" in kwargs:
                body["kwargs"] = {**kwargs, "attention_mask": None}
            else:
                body["args"] = (args[0], None, *args[2:])

    decoder, runner = _twin_generate(family, "two_part", batch=1, graphs=True, sources=EAGER, tamper=drop_decode_masks)
    assert decoder.stats["graph_steps"] == 5 and not decoder.sdpa


def test_a_declined_step_moves_the_tokens_to_a_dynamic_cache():
    """A mask the static path does not know (one per head: the same attention) is declined: that
    step and the rest run on a DynamicCache holding the static cache's tokens, with the same outputs."""

    def per_head_mask_from_step_3(step: int, body: dict) -> None:
        if step >= 3:
            mask = body["kwargs"]["attention_mask"]
            body["kwargs"] = {**body["kwargs"], "attention_mask": mask.expand(-1, LLAMA.config["num_attention_heads"],
                                                                              -1, -1)}

    decoder, runner = _twin_generate("llama", "u_shape", tamper=per_head_mask_from_step_3)
    assert decoder.stats["static_steps"] == 3 and decoder.stats["declined"] == 1 and not decoder.active
    assert decoder.cache is None  # let go of its memory


# -- CUDA: real graphs -----------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("family", list(SOURCES))
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_generation_matches_local(pair, family, batch, exact_matmuls):
    local, remote, decoder = pair(family, device="cuda")
    ids, mask = _prompts(batch, device="cuda")
    got, expected = _generate_both(local, remote, ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(got, expected)
    assert decoder.stats["graph_steps"] == 9 and decoder.stats["captures"] == 1
    # Beam search: in-place reorders under the same graph's feet.
    got, expected = _generate_both(local, remote, ids, attention_mask=mask, max_new_tokens=8, num_beams=3,
                                   do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)
    assert decoder.stats["declined"] == 0
    # The first prompt's shape again: it refills the cache the beams reallocated, then replays a graph.
    for graph_prompts in (0, 1):
        got, expected = _generate_both(local, remote, ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                       pad_token_id=0)
        assert torch.equal(got, expected) and decoder.stats["graph_prompts"] == graph_prompts


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", list(SOURCES))
def test_cuda_graph_step_equals_eager_step(family, shape, exact_matmuls):
    decoder, runner = _twin_generate(family, shape, device="cuda", atol=1e-4)
    assert decoder.stats["graph_steps"] == 5 and decoder.stats["captures"] == 1
