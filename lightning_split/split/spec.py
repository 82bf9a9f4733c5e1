"""Where a model is cut, and which side holds what.

A split is declared by module paths, never by code: the block list (``transformer.h`` for GPT-2,
``model.layers`` for Llama, ``encoder.layer`` for BERT, ``""`` for an ``nn.Sequential``) and the
index of the first block that runs on the server.

* ``two_part`` (the patent's shape): the server holds blocks ``[cut:]`` and the ``tail`` modules
  after them (final norm, output layer), and returns the result type the instruction asks for.
* ``u_shape``: the server holds blocks ``[cut:end)`` only; the client keeps the embeddings, the
  first blocks, any blocks after ``end``, the final norm, the output layer and the loss, so
  inputs, labels and logits never leave the client.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch.nn as nn

SplitShape = Literal["two_part", "u_shape"]


@dataclass(frozen=True)
class Family:
    """Module paths of one model family: its block list and what follows the blocks."""

    blocks: str
    tail: tuple[str, ...] = ()
    causal_lm: bool = False  # the loss shifts labels by one (next-token prediction)


# Families are recognised by class name, so the split layer needs no import of transformers.
KNOWN_FAMILIES: dict[str, Family] = {
    "GPT2LMHeadModel": Family("transformer.h", ("transformer.ln_f", "lm_head"), causal_lm=True),
    "GPT2Model": Family("h", ("ln_f",)),
    "LlamaForCausalLM": Family("model.layers", ("model.norm", "lm_head"), causal_lm=True),
    "LlamaModel": Family("layers", ("norm",)),
    "BertModel": Family("encoder.layer"),
    "BertForMaskedLM": Family("bert.encoder.layer", ("cls",)),
    "Sequential": Family(""),
}


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM by its class's name (``...ForCausalLM``, ``...LMHeadModel``): its
    loss shifts the labels by one. Other models leave it to ``SplitSpec(causal_lm=...)``."""
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


@dataclass(frozen=True)
class SplitSpec:
    """A cut through a model's block list.

    ``blocks`` and ``tail`` default to the model family's (see ``KNOWN_FAMILIES``) when left empty;
    ``end=None`` means "to the last block".
    """

    cut: int
    shape: SplitShape = "u_shape"
    end: int | None = None
    blocks: str | None = None
    tail: tuple[str, ...] | None = None
    causal_lm: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve(self, model: nn.Module) -> ResolvedSplit:
        """Fill the family defaults in and check the indices against ``model``."""
        family = KNOWN_FAMILIES.get(type(model).__name__)
        if family is None and (self.blocks is None):
            raise ValueError(
                f"no split defaults for {type(model).__name__}: give SplitSpec(blocks=...) "
                "(the module path of the block list)"
            )
        blocks_path = self.blocks if self.blocks is not None else family.blocks
        tail = tuple(self.tail) if self.tail is not None else (family.tail if family else ())
        causal = self.causal_lm if self.causal_lm is not None else (
            family.causal_lm if family is not None else is_causal_lm(model))
        blocks = model.get_submodule(blocks_path) if blocks_path else model
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"{blocks_path!r} is a {type(blocks).__name__}, not a block list")
        n = len(blocks)
        end = n if self.end is None else self.end
        if not 0 <= self.cut < end <= n:
            raise ValueError(f"need 0 <= cut < end <= {n} blocks; got cut={self.cut}, end={end}")
        if self.shape == "two_part" and end != n:
            raise ValueError("a two_part split gives the server every block after the cut (end must be None)")
        if self.shape not in ("two_part", "u_shape"):
            raise ValueError(f"unknown split shape {self.shape!r}")
        return ResolvedSplit(
            shape=self.shape,
            blocks=blocks_path,
            cut=self.cut,
            end=end,
            num_blocks=n,
            tail=tail if self.shape == "two_part" else (),
            causal_lm=causal,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tail"] = list(self.tail) if self.tail is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitSpec:
        d = dict(d)
        if d.get("tail") is not None:
            d["tail"] = tuple(d["tail"])
        return cls(**d)


@dataclass(frozen=True)
class ResolvedSplit:
    """A SplitSpec checked against a concrete model: every default filled in."""

    shape: SplitShape
    blocks: str
    cut: int
    end: int
    num_blocks: int
    tail: tuple[str, ...]
    causal_lm: bool

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tail"] = list(self.tail)
        return d
