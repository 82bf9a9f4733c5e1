"""What one session holds between requests, measured by the server and charged to its node.

A session keeps three things alive after a reply has gone: its own weights (a trainable tail's copy
of the segment, or LoRA adapters, with gradients and optimizer state: ``tail_bytes``), the tensors
autograd saved in each FORWARD whose BACKWARD has not come yet, and the KV cache of a generation.
All are charged to
the node's share of the server's memory budget (``channel/budget.py``) under the session's id,
``(session_id, "tail")``, ``(session_id, "graphs")`` and ``(session_id, "kv_cache")``, before they are allocated or as
they grow, so that one tenant's forwards or cache cannot take the memory the others need. The
amounts are the server's own count (bytes of what autograd saved, ``batch x tokens x layers x 2 x
kv_heads x head_dim x bytes``), never a number the client sent.

The session's account may be None (a server without a budget, sessions made by tests): the
amounts are still counted, and the session's own limits (``max_cache_bytes``) still hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from lightning_split.server.checks import CacheError, SegmentError
from lightning_split.server.tail import lora_config, lora_targets


class SavedBytes:
    """The bytes of the tensors autograd saves during one forward, each storage counted once.

    ``check(total)`` runs as the total grows (from inside the forward), so a forward over the
    budget stops at the op that crossed it, not after it has allocated everything."""

    def __init__(self, skip: set[int], check: Callable[[int], None]) -> None:
        self.skip = skip  # storages that are held anyway (the segment's parameters and buffers)
        self.seen: set[int] = set()
        self.total = 0
        self.check = check

    def add(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # no plain storage: count the tensor itself
            ptr, nbytes = id(t), t.numel() * t.element_size()
        if not nbytes or ptr in self.skip or ptr in self.seen:
            return
        self.seen.add(ptr)
        self.total += nbytes
        self.check(self.total)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        # Detached: autograd rebuilds the saved tensor's history itself, and an op's output saved
        # as it is would hold its own graph, a reference cycle that not even the GC breaks.
        return t.detach()


class SessionMemory:
    """One session's saved activations and KV cache: counted, limited, charged and released."""

    def __init__(self, account: Any, session_id: str, module: nn.Module) -> None:
        self.account = account  # a budget.NodeAccount, or None: counted, not charged
        self.graphs_key = (session_id, "graphs")
        self.cache_key = (session_id, "kv_cache")
        self.session_id = session_id
        self.graphs: dict[int, int] = {}  # micro-batch id -> bytes its pending graph holds
        self.cache = 0
        self._held = {_storage(t) for t in (*module.parameters(), *module.buffers())}

    # -- saved activations --------------------------------------------------------------------

    @contextlib.contextmanager
    def measure(self) -> Iterator[SavedBytes]:
        """Count what autograd saves inside the block, refusing (BudgetExceeded, raised by the op
        that saves) as soon as the session's graphs and this forward's would exceed the budget."""
        pending = sum(self.graphs.values())
        saved = SavedBytes(self._held, lambda total: self._check(self.graphs_key, pending + total,
                                                                 "saved activations"))
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, _unpack):
            yield saved

    def keep_graph(self, micro_id: int, saved: SavedBytes, kept: Iterable[torch.Tensor]) -> None:
        """Charge a graph kept for its BACKWARD: what autograd saved, and the input and outputs the
        session keeps with it. BudgetExceeded: the caller drops the graph."""
        for t in kept:
            saved.add(t)
        total = sum(self.graphs.values()) + saved.total
        if self.account is not None:
            self.account.set(self.graphs_key, total, "saved activations")
        self.graphs[micro_id] = saved.total

    def drop_graph(self, micro_id: int) -> None:
        if self.graphs.pop(micro_id, None) is not None:
            self._set(self.graphs_key, sum(self.graphs.values()))

    def clear_graphs(self) -> None:
        self.graphs.clear()
        self._set(self.graphs_key, 0)

    # -- the KV cache -------------------------------------------------------------------------

    def charge_cache(self, nbytes: int, limit: int) -> None:
        """Hold ``nbytes`` for the KV cache from now on, checked against the session's ``limit``
        (0: none) and the node's budget first; refused, the old amount stays."""
        if limit and nbytes > limit:
            raise CacheError(f"KV cache limit: {nbytes} bytes > max_cache_bytes={limit}")
        if self.account is not None:
            self.account.set(self.cache_key, nbytes, "the KV cache")
        self.cache = nbytes

    def release_cache(self) -> None:
        self.cache = 0
        self._set(self.cache_key, 0)

    # -- the whole session --------------------------------------------------------------------

    def held(self) -> dict[str, int]:
        tail = self.account.held((self.session_id, "tail")) if self.account is not None else 0
        return {"graphs": sum(self.graphs.values()), "kv_cache": self.cache, "tail": tail}

    def close(self) -> None:
        """Release everything the session was charged for."""
        self.graphs.clear()
        self.cache = 0
        if self.account is not None:
            self.account.release_prefix(self.session_id)

    def _check(self, key: tuple[str, str], nbytes: int, what: str) -> None:
        if self.account is not None:
            self.account.check(key, nbytes, what)

    def _set(self, key: tuple[str, str], nbytes: int) -> None:
        if self.account is not None:
            self.account.set(key, nbytes)


# Tensors per trainable parameter an optimizer keeps (momentum buffers, moment estimates...).
_OPTIMIZER_STATES = {"SGD": lambda o: 1 if o.get("momentum") else 0,
                     "Adam": lambda o: 3 if o.get("amsgrad") else 2,
                     "AdamW": lambda o: 3 if o.get("amsgrad") else 2,
                     "RMSprop": lambda o: 1 + bool(o.get("momentum")) + bool(o.get("centered")),
                     "Adagrad": lambda o: 1}


def tail_bytes(base: nn.Module, tail: dict[str, Any]) -> int:
    """What a session's own weights will hold, known before they are made: a trainable tail's copy
    of the segment, or the LoRA adapters on their target modules, and for each trained parameter
    its gradient, the gradient of a fused call waiting for its scale, and the optimizer's state.
    (A LoRA tail shares the base weights, which are the server's own.)"""
    mode = tail.get("mode", "frozen")
    if mode == "trainable":
        params = sum(p.numel() * p.element_size() for p in base.parameters())
        buffers = sum(b.numel() * b.element_size() for b in base.buffers())
        return buffers + params * (1 + _states_per_parameter(tail))
    if mode == "lora":
        config = lora_config(base, tail.get("lora") or {})
        targets = [m.weight for m in lora_targets(base, config) if isinstance(getattr(m, "weight", None), torch.Tensor)]
        if not targets:
            raise SegmentError("lora.target_modules matches no module of the segment")
        # A (r x fan-in) and B (fan-out x r) per target; fan-in of a Conv1D or Embedding weight is its
        # first dimension and of a Linear its second, so the sum of both is what counts.
        params = sum(config.r * (w.shape[0] + w[0].numel()) * w.element_size() for w in targets)
        return params * (1 + _states_per_parameter(tail))
    return 0


def trained_bytes(trainable: list[nn.Parameter], tail: dict[str, Any]) -> int:
    """The same count for parameters that exist already (LoRA adapters once made)."""
    return sum(p.numel() * p.element_size() for p in trainable) * (1 + _states_per_parameter(tail))


def _states_per_parameter(tail: dict[str, Any]) -> int:
    """Tensors of a parameter's size kept besides it: its gradient, a fused call's gradient waiting
    for its scale, and the optimizer's state."""
    spec = dict(tail.get("optimizer") or {"name": "SGD"})
    return 2 + _OPTIMIZER_STATES.get(spec.get("name", "SGD"), lambda o: 2)(spec)


def charge_tail(account: Any, session_id: str, nbytes: int) -> None:
    """Charge the session's own weights (``tail_bytes``) to its node before they are made."""
    if account is not None:
        account.set((session_id, "tail"), nbytes, "a trainable tail (weights, gradients, optimizer state)")


def kv_bytes_per_token(hf_config: Any, module: nn.Module, width: int) -> int:
    """Bytes one token of one sequence takes in the KV cache of the segment's layers: keys and
    values of ``kv_heads x head_dim`` each, per block, in the parameters' dtype (an autocast step
    stores fewer). ``width``: the hidden state's, for models without a Hugging Face config."""
    heads = _config_int(hf_config, "num_attention_heads")
    kv_heads = _config_int(hf_config, "num_key_value_heads") or heads
    head_dim = _config_int(hf_config, "head_dim") or (_config_int(hf_config, "hidden_size") // heads if heads else 0)
    per_layer = kv_heads * head_dim or width
    itemsize = max((p.element_size() for p in module.parameters()), default=4)
    return len(getattr(module, "blocks", [module])) * 2 * per_layer * itemsize


def _config_int(config: Any, name: str) -> int:
    value = getattr(config, name, None) if config is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t
