"""A server that dies or stops mid-fit and comes back on the same port and state folder: the
client reconnects, its session is restored from disk at the step the client is at, and the run
ends with the weights of an uninterrupted one on both sides (fp32, CPU). Real processes: the
server runs in its own process, killed with SIGKILL or stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_split import SessionLost
from lightning_split.channel import ChannelConfig, client_tls
from lightning_split.server.state_store import StateStore
from lightning_split.split.build import build_model
from lightning_split.wire import MessageType
from tests.test_strategy import CASES, _strategy, _trainer

ROOT = Path(__file__).resolve().parents[1]

SERVE = textwrap.dedent("""
    import signal, sys, threading
    import torch
    from lightning_split.channel import ChannelConfig, ChannelServer, server_tls
    from lightning_split.server.service import SplitService
    from tests.test_strategy import CASES
    port, pki, state, persist, threads = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(threads)  # the test's own: the same sums in the same order
    source, spec, _, _ = CASES["gpt2_two_part"]
    service = SplitService(source, spec, device="cpu", state_dir=state, persist_sessions_s=persist)
    server = ChannelServer(service, f"127.0.0.1:{port}", tls=server_tls(pki), config=ChannelConfig())
    server.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2)  # streams drain, then the sessions are kept on disk
""")


class Server:
    """The split server in a process of its own, on a fixed port and state folder."""

    def __init__(self, pki: Path, state: Path, persist_s: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.args = [str(self.port), str(pki), str(state), str(persist_s), str(torch.get_num_threads())]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, *self.args], stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=ROOT)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def end(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)


class RestartServerAt(Callback):
    """Between two steps (the last one's server step answered: nothing in flight), end the
    server and start it again."""

    def __init__(self, server: Server, step: int, sig: signal.Signals) -> None:
        self.server, self.step, self.sig, self.done = server, step, sig, False

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step and not self.done:
            self.done = True
            trainer.strategy.split.runner.confirm()  # the fused step's reply is in
            self.server.end(self.sig)
            self.server.start()


@pytest.mark.parametrize(("sig", "persist_s", "tail"),
                         [(signal.SIGKILL, 0.0, "trainable"), (signal.SIGTERM, 3600.0, "trainable"),
                          (signal.SIGKILL, 3600.0, "frozen")],
                         ids=["sigkill-persist-every-step", "sigterm-persist-on-stop", "sigkill-frozen-tail"])
def test_a_server_restart_between_steps_resumes_the_session_exactly(pki, tmp_path, sig, persist_s, tail) -> None:
    """A frozen tail's session is kept when it opens (it has nothing else): the kill finds it on disk."""
    source, spec, make_module, batches = CASES["gpt2_two_part"]
    steps = 6
    local = make_module()
    local.model = build_model(source)
    local.model.lm_head.weight = torch.nn.Parameter(local.model.lm_head.weight.detach().clone())  # untied
    if tail == "frozen":  # the server's part does not train
        for module in (*local.model.transformer.h[spec.cut:], local.model.transformer.ln_f, local.model.lm_head):
            module.requires_grad_(False)
    trainer, _ = _trainer(steps=steps, accumulate_grad_batches=1)
    trainer.fit(local, batches())

    server = Server(pki, tmp_path / "state", persist_s)
    server.start()
    try:
        strategy = _strategy(f"127.0.0.1:{server.port}", client_tls(pki, "alice"), tail=tail,
                             channel=ChannelConfig(connections=1))
        split = make_module()
        trainer, _ = _trainer(strategy, steps=steps, accumulate_grad_batches=1,
                              callbacks=[RestartServerAt(server, 3, sig)])
        trainer.fit(split, batches())
        assert strategy.split.client.stats.reconnects >= 1 and strategy._restart_seen is not None
        strategy._request(MessageType.STATE, {"op": "save", "tag": "final"})
        strategy.close()
    finally:
        server.end(signal.SIGKILL)
    saved = StateStore(tmp_path / "state").load("alice", "final")
    assert saved["last_step"] == (steps - 1 if tail == "trainable" else -1)
    for name, p in split.named_parameters():
        torch.testing.assert_close(p, dict(local.named_parameters())[name], rtol=1e-5, atol=1e-6, msg=name)
    assert bool(saved["params"]) == (tail == "trainable")  # a frozen tail keeps no weights of its own
    for i, block in enumerate(local.model.transformer.h[spec.cut:] if tail == "trainable" else []):
        for name, q in block.named_parameters():
            torch.testing.assert_close(saved["params"][f"blocks.{i}.{name}"], q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_server_restored_behind_the_client_names_the_checkpoint(pki, tmp_path) -> None:
    """The server keeps sessions only every hour: killed at step 3 it comes back at the state of
    its first step, behind the client; the client's fit ends with one SessionLost (as it does when
    a step was in flight when the server died: what it built on died with the process)."""
    source, spec, make_module, batches = CASES["gpt2_two_part"]
    server = Server(pki, tmp_path / "state", 3600.0)
    server.start()
    try:
        strategy = _strategy(f"127.0.0.1:{server.port}", client_tls(pki, "alice"), tail="trainable",
                             channel=ChannelConfig(connections=1))
        trainer, _ = _trainer(strategy, steps=6, accumulate_grad_batches=1,
                              callbacks=[RestartServerAt(server, 3, signal.SIGKILL)])
        with pytest.raises(SessionLost, match="no longer holds session"):
            trainer.fit(make_module(), batches())
        strategy.close()
    finally:
        server.end(signal.SIGKILL)
