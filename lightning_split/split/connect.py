"""Joining a split: handshake, SPLIT, LOAD, and a client model wired to its remote segment.

The client either brings its own model source and split (then its fingerprint is checked at the
handshake: a different architecture is refused before anything runs), or takes the server's
description, which it accepts only for Hugging Face ``transformers`` classes and this package's
examples: a server cannot make the client import arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lightning_split.channel import ChannelClient, ChannelConfig, TLSFiles
from lightning_split.split.adaptive import is_loopback
from lightning_split.split.build import ModelSource
from lightning_split.split.client_model import build_client_skeleton, materialise
from lightning_split.split.decode_stats import install_generation_metrics
from lightning_split.split.draft import early_exit_draft
from lightning_split.split.remote import RemoteSegment
from lightning_split.split.shipping import fingerprint
from lightning_split.split.spec import ResolvedSplit, SplitSpec
from lightning_split.split.surgery import SegmentProxy
from lightning_split.wire import MessageType


@dataclass
class SplitModel:
    """The client's part of a split model, connected."""

    model: nn.Module
    proxy: SegmentProxy
    runner: RemoteSegment
    client: ChannelClient
    split: ResolvedSplit
    description: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        self.client.close()

    def early_exit_draft(self, layers: int = 1) -> nn.Module:
        """A draft for ``model.generate(..., assistant_model=...)`` made of this client's own first
        ``layers`` blocks and output layer (U-shaped splits; ``draft.py``): it drafts without the
        server, which verifies the drafts."""
        return early_exit_draft(self.model, self.split, layers)


PREFILL_CHUNK_BYTES = 1 << 20  # a prompt's hidden state above this, off loopback, goes in chunks

# Code the client may import on the server's word: Hugging Face classes and our own examples.
TRUSTED_TARGETS = ("transformers:", "lightning_split.examples.")


def source_from_description(description: dict[str, Any]) -> tuple[ModelSource, SplitSpec]:
    model = description["model"]
    if not str(model["target"]).startswith(TRUSTED_TARGETS):
        raise ValueError(
            f"the server's model {model['target']!r} is not from {TRUSTED_TARGETS}: give the client "
            "the same model source (target and config) yourself"
        )
    config = json.loads(model["config_json"])
    source = ModelSource(target=model["target"], config=config, dtype=model.get("dtype", "float32"))
    return source, SplitSpec.from_dict(description["split"])


def open_split(
    address: str,
    node_id: str,
    tls: TLSFiles | None = None,
    *,
    source: ModelSource | None = None,
    spec: SplitSpec | None = None,
    tail: dict[str, Any] | str | None = None,
    config: ChannelConfig | None = None,
    insecure: bool = False,
    device: str | torch.device = "cpu",
    server_name_override: str | None = None,
    micro_batches: int | None = None,
    decode_top_k: int = 0,
    prefill_chunk_bytes: int | None = None,
    privacy: Any = None,
) -> SplitModel:
    """Connect to a server, fetch and load the client's part, and return it wired up.

    ``decode_top_k``: in a two-part split, generation steps bring back the k best logits per
    sequence instead of the whole vocabulary row (exact for greedy decoding and for sampling with
    ``top_k <= k``; ~100x fewer bytes per token for GPT-2). 0 (default): whole rows.
    ``prefill_chunk_bytes``: a prompt's hidden state larger than this crosses in chunks of the
    sequence that overlap the server's compute of the earlier ones (prefill.py); None (default):
    1 MiB for a server on another host, whole on this host's loopback; 0: always whole.
    ``privacy``: defenses on what leaves the client (``lightning_split.privacy.Defenses``: noise on
    the activations, a decorrelation penalty, label protection); anything with ``attach(split_model)``.
    """
    hello: dict[str, Any] = {"tail": {"mode": tail} if isinstance(tail, str) else (tail or {"mode": "frozen"})}
    skeleton = proxy = split = None
    if source is not None:
        if spec is None:
            raise ValueError("a client that brings its own model source must bring its split too")
        skeleton, proxy, split = build_client_skeleton(source, spec)
        hello["fingerprint"] = fingerprint(skeleton)
    client = ChannelClient(
        address, node_id, tls=tls, insecure=insecure, config=config or ChannelConfig(),
        hello_extra=hello, server_name_override=server_name_override,
    )
    try:
        client.connect()
        description = client.request(MessageType.SPLIT, {}).body
        if skeleton is None:
            skeleton, proxy, split = build_client_skeleton(*source_from_description(description))
        if fingerprint(skeleton) != description["fingerprint"]:
            raise ValueError("architecture mismatch between the client's skeleton and the server's split")
        shipped = client.request(MessageType.LOAD, {}).body
        weights = shipped["weights"].numpy().tobytes()
        materialise(skeleton, weights, shipped["sha256"], device=device)
    except BaseException:
        client.close()
        raise
    runner = RemoteSegment(client, proxy, split.cut, causal_lm=split.causal_lm, micro_batches=micro_batches)
    proxy.runner = runner
    proxy.decode_top_k = int(decode_top_k)
    if prefill_chunk_bytes is None:
        prefill_chunk_bytes = 0 if is_loopback(address) else PREFILL_CHUNK_BYTES
    runner.prefill_chunk_bytes = int(prefill_chunk_bytes) or None
    install_generation_metrics(skeleton, runner.decode_log)
    model = SplitModel(skeleton, proxy, runner, client, split, description)
    if privacy is not None:  # duck-typed: the split layer never imports privacy/, which sits above it
        privacy.attach(model)
    return model
