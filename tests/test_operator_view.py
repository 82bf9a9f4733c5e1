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


def test_a_failed_tls_handshake_is_logged_with_the_peer_address(pki, tmp_path) -> None:  # noqa: ANN001
    """`lightning-split serve` as an operator runs it; a client whose certificate another CA signed
    gets UNAVAILABLE, and the server's log says who tried and why."""
    import dataclasses
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    from lightning_split.channel import ChannelClient, RemoteError, client_tls, make_certs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "lightning-split"), "serve", f"server.address=127.0.0.1:{port}",
         f"server.certs={pki}", f"server.state_dir={tmp_path / 'state'}", "server.status_every_s=0",
         f"hydra.run.dir={tmp_path / 'run'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        said = next(line for line in server.stdout if "lightning-split: serving" in line or "Error" in line)
        assert "with mutual TLS" in said, said
        other = tmp_path / "other-ca"
        make_certs(other, client_ids=["eve"])
        eve = client_tls(other, "eve")
        with pytest.raises(RemoteError, match="UNAVAILABLE"):
            ChannelClient(f"127.0.0.1:{port}", "eve", tls=eve).request(4, 1)
        # That client may refuse our certificate before we see its own, in every handshake it
        # makes. One that trusts our CA but holds the other CA's certificate always reaches the
        # server's refusal.
        trusting_eve = dataclasses.replace(eve, ca=Path(pki) / "ca.pem")
        with pytest.raises(RemoteError, match="UNAVAILABLE"):
            ChannelClient(f"127.0.0.1:{port}", "eve", tls=trusting_eve).request(4, 1)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        out, err = server.communicate(timeout=60)
    logged = out + err  # Hydra's console log is stdout; gRPC's lines are stderr
    warned = [line for line in logged.splitlines() if "TLS handshake from ipv4:127.0.0.1:" in line]
    # Handshakes refused both ways: the first client would not trust our certificate (another CA
    # signed its trust bundle), and we would not take the second one's certificate.
    assert any("not signed by this server's CA" in line for line in warned), logged[-3000:]
    assert any("may not trust this server's certificate" in line for line in warned), logged[-3000:]
    assert "CallNextHandshakerLocked" not in logged  # the trace itself is not passed on
