"""A long prompt's prefill in chunks of the sequence, in flight together (split/prefill.py): the
server fills its cache chunk by chunk, and generation and the prompt's logits equal local ones."""

from __future__ import annotations

import pytest
import torch

from lightning_split.split import prefill
from lightning_split.split.build import build_model
from lightning_split.split.connect import open_split
from tests.split_cases import GPT2, LLAMA
from tests.test_generation import SPECS

SOURCES = {"gpt2": GPT2, "llama": LLAMA}
PROMPT = 50  # three chunks of at least prefill.MIN_CHUNK_TOKENS


def _prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (batch, PROMPT), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding
        ids[1, :7], mask[1, :7] = 0, 0
    return ids, mask


@pytest.fixture
def connect(split_server):  # noqa: ANN001
    made = []

    def _make(family: str, spec: str, fast_decode: bool = False):  # noqa: ANN202
        source = SOURCES[family]
        address, tls_for = split_server(source, SPECS[spec], fast_decode=fast_decode)
        remote = open_split(address, "alice", tls_for("alice"), source=source, spec=SPECS[spec],
                            prefill_chunk_bytes=1)  # every prompt of 32+ tokens in chunks
        made.append(remote)
        if fast_decode:
            split_server.segment(remote).fast.emulate_graphs = True
        return build_model(source).eval(), remote

    yield _make
    for remote in made:
        remote.close()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("fast_decode", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("family", list(SOURCES))
def test_chunked_prefill_generates_as_local(connect, family, spec, fast_decode, batch) -> None:
    local, remote = connect(family, spec, fast_decode)
    ids, mask = _prompts(batch)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = local.generate(ids, **kw)
    before = remote.client.stats.snapshot()
    assert torch.equal(remote.model.eval().generate(ids, **kw), expected)
    # The prompt went as 3 INFERs, then one per new token after the first.
    assert (remote.client.stats - before).messages == 3 + kw["max_new_tokens"] - 1


@pytest.mark.parametrize("spec", ["u_shape", "two_part"])
@pytest.mark.parametrize("family", list(SOURCES))
def test_chunked_prompt_returns_every_position(connect, family, spec) -> None:
    """A cached forward whose every position is read (no logits_to_keep): the chunks' outputs
    joined along the sequence are the whole prompt's."""
    local, remote = connect(family, spec)
    ids, mask = _prompts(2)
    with torch.no_grad():
        want = local(input_ids=ids, attention_mask=mask, use_cache=True).logits
        got = remote.model.eval()(input_ids=ids, attention_mask=mask, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_argument_of_unknown_layout_sends_the_prompt_whole() -> None:
    hidden = torch.randn(1, 64, 8)
    body = {"hidden": hidden, "block": {"extra": {"odd": torch.zeros(2, 64, 3, 5)}}, "cache": {"past": 0, "new": 64}}
    assert prefill.plan(body, 1) is None
    body["block"] = {"position_ids": torch.arange(64)[None],
                     "attention_mask": torch.ones(1, 1, 64, 64, dtype=torch.bool)}
    chunks = prefill.plan(body, 1)
    assert [c["cache"] for c in chunks] == [{"past": 0, "new": 16}, {"past": 16, "new": 16}, {"past": 32, "new": 16},
                                            {"past": 48, "new": 16}]
    assert chunks[2]["block"]["attention_mask"].shape == (1, 1, 16, 48)
    assert torch.equal(chunks[2]["block"]["position_ids"], torch.arange(32, 48)[None])
    assert prefill.plan({**body, "cache": {"past": 5, "new": 64}}, 1) is None  # not a prefill
