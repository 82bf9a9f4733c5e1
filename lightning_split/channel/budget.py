"""Memory the server holds for its peers, accounted per node and for the whole server.

Every byte a peer can make the server hold is charged here *before* it is allocated: a message's
payload buffer when its first fragment arrives (the size from the frame header), and, through the
application, what a session keeps between requests (saved activations awaiting their backward,
KV caches). A charge that would take the node over its own budget, or the server over its total,
is refused with RESOURCE_EXHAUSTED and nothing is allocated; other nodes' charges go on as before,
so one careless or hostile tenant cannot take memory that others need.

Amounts are held under keys (``(session_id, "kv_cache")``, ``(stream, "payload")``...):
``set(key, n)`` replaces the key's previous amount, so a holder reports what it holds now, not
deltas it could get wrong; ``release(key)`` or ``release_prefix(session_id)`` returns it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator
from dataclasses import dataclass

import grpc

from .session import HandlerError

__all__ = ["BudgetExceeded", "MemoryBudget", "NodeAccount", "UNLIMITED"]

UNLIMITED = 0  # a budget of 0 bytes means "no limit"


class BudgetExceeded(HandlerError):
    """A charge over the node's or the server's memory budget: RESOURCE_EXHAUSTED."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} bytes"


@dataclass
class _Usage:
    total: int = 0


class MemoryBudget:
    """The server's memory budget: ``server_bytes`` in all, ``node_bytes`` per node (0: unlimited)."""

    def __init__(self, server_bytes: int = UNLIMITED, node_bytes: int = UNLIMITED) -> None:
        if server_bytes < 0 or node_bytes < 0:
            raise ValueError("memory budgets must be >= 0 (0: unlimited)")
        self.server_bytes = int(server_bytes)
        self.node_bytes = int(node_bytes)
        self._lock = threading.Lock()
        self._used = 0
        self._accounts: dict[str, NodeAccount] = {}

    def account(self, node_id: str) -> NodeAccount:
        """The node's account (made on first use; it lives as long as the server)."""
        with self._lock:
            acct = self._accounts.get(node_id)
            if acct is None:
                acct = self._accounts[node_id] = NodeAccount(self, node_id)
            return acct

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    def usage(self) -> dict[str, int]:
        """Bytes held per node (nodes holding nothing left out), for status and tests."""
        with self._lock:
            return {n: a._used for n, a in self._accounts.items() if a._used}

    def _change(self, acct: NodeAccount, key: Hashable, nbytes: int, what: str, dry_run: bool = False) -> None:
        with self._lock:
            old = acct._held.get(key, 0)
            delta = nbytes - old
            if delta > 0:
                if self.node_bytes and acct._used + delta > self.node_bytes:
                    raise BudgetExceeded(
                        f"memory budget of node {acct.node_id!r}: {what} needs {_mib(delta)} more, "
                        f"{_mib(acct._used)} of {_mib(self.node_bytes)} already held")
                if self.server_bytes and self._used + delta > self.server_bytes:
                    raise BudgetExceeded(
                        f"server memory budget: {what} needs {_mib(delta)} more, "
                        f"{_mib(self._used)} of {_mib(self.server_bytes)} already held by all nodes")
            if dry_run:
                return
            if nbytes:
                acct._held[key] = nbytes
            else:
                acct._held.pop(key, None)
            acct._used += delta
            self._used += delta


class NodeAccount:
    """One node's share of a :class:`MemoryBudget`. Thread-safe (the budget's lock)."""

    def __init__(self, budget: MemoryBudget, node_id: str) -> None:
        self.budget = budget
        self.node_id = node_id
        self._held: dict[Hashable, int] = {}
        self._used = 0

    @property
    def used(self) -> int:
        with self.budget._lock:
            return self._used

    def held(self, key: Hashable) -> int:
        with self.budget._lock:
            return self._held.get(key, 0)

    def set(self, key: Hashable, nbytes: int, what: str = "a request") -> None:
        """Hold ``nbytes`` under ``key`` instead of what it held. An increase over the node's or
        the server's budget raises BudgetExceeded and leaves the key's old amount in place."""
        if nbytes < 0:
            raise ValueError("a memory charge must be >= 0")
        self.budget._change(self, key, int(nbytes), what)

    def check(self, key: Hashable, nbytes: int, what: str = "a request") -> None:
        """Raise BudgetExceeded if ``set(key, nbytes)`` would; charges nothing."""
        self.budget._change(self, key, int(nbytes), what, dry_run=True)

    def release(self, key: Hashable) -> None:
        self.budget._change(self, key, 0, "")

    def release_prefix(self, prefix: Hashable) -> None:
        """Release every key that is a tuple starting with ``prefix`` (e.g. one session's)."""
        with self.budget._lock:
            keys = [k for k in self._held if isinstance(k, tuple) and k and k[0] == prefix]
        for k in keys:
            self.release(k)

    @contextlib.contextmanager
    def hold(self, key: Hashable, nbytes: int, what: str = "a request") -> Iterator[None]:
        """Hold ``nbytes`` for the duration of a block."""
        self.set(key, nbytes, what)
        try:
            yield
        finally:
            self.release(key)
