"""A decoder family no table names, given by its block path: GPT-NeoX (its attention module is
called ``attention``, where GPT-2 and Llama say ``attn``/``self_attn``). The loss is shifted as a
causal LM's (found from the model), and greedy generation keeps the server's cache in step."""

from __future__ import annotations

import pytest
import torch

from lightning_split.split.build import ModelSource, build_model
from lightning_split.split.connect import open_split
from lightning_split.split.spec import SplitSpec

NEOX = ModelSource("transformers:GPTNeoXForCausalLM", dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=128,
    max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0), seed=5)
SPECS = {"u_shape": SplitSpec(cut=1, end=3, blocks="gpt_neox.layers"),
         "two_part": SplitSpec(cut=1, shape="two_part", blocks="gpt_neox.layers",
                               tail=("gpt_neox.final_layer_norm", "lm_head"))}


@pytest.mark.parametrize("shape", list(SPECS))
def test_gpt_neox_by_block_path(split_server, shape) -> None:
    spec = SPECS[shape]
    assert spec.resolve(build_model(NEOX, device="meta")).causal_lm  # from the class: ...ForCausalLM
    address, tls_for = split_server(NEOX, spec)
    remote = open_split(address, "alice", tls_for("alice"), source=NEOX, spec=spec)
    local = build_model(NEOX).eval()
    try:
        model = remote.model.eval()
        ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, local(input_ids=ids, labels=ids).loss,
                                       rtol=1e-5, atol=1e-6)
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kw), local.generate(ids, **kw))
    finally:
        remote.close()
