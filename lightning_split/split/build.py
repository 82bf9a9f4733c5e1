"""Building the target model from a config: for real on the server, as a skeleton on the client.

A model source names a ``target`` and its arguments, the way a Hydra config would:

* ``transformers:GPT2LMHeadModel`` with ``config`` = the Hugging Face config's keyword arguments
  (random initialisation from ``seed``), or ``weights`` = a local Hugging Face model directory or
  a ``.safetensors`` file;
* ``package.module:factory`` with ``config`` = the factory's keyword arguments, for ``nn.Sequential``
  and the user's own ``nn.Module``.

The client builds the same target on the meta device, so the server's part is never materialised.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

TRANSFORMERS_PREFIX = "transformers:"


@dataclass
class ModelSource:
    target: str
    config: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    seed: int = 0
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSource:
        return cls(**{k: v for k, v in dict(d).items() if k in cls.__dataclass_fields__})

    @property
    def is_transformers(self) -> bool:
        return self.target.startswith(TRANSFORMERS_PREFIX)


def _resolve_target(target: str) -> Any:
    if ":" not in target:
        raise ValueError(f"model target {target!r} must look like 'package.module:name'")
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def hf_config(source: ModelSource) -> Any:
    """The Hugging Face config object of a transformers source (from its directory or its kwargs)."""
    cls = _resolve_target(source.target)
    if source.weights and Path(source.weights).is_dir():
        return cls.config_class.from_pretrained(source.weights, local_files_only=True)
    return cls.config_class.from_dict(dict(source.config))


def build_model(source: ModelSource, device: str | torch.device = "cpu") -> nn.Module:
    """Build the whole target model. ``device="meta"`` gives a skeleton without storage."""
    cls_or_factory = _resolve_target(source.target)
    dtype = _torch_dtype(source.dtype)
    meta = torch.device(device).type == "meta"
    if source.is_transformers:
        config = hf_config(source)
        if meta:
            with torch.device("meta"):
                model = cls_or_factory(config)
        elif source.weights and Path(source.weights).is_dir():
            model = cls_or_factory.from_pretrained(source.weights, local_files_only=True, dtype=dtype)
        else:
            torch.manual_seed(source.seed)
            model = cls_or_factory(config)
    else:
        if meta:
            with torch.device("meta"):
                model = cls_or_factory(**source.config)
        else:
            torch.manual_seed(source.seed)
            model = cls_or_factory(**source.config)
    if not meta and source.weights and Path(source.weights).is_file():
        from safetensors.torch import load_file  # safe format: no pickle

        model.load_state_dict(load_file(source.weights), strict=True)
    model = model.to(dtype=dtype)
    return model if meta else model.to(device)


def describe_config(source: ModelSource) -> dict[str, Any]:
    """What the server tells the client about the model, enough to build the same skeleton."""
    # JSON text: Hugging Face configs have integer dict keys (id2label) that a wire dict can't carry.
    config = hf_config(source).to_dict() if source.is_transformers else dict(source.config)
    return {"target": source.target, "dtype": source.dtype, "config_json": json.dumps(config)}
