"""What the server's operator sees: the status line's counters and a log line per closed session."""

from __future__ import annotations

import logging

import torch

from lightning_split.server.activity import status_line
from lightning_split.split.connect import open_split
from lightning_split.split.spec import SplitSpec
from tests.split_cases import GPT2

SPEC = SplitSpec(cut=1, shape="two_part")


def test_status_line_counts_sessions_and_tokens_and_closes_are_logged(split_server, caplog) -> None:
    address, tls_for = split_server(GPT2, SPEC)
    server = split_server.servers[-1]
    activity = server.handler.activity
    since = activity.read()
    remote = open_split(address, "alice", tls_for("alice"), source=GPT2, spec=SPEC)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    remote.model.eval().generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    line, now = status_line(server, activity, since)
    assert "1 session(s) of 1 node(s)" in line and "RSS" in line and "tokens/s generated" in line
    assert now.prompt_tokens - since.prompt_tokens == 2 * 7  # the prompt, both rows
    assert now.tokens - since.tokens == 2 * 4  # then one token per row per step after the first
    with caplog.at_level(logging.INFO, logger="lightning_split"):
        remote.close()
    assert any("closed session" in r.getMessage() and "alice" in r.getMessage() for r in caplog.records)
    assert "0 session(s) of 0 node(s)" in status_line(server, activity, now)[0]
