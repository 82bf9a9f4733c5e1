"""One session's KV cache for the server's layers: the static decoder's, or a DynamicCache.

For GPT-2 and Llama the cache is a static one with CUDA-graph decode steps
(``fast_decode.StaticDecoder``); otherwise, or when that path declines a step, Hugging Face's
``DynamicCache``. The client says how many tokens it expects the server to hold (``past``); the
server counts the step's new tokens itself (the hidden state's length). A client decoding
speculatively sends ``crop`` when it kept fewer tokens than it verified: the server then cuts its
cache back to ``past``, which must be fewer than it holds (a cache never grows on the client's
word). Before the step runs, it checks both limits (``max_cache_tokens`` per sequence,
``max_cache_bytes`` for the whole batch) and charges the node's budget with what the cache will
hold after the step (a static cache's whole capacity), so that a refused step allocates nothing
and crops nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_split.server.checks import CacheError, SegmentError, check_beam_idx
from lightning_split.server.fast_decode import StaticDecoder, causal_allowed, layer_index, mask_arg
from lightning_split.server.session_memory import SessionMemory, kv_bytes_per_token
from lightning_split.split.surgery import ServerSegment

MAX_CACHE_BYTES = 4 << 30  # per session, by default: keys and values of every sequence of its batch


class SessionCache:
    """The KV cache of one session: which kind holds the sequence, its limits and its charge."""

    def __init__(self, module: ServerSegment, hf_config: Any, device: torch.device, memory: SessionMemory,
                 max_tokens: int, max_bytes: int, fast: StaticDecoder | None) -> None:
        self.module, self.hf_config, self.device, self.memory = module, hf_config, device, memory
        self.max_tokens, self.max_bytes = max_tokens, max_bytes
        self.fast = fast
        self.dynamic: Any = None  # a DynamicCache, when the static decoder does not hold the sequence
        self.layer = layer_index(module.blocks[0]) or 0  # the first server layer's index in the cache
        self.per_token = 0  # bytes per token and sequence, known from the first step's hidden state

    def prepare(self, info: dict[str, Any], hidden: torch.Tensor) -> tuple[Any, int, int]:
        """(this step's cache, past, new): checked, charged, a new one started if ``past`` is 0.

        ``info`` is the client's: ``past`` (tokens it expects us to hold), an optional beam
        ``reorder``; ``new`` is the hidden state's length whatever the client says."""
        from transformers import DynamicCache

        if hidden.dim() < 3:
            raise SegmentError("a cached step needs a hidden state of (batch, tokens, features)")
        batch, new = int(hidden.shape[0]), int(hidden.shape[1])
        past = int(info["past"])
        if info.get("new") is not None and int(info["new"]) != new:
            raise SegmentError(f"cache new={info['new']}, but the hidden state brings {new} tokens")
        self.per_token = self.per_token or kv_bytes_per_token(self.hf_config, self.module, hidden.shape[-1])
        crop = False
        if past > 0:
            if info.get("reorder") is not None:
                # Beam search reordered the client's cache since the last step: follow it.
                self.reorder(info["reorder"])
            if not self.holds():
                raise CacheError(f"the client expects {past} cached tokens, the server holds none")
            held = self.tokens()
            crop = held != past and info.get("crop") is True and past < held
            if held != past and not crop:
                raise CacheError(f"KV cache out of step: the server holds {held} tokens, the client {past}")
            if batch != self.batch():
                raise CacheError(f"the step brings {batch} sequences, the KV cache holds {self.batch()}")
        if past + new > self.max_tokens:
            raise CacheError(f"KV cache limit: {past + new} tokens > max_cache_tokens={self.max_tokens}")
        self.memory.charge_cache(self._projected(batch, past + new, fresh=past == 0), self.max_bytes)
        if crop:  # speculative decoding: the client kept only the verified tokens
            self.crop(past)
        if past == 0:
            self.dynamic = None
            if self.fast is not None:
                self.fast.begin()
            else:
                self.dynamic = DynamicCache(config=self.hf_config)
        return self.static() or self.dynamic, past, new

    def _projected(self, batch: int, tokens: int, fresh: bool) -> int:
        """Bytes the cache holds after a step that leaves ``tokens`` per sequence: a static cache
        holds its capacity (which the step may double)."""
        if self.fast is not None and (fresh or self.fast.active):
            tokens = max(tokens, self.fast.capacity_for(batch, tokens))
        return batch * tokens * self.per_token

    def static(self) -> StaticDecoder | None:
        """The static decoder while it holds the session's sequence (it makes its cache lazily)."""
        return self.fast if self.fast is not None and self.fast.active else None

    def to_dynamic(self) -> Any:
        """The static path declined a step: its tokens move to a DynamicCache (charged already)."""
        self.dynamic = self.fast.to_dynamic()
        return self.dynamic

    def crop(self, tokens: int) -> None:
        """Keep the first ``tokens`` (0 < tokens < held) of every sequence: the rejected drafts go."""
        if self.static() is not None:
            self.fast.tokens = tokens  # the slots after are masked, and overwritten by the next step
        else:  # per layer, by a negative count: what every transformers 5 release takes
            for layer in self.dynamic.layers:
                held = int(layer.get_seq_length()) if layer.is_initialized else 0
                if held > tokens:
                    layer.crop(tokens - held)

    def holds(self) -> bool:
        return self.dynamic is not None or self.static() is not None

    def reorder(self, beam_idx: Any) -> None:
        """Beam search: row i of the cache becomes row ``beam_idx[i]``; a new batch size is charged first."""
        if not self.holds():
            raise CacheError("no KV cache to reorder")
        tokens = self.tokens()
        batch = self.batch() if tokens else 0
        beam_idx = check_beam_idx(beam_idx, batch)
        if not tokens:
            return  # nothing held yet: nothing to move
        if beam_idx.shape[0] != batch:  # only a DynamicCache can follow a new batch size
            self.memory.charge_cache(beam_idx.shape[0] * tokens * self.per_token, self.max_bytes)
        if self.static() is not None and not self.fast.reorder(beam_idx):
            self.dynamic = self.fast.to_dynamic()
        if self.dynamic is not None:
            self.dynamic.reorder_cache(beam_idx.to(self.device))

    def tokens(self) -> int:
        if self.static() is not None:
            return self.fast.tokens
        if self.dynamic is None:
            return 0
        return int(self.dynamic.get_seq_length(self.layer))

    def batch(self) -> int:
        """Sequences the cache holds (0 if it holds no tokens)."""
        if self.static() is not None:
            return self.fast.batch if self.fast.tokens else 0
        if self.dynamic is None or self.layer >= len(self.dynamic.layers) or not self.tokens():
            return 0
        return int(self.dynamic.layers[self.layer].keys.shape[0])

    def nbytes(self) -> int:
        if self.static() is not None:
            return self.fast.nbytes()
        if self.dynamic is None:
            return 0
        total = 0
        for layer in getattr(self.dynamic, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    def control(self, body: dict[str, Any]) -> dict[str, Any]:
        """The CACHE instruction: ``reset``, ``reorder`` (beam search) or ``info``."""
        op = body.get("op")
        if op == "reset":
            self.release()
        elif op == "reorder":
            self.reorder(body.get("beam_idx"))
        elif op != "info":
            raise SegmentError(f"unknown cache op {op!r}")
        return {"tokens": self.tokens(), "bytes": self.nbytes()}

    def release(self) -> None:
        """Free the cache (and the static decoder's graphs); its charge goes back."""
        self.dynamic = None
        if self.fast is not None:
            self.fast.release()
        self.memory.release_cache()


def causal_mask_if_none(block: torch.nn.Module, hf_config: Any, args: tuple, kwargs: dict[str, Any], past: int,
                        new: int, device: torch.device) -> tuple[tuple, dict[str, Any]]:
    """The block arguments of a cached step of several tokens after held ones, with the causal
    mask made explicit where none came (a long prompt's later chunk, split/prefill.py: no padding).

    Without one, SDPA's ``is_causal`` would align the mask at the top left, hiding from the step's
    queries most of the tokens held before them; query i (position past + i) must see keys 0 ..
    past + i. Eager attention always gets a mask from Hugging Face, flash attention aligns right."""
    if past == 0 or new < 2 or getattr(hf_config, "_attn_implementation", None) != "sdpa":
        return args, kwargs
    mask = causal_allowed(torch.arange(past + new, device=device), past, new)
    if kwargs.get("attention_mask") is not None:
        return args, kwargs
    i = mask_arg(block)
    if i is not None and i < len(args):  # passed by position
        return ((*args[:i], mask, *args[i + 1:]), kwargs) if args[i] is None else (args, kwargs)
    return args, {**kwargs, "attention_mask": mask}  # by keyword (block_args.py: absent is None)

