"""``compression="auto"``: each kind of tensor's wire encoding, chosen from what the steps measure.

On loopback or a fast link the wire costs little next to the step's compute, and lossless is free.
On a slow one it decides the step time, and fewer bytes win: a GPT-2 small step moves 25 MB each
way in fp32, 200 ms per direction at 1 Gbit/s against a 62 ms step on an H200. So the runner
measures, every training step: how many raw bytes of activations and of gradients crossed each
way, and the link's throughput (the first micro-batch's bytes over its round trip less the server's
own handling time, which every reply reports in ``Header.server_us``). After the ``first`` steps (a
slow link should cost a few steps, not ``every``), then every ``every`` steps, it
predicts the step time of each choice of encoding, one for activations and one for gradients,
among none, bf16 and one byte per value (block-wise, with error feedback for gradients) and takes the
least lossy whose predicted time is within ``tolerance`` of the fastest. One byte is int8 or fp8
(e4m3), the same size: before each revision the runner hands over one tensor it sends of each kind,
and the kind gets the one of the two with the lower error on it (int8 on dense blocks, fp8 where a
block holds an outlier beside small values, as the hidden states of large LLMs do). The prediction assumes no overlap of
transfer and compute (pessimistic where micro-batches overlap them). Requests carry their encoding
and ask for their reply's (``Header.reply_encoding``); the receiver accepts every mode it allows.
Casts and quantisation run on the tensor's device, before the copy to the host.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import statistics
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

from lightning_split.wire import CompressionConfig
from lightning_split.wire.compression import lossy_roundtrip

KINDS = ("activations", "gradients")
# Below this measured throughput the runner keeps more micro-batches in flight: their transfers
# dwarf the server's fixed cost per micro-batch. GPT-2 small on an H200, int8 both ways: over
# 100 Mbit/s 8 micro-batches took 389-430 ms/step against 4's 517; over 1 Gbit/s 4 took 151-178 and
# 8 284. Measured, a link reads slower than its rate (the first micro-batch's round trip, latency
# and all): 44 MB/s for that 1 Gbit/s link, so the line sits well below it.
SLOW_LINK_BYTES_PER_S = 25e6
LADDER = ("none", "bf16", "byte")  # least to most lossy; "byte": int8 or fp8, whichever errs less
BYTE_MODES = ("int8", "fp8")
# Wire bytes per raw fp32 byte (int8/fp8: one byte per value and a float32 scale per 128).
ONE_BYTE = (1 + 4 / 128) / 4
WIRE_FRACTION = {"none": 1.0, "bf16": 0.5, "byte": ONE_BYTE, **dict.fromkeys(BYTE_MODES, ONE_BYTE)}


class AdaptiveCompression:
    """The encodings of activations and gradients, revised from the measured steps."""

    def __init__(self, allowed: Iterable[str], base: CompressionConfig | None = None, every: int = 8,
                 tolerance: float = 0.05, window: int = 16, first: int = 2) -> None:
        allowed = set(allowed) | {"none"}
        self.byte_modes = [m for m in BYTE_MODES if m in allowed]
        self.ladder = [m for m in LADDER if m in allowed or (m == "byte" and self.byte_modes)]
        # Each kind's one-byte encoding, revised from the sampled tensors (``sample``).
        self.byte_mode = {kind: (self.byte_modes or ["int8"])[0] for kind in KINDS}
        self.base = base or CompressionConfig()
        self.every, self.first, self.tolerance = every, first, tolerance
        self.modes = {kind: "none" for kind in KINDS}
        self._steps: deque[dict[str, float]] = deque(maxlen=window)
        self._throughput: deque[float] = deque(maxlen=window)
        self._step = self._new_step()
        self._count = 0
        # Whether the link measured slower than SLOW_LINK_BYTES_PER_S at the last revision: more
        # micro-batches in flight then (remote.py).
        self.slow_link = False
        self._lock = threading.Lock()  # replies are recorded by the client's reader thread

    @staticmethod
    def _new_step() -> dict[str, float]:
        return {"activations": 0.0, "gradients": 0.0, "seconds": 0.0}

    def config(self, kind: str) -> CompressionConfig:
        """How a tensor of ``kind`` goes on the wire now."""
        return dataclasses.replace(self.base, lossy=self.modes[kind])

    def options(self, sends: str, reply: str) -> dict[str, Any]:
        """``ChannelClient.submit`` options of a request that sends ``sends`` and gets ``reply``."""
        return {"compression": self.config(sends), "reply_lossy": self.modes[reply]}

    def record(self, sends: str, sent_raw: int, reply: str, reply_raw: int, reply_wire: int, rtt_s: float,
               server_s: float, first: bool) -> None:
        """One request and its reply. ``first``: the step's first, not queued behind another on
        the server, so its round trip is the link's and the server's alone."""
        with self._lock:
            self._step[sends] += sent_raw
            self._step[reply] += reply_raw
            wire_s = rtt_s - server_s
            if first and wire_s > 0:
                sent_wire = sent_raw * WIRE_FRACTION[self.modes[sends]]
                self._throughput.append((sent_wire + reply_wire) / wire_s)

    def wants_sample(self) -> bool:
        """Whether the next request should hand its tensor to ``sample``: the step before a revision."""
        return len(self.byte_modes) > 1 and self._revision_after(self._count + 1)

    def _revision_after(self, steps: int) -> bool:
        return steps == self.first or steps % self.every == 0

    def sample(self, kind: str, tensor: torch.Tensor) -> None:
        """Give ``kind`` the one-byte encoding that errs less on ``tensor`` (relative L2 error)."""
        t = tensor.detach()
        if not t.is_floating_point() or not t.numel():
            return
        norm = float(t.float().norm())
        if norm == 0 or norm != norm or norm == float("inf"):
            return
        errors = {m: float((lossy_roundtrip(t, dataclasses.replace(self.base, lossy=m)).float() - t.float()).norm())
                  for m in self.byte_modes}
        self.byte_mode[kind] = min(self.byte_modes, key=errors.__getitem__)

    def end_step(self, seconds: float) -> bool:
        """A training step ended after ``seconds``; returns True if the encodings changed."""
        with self._lock:
            self._step["seconds"] = seconds
            if self._step["activations"] or self._step["gradients"]:
                self._steps.append(self._step)
            self._step = self._new_step()
            self._count += 1
        if not self._revision_after(self._count) or not self._steps or not self._throughput:
            return False
        chosen = self.choose()
        self.slow_link = statistics.median(self._throughput) < SLOW_LINK_BYTES_PER_S
        changed = chosen != self.modes
        self.modes = chosen
        return changed

    def _transfer_s(self, modes: dict[str, str]) -> float:
        """Seconds a measured step's bytes take on the link in the encodings ``modes``."""
        rate = statistics.median(self._throughput)
        return sum(statistics.median(s[k] for s in self._steps) * WIRE_FRACTION[modes[k]] for k in KINDS) / rate

    def predicted(self, modes: dict[str, str]) -> float:
        """The step time ``modes`` would give: the measured step with its transfer replaced."""
        seconds = statistics.median(s["seconds"] for s in self._steps)
        return max(seconds - self._transfer_s(self.modes), 0.0) + self._transfer_s(modes)

    def choose(self) -> dict[str, str]:
        """The least lossy encodings whose predicted step time is within ``tolerance`` of the best."""
        options = [{"activations": a, "gradients": g} for a in self.ladder for g in self.ladder]
        times = {id(o): self.predicted(o) for o in options}
        best = min(times.values())
        fine = [o for o in options if times[id(o)] <= best * (1 + self.tolerance)]
        # Least lossy overall; between equals, keep the activations (the forward itself) exact.
        rungs = min(fine, key=lambda o: (self.ladder.index(o["activations"]) + self.ladder.index(o["gradients"]),
                                         self.ladder.index(o["activations"])))
        return {kind: self.byte_mode[kind] if rung == "byte" else rung for kind, rung in rungs.items()}

    @property
    def link_bytes_per_s(self) -> float | None:
        """The link's measured throughput (median of the recent steps' first round trips)."""
        with self._lock:
            return statistics.median(self._throughput) if self._throughput else None

    @property
    def wire_bits(self) -> dict[str, float]:
        """Bits per fp32 value on the wire now, by kind (32, 16, 8.25)."""
        return {k: 32 * WIRE_FRACTION[m] for k, m in self.modes.items()}


def resolve_mode(compression: str | None, address: str) -> str:
    """What ``SplitStrategy(compression=...)`` means for a server at ``address``: ``"auto"`` or
    ``"channel"`` (the ChannelConfig's own, exact unless it says lossy). The default (None) is
    ``"auto"`` where the server is on another host, whose link may be slow, and ``"channel"`` on
    this host's loopback, where the wire costs little and runs stay bit-exact with local ones."""
    if compression not in (None, "auto", "channel"):
        raise ValueError(f"compression must be None, 'auto' or 'channel', got {compression!r}")
    return compression or ("channel" if is_loopback(address) else "auto")


def is_loopback(address: str) -> bool:
    """Whether a gRPC target (``host:port``, ``[v6]:port``, ``ipv4:``/``dns:`` forms, ``unix:``)
    names this host; a name other than ``localhost`` counts as remote (no DNS lookup here)."""
    target = address
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    host = host.strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
