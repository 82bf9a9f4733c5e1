"""Sessions that outlive the server process: their committed state on disk, and back at start.

With ``persist_sessions_s`` set, the service writes each trainable session's committed state (its
tail's weights, its optimizer state, its step number) with the session's identity (id, node,
certificate fingerprint, tail options) under the tag ``live-<session id>`` of the state store:
after an applied optimizer step once ``persist_sessions_s`` has passed since the last write (0:
after every step, before the step's reply leaves), and when the server stops (SIGTERM: the
streams drain first). A session with a frozen tail has no state of its own: it is written once,
when it opens, so that its client too finds it after a restart. Every write is atomic
(state_store.py). A restarted server with the same state folder re-creates these sessions, bound
to the same certificates; a client that reconnects
resumes its session and learns the step the server resumed at (``restored``, ``last_step`` in the
welcome). A session that ends normally (CLOSE, expiry) has its record deleted.

What is not kept: requests in flight (their activations, the reply record), KV caches. The client
sends again what it kept of those (channel/journal.py): the steps after the one restored, and the
sequence being generated; what it did not keep fails (the strategy then names the checkpoint to
resume from).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from lightning_split.server.state_store import StateStore

log = logging.getLogger(__name__)

LIVE_PREFIX = "live-"


class DurableSessions:
    """Write, list and read back the ``live-`` records of a state store."""

    def __init__(self, store: StateStore, every_s: float) -> None:
        self.store = store
        self.every_s = float(every_s)
        self._saved_at: dict[str, float] = {}

    def after_step(self, session: Any, segment: Any) -> None:
        """An optimizer step was applied: write the session if its interval has passed."""
        if time.monotonic() - self._saved_at.get(session.id, -float("inf")) >= self.every_s:
            self.save(session, segment)

    def save(self, session: Any, segment: Any) -> None:
        """Write the session (a frozen one is only its identity: a few hundred bytes)."""
        state = segment.state_dict()
        state["session"] = {"id": session.id, "node_id": session.node_id, "fingerprint": session.fingerprint,
                            "tail": session.hello.get("tail"), "client_fingerprint": session.hello.get("fingerprint"),
                            "optimizer": segment.optimizer_spec}
        self.store.save(session.node_id, LIVE_PREFIX + session.id, state)
        self._saved_at[session.id] = time.monotonic()

    def forget(self, session: Any) -> None:
        """The session ended for good: its record goes."""
        self._saved_at.pop(session.id, None)
        self.store.delete(session.node_id, LIVE_PREFIX + session.id)

    def records(self) -> list[tuple[str, str]]:
        """(node id, tag) of every session record in the store."""
        # Temporary files start with "." and end otherwise: the pattern matches committed records only.
        return [(meta.parent.name, meta.stem) for meta in sorted(self.store.root.glob(f"*/{LIVE_PREFIX}*.json"))]

    def load(self, node_id: str, tag: str) -> dict[str, Any]:
        return self.store.load(node_id, tag)
