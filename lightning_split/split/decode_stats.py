"""What one ``generate`` call cost in round trips, and what speculative decoding saved.

Every cached INFER the runner sends is one round trip to the server, and says how many tokens
the server holds before it (``past``) and how many it brings (``new``). Plain decoding brings one
token per round trip. Hugging Face's assisted generation (a draft model, or prompt lookup) brings
the last accepted token and k drafted ones, the server's segment verifies them all in that one
round trip, and the next call's ``past`` tells how many of the k were kept: Hugging Face crops
its cache to the accepted length, and the server follows (``cache.crop``). So the runner's calls
alone give the acceptance, with the prompt's length for the first call (prompt and drafts in
one) and the output's length for the last (no call follows it).

``install_generation_metrics`` wraps the split model's ``generate`` to fill
``model.generation_metrics`` after each call (and ``split_metrics`` of its result with
``return_dict_in_generate=True``); ``SplitProgress`` is a streamer that prints the same
figures on one line while tokens arrive.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from transformers.generation.streamers import BaseStreamer


@dataclass
class GenerationMetrics:
    """One ``generate`` call through the split (per sequence; drafting runs at batch 1)."""

    new_tokens: int
    round_trips: int  # cached INFER calls: the prompt's and one per verify (or plain decode) step
    drafted: int  # tokens proposed by the draft (model or prompt lookup) and sent for verification
    accepted: int  # of which the server's segment confirmed
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round_trip(self) -> float:
        return self.new_tokens / self.round_trips if self.round_trips else 0.0

    @property
    def round_trips_per_token(self) -> float:
        return self.round_trips / self.new_tokens if self.new_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"new_tokens": self.new_tokens, "round_trips": self.round_trips, "drafted": self.drafted,
                "accepted": self.accepted, "seconds": self.seconds, "acceptance_rate": self.acceptance_rate,
                "tokens_per_round_trip": self.tokens_per_round_trip,
                "round_trips_per_token": self.round_trips_per_token, "tokens_per_s": self.tokens_per_s}

    def line(self) -> str:
        drafts = (f"; drafts accepted {self.accepted}/{self.drafted} ({100 * self.acceptance_rate:.0f}%)"
                  if self.drafted else "")
        return (f"{self.new_tokens} tokens in {self.seconds:.2f} s ({self.tokens_per_s:.1f} tokens/s), "
                f"{self.round_trips} round trips: {self.tokens_per_round_trip:.2f} tokens each{drafts}")


class DecodeLog:
    """The cached INFER calls of the sequence being generated: (past, new) each."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.prompt = 0  # the prompt's length per sequence, when a generate wrapper told us
        self.started = time.perf_counter()

    def begin(self, prompt: int) -> None:
        self.calls, self.prompt, self.started = [], prompt, time.perf_counter()

    def record(self, past: int, new: int) -> None:
        if past == 0 and self.calls:  # a new sequence without a wrapper's begin (a bare forward loop)
            self.calls = []
        self.calls.append((past, new))

    def metrics(self, held_after_last: int | None = None) -> GenerationMetrics:
        """The figures so far; ``held_after_last``: the tokens the cache keeps after the last call
        (the output's length less one), which closes the last call's count."""
        drafted = accepted = produced = 0
        kept_after = [past for past, _ in self.calls[1:]] + [held_after_last]
        for (past, new), kept in zip(self.calls, kept_after, strict=True):
            if kept is None or (past == 0 and not self.prompt):
                continue  # not known yet: the call after it has not come
            before = past + 1 if past else self.prompt  # the tokens before this call's drafts
            proposed = max(0, past + new - before)
            confirmed = max(0, min(proposed, kept - before))
            drafted, accepted, produced = drafted + proposed, accepted + confirmed, produced + confirmed + 1
        return GenerationMetrics(produced, len(self.calls), drafted, accepted, time.perf_counter() - self.started)


def install_generation_metrics(model: Any, log: DecodeLog) -> None:
    """Wrap ``model.generate``: each call's ``GenerationMetrics`` land in ``model.generation_metrics``."""
    generate = getattr(model, "generate", None)
    if generate is None:  # not a generating model (a classifier, an nn.Sequential)
        return
    model.generation_metrics = None

    @functools.wraps(generate)
    def generate_with_metrics(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)
        log.begin(int(ids.shape[-1]) if isinstance(ids, torch.Tensor) else 0)
        out = generate(*args, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
        held = int(sequences.shape[-1]) - 1 if isinstance(sequences, torch.Tensor) and log.prompt else None
        model.generation_metrics = log.metrics(held) if log.calls else None
        if sequences is not None and sequences is not out and model.generation_metrics is not None:
            out["split_metrics"] = model.generation_metrics  # generate(return_dict_in_generate=True)'s result too
        return out

    model.generate = generate_with_metrics


class SplitProgress(BaseStreamer):
    """A ``generate(streamer=...)`` that prints the split's figures on one line as tokens come:
    tokens/s, tokens per round trip and the drafts' acceptance."""

    def __init__(self, log: DecodeLog, stream: TextIO | None = None, every_s: float = 0.2) -> None:
        self.log, self.stream, self.every_s = log, stream or sys.stderr, every_s
        self.prompt: int | None = None  # tokens per sequence in the prompt (the first put)
        self.tokens, self._last = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        if self.prompt is None:
            self.prompt = int(value.shape[-1])
            return
        self.tokens += int(value.shape[-1]) if value.dim() else 1
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self.stream.write("\r" + self.log.metrics().line())
            self.stream.flush()

    def end(self) -> None:
        held = (self.prompt or 0) + self.tokens - 1  # what the cache keeps: closes the last round's count
        self.stream.write("\r" + self.log.metrics(held if self.prompt else None).line() + "\n")
        self.stream.flush()
