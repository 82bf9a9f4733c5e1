"""Block arguments by meaning (``split/block_args.py``): a client and a server whose blocks name or
place them differently agree; what a block has no place for is refused before it runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lightning_split.split.block_args import BlockArgumentError, BlockSignature, from_neutral, to_neutral
from lightning_split.split.build import build_model
from lightning_split.split.remote import wire_arguments
from lightning_split.split.spec import SplitSpec
from lightning_split.split.surgery import cut_model
from lightning_split.wire.markers import KV_CACHE
from tests.split_cases import GPT2, LLAMA


class OlderReleaseBlock(nn.Module):
    """A decoder block as an older transformers release wrote it: the cache named
    ``past_key_value``, the mask after it by position, no **kwargs."""

    def forward(self, hidden_states, past_key_value=None, attention_mask=None, position_ids=None,  # noqa: ANN001, ANN201
                use_cache=False):
        return hidden_states


def _recorded_call(source, shape: str = "two_part") -> tuple[BlockSignature, tuple, dict]:  # noqa: ANN001
    """What the model passes its first server block during a cached decode step, as the client sees it."""
    model = build_model(source).eval()
    cut = cut_model(model, SplitSpec(cut=1, shape=shape, end=None if shape == "two_part" else 3).resolve(model))
    calls = []

    def runner(hidden, args, kwargs):  # noqa: ANN001, ANN202
        calls.append(wire_arguments(args, kwargs)[:2])
        raise StopIteration  # one call is all we need

    cut.proxy.runner = runner
    with pytest.raises(StopIteration), torch.no_grad():
        from transformers import DynamicCache

        model(torch.randint(3, 100, (1, 4)), cache=DynamicCache(config=model.config), use_cache=True)
    return cut.proxy.signature, *calls[0]


@pytest.mark.parametrize("source", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_a_real_call_maps_to_fields_and_back_to_the_same_keywords(source):
    signature, args, kwargs = _recorded_call(source)
    body = to_neutral(signature, args, kwargs)
    assert body["kv_cache"] is True and body["use_cache"] is True and "position_ids" in body
    if source is LLAMA:
        assert isinstance(body["rotary"], tuple) and len(body["rotary"]) == 2  # cos, sin
    back = from_neutral(signature, body)
    # Every argument that was not None arrives by keyword, under the block's own name.
    named = dict(zip(signature.names, args, strict=False)) | kwargs
    assert back == {k: v for k, v in named.items() if v is not None}


def test_a_server_whose_block_names_the_cache_otherwise_gets_it():
    signature, args, kwargs = _recorded_call(GPT2)  # GPT-2 passes the cache by position, named `cache`
    body = to_neutral(signature, args, kwargs)
    older = BlockSignature.of(OlderReleaseBlock())
    kwargs_there = from_neutral(older, {k: v for k, v in body.items() if k != "extra"})
    assert kwargs_there["past_key_value"] is KV_CACHE and kwargs_there["use_cache"] is True
    OlderReleaseBlock()(torch.zeros(1), **kwargs_there)  # the block takes them as they are
    # and the other way round: a client block that called it past_key_value
    body_back = to_neutral(older, (KV_CACHE, None), {"use_cache": True})
    assert from_neutral(signature, body_back)["cache"] is KV_CACHE


def test_what_a_block_has_no_place_for_is_refused():
    older = BlockSignature.of(OlderReleaseBlock())
    with pytest.raises(BlockArgumentError, match="no rotary"):
        from_neutral(older, {"rotary": (torch.ones(1), torch.ones(1))})
    with pytest.raises(BlockArgumentError, match="no argument 'encoder_hidden_states'"):
        from_neutral(older, {"extra": {"encoder_hidden_states": torch.ones(1)}})
    with pytest.raises(BlockArgumentError, match="field of its own"):
        from_neutral(older, {"extra": {"cache": "grad_norm"}})
    with pytest.raises(BlockArgumentError, match="kv_cache must be a bool"):
        from_neutral(older, {"kv_cache": "yes"})
    with pytest.raises(BlockArgumentError, match="unknown block arguments"):
        from_neutral(older, {"mask": torch.ones(1)})

    class NoCacheBlock(nn.Module):
        def forward(self, hidden_states, **kwargs):  # noqa: ANN001, ANN003, ANN201
            return hidden_states

    # Positions may ride in **kwargs (as GPT-2 takes them); a cache never: it would be ignored.
    assert "position_ids" in from_neutral(BlockSignature.of(NoCacheBlock()), {"position_ids": torch.zeros(1)})
    with pytest.raises(BlockArgumentError, match="no kv cache"):
        from_neutral(BlockSignature.of(NoCacheBlock()), {"kv_cache": True})


def test_the_client_refuses_calls_it_cannot_name():
    older = BlockSignature.of(OlderReleaseBlock())
    with pytest.raises(BlockArgumentError, match="positional"):
        to_neutral(older, (None,) * 6, {})
    with pytest.raises(BlockArgumentError, match="given twice"):
        to_neutral(older, (KV_CACHE,), {"past_key_value": KV_CACHE})
    with pytest.raises(BlockArgumentError, match="not the KV cache"):
        to_neutral(older, ("a string",), {})
