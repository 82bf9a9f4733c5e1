"""Model families the split is tested on: small configs, no dropout, fp32 on CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_split.split.build import ModelSource
from lightning_split.split.spec import SplitSpec

NO_DROPOUT_GPT2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
GPT2 = ModelSource(
    "transformers:GPT2LMHeadModel",
    dict(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=64, **NO_DROPOUT_GPT2),
    seed=3,
)
LLAMA = ModelSource(
    "transformers:LlamaForCausalLM",
    dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
         intermediate_size=128, vocab_size=128, max_position_embeddings=64),
    seed=4,
)
BERT = ModelSource(
    "transformers:BertModel",
    dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=128,
         vocab_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
         attention_probs_dropout_prob=0.0, add_pooling_layer=False),
    seed=5,
)
MLP = ModelSource(
    "lightning_split.examples.models:mlp", dict(in_features=16, hidden=32, depth=4, out_features=5), seed=6
)
RESNET = ModelSource("lightning_split.examples.models:tiny_resnet", dict(in_features=12, width=32, depth=5), seed=7)


@dataclass
class Case:
    source: ModelSource
    kind: str  # "lm", "encoder" or "tensor"
    blocks: str | None = None
    tail: tuple[str, ...] | None = None

    def spec(self, shape: str) -> SplitSpec:
        end = None if shape == "two_part" else 3
        return SplitSpec(cut=1, end=end, shape=shape, blocks=self.blocks, tail=self.tail)

    def inputs(self, model: torch.nn.Module, seed: int = 0) -> dict[str, Any]:
        """Inputs with a differentiable input tensor (embeddings for the transformers)."""
        g = torch.Generator().manual_seed(seed)
        if self.kind == "tensor":
            n_in = self.source.config["in_features"]
            return {"x": torch.randn(3, n_in, generator=g)}
        ids = torch.randint(0, 128, (2, 9), generator=g)
        embeds = model.get_input_embeddings()(ids).detach()
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding on the second row: the mask must reach the server's blocks
        out = {"inputs_embeds": embeds, "attention_mask": mask}
        if self.kind == "lm":
            out["labels"] = ids
        return out


CASES = {
    "sequential": Case(MLP, "tensor", tail=()),
    "user_module": Case(RESNET, "tensor", blocks="blocks", tail=("norm", "head")),
    "gpt2": Case(GPT2, "lm"),
    "llama": Case(LLAMA, "lm"),
    "bert": Case(BERT, "encoder"),
}


def main_output(out: Any) -> torch.Tensor:
    """The tensor to compare: logits, last hidden state, or the output itself."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state", "hidden_states"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if value is not None:
            return value
    raise TypeError(f"no output tensor in {type(out).__name__}")


SAMPLING = dict(max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, pad_token_id=0)


def sample_both(local: Any, split_model: Any, ids: torch.Tensor, mask: torch.Tensor, seed: int = 123
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(split tokens, local tokens) of seeded sampling: the same seed must give the same tokens."""
    torch.manual_seed(seed)
    expected = local.generate(ids, attention_mask=mask, **SAMPLING)
    torch.manual_seed(seed)
    return split_model.eval().generate(ids, attention_mask=mask, **SAMPLING), expected
