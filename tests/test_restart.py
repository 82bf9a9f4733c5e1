"""A server that dies or stops mid-fit and comes back on the same port and state folder: the
client reconnects, its session is restored from disk at the step the client is at, and the run
ends with the weights of an uninterrupted one on both sides (fp32, CPU). Real processes: the
server runs in its own process, killed with SIGKILL or stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
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
    import json, signal, sys, threading
    from pathlib import Path
    import torch
    from lightning_split.channel import ChannelConfig, ChannelServer, server_tls
    from lightning_split.server.service import SplitService
    from lightning_split.split.build import ModelSource
    from lightning_split.split.spec import SplitSpec
    from lightning_split.wire import MessageType
    port, pki, state, persist, threads = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    case, stuck = json.loads(sys.argv[6]), sys.argv[7]
    torch.set_num_threads(threads)  # the test's own: the same sums in the same order
    source, spec = ModelSource.from_dict(case["source"]), SplitSpec.from_dict(case["spec"])
    service = SplitService(source, spec, device="cpu", state_dir=state, persist_sessions_s=persist)
    if stuck:  # "TYPE:N": hang (once) in the request of that type and step (INFER: cached tokens)
        kind, number = stuck.split(":")
        once, handle = Path(state) / "stuck-once", service.handle

        def stuck_handle(session, request):
            at = request.body["cache"]["past"] if kind == "INFER" and "cache" in request.body else request.step
            if request.type == MessageType.Value(kind) and at == int(number) and not once.exists():
                once.touch()
                print("stuck", flush=True)
                threading.Event().wait()  # until SIGKILL
            return handle(session, request)

        service.handle = stuck_handle
    server = ChannelServer(service, f"127.0.0.1:{port}", tls=server_tls(pki), config=ChannelConfig())
    server.start()
    print("ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2)  # streams drain, then the sessions are kept on disk
""")


class Server:
    """The split server in a process of its own, on a fixed port and state folder. With ``stuck``
    (``"TYPE:N"``), its first run hangs in that request: ``restart_when_stuck`` kills it there."""

    def __init__(self, pki: Path, state: Path, persist_s: float, case: str = "gpt2_two_part",
                 stuck: str = "") -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        source, spec, _, _ = CASES[case]  # as JSON: the server's process imports no test module (nor Lightning)
        model = json.dumps({"source": source.to_dict(), "spec": spec.to_dict()})
        self.args = [str(self.port), str(pki), str(state), str(persist_s), str(torch.get_num_threads()), model, stuck]
        self.proc: subprocess.Popen | None = None
        self.watcher: threading.Thread | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, *self.args], stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=ROOT)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def end(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def restart_when_stuck(self) -> None:
        """In the background: once the server hangs in its request, SIGKILL it and start it again."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None

        def watch() -> None:
            if proc.stdout.readline().strip() == "stuck":
                self.end(signal.SIGKILL)
                self.start()

        self.watcher = threading.Thread(target=watch, daemon=True)
        self.watcher.start()


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


def _local_run(case: str, steps: int) -> Any:
    """The uninterrupted local run of ``case`` (two-part: an untied output layer, as the split has)."""
    source, spec, make_module, batches = CASES[case]
    local = make_module()
    local.model = build_model(source)
    if spec.shape == "two_part":  # the server's output layer is its own copy
        local.model.lm_head.weight = torch.nn.Parameter(local.model.lm_head.weight.detach().clone())
    trainer, _ = _trainer(steps=steps, accumulate_grad_batches=1)
    trainer.fit(local, batches())
    return local


class KillBeforeBackward(Callback):
    """At one step, after its forward (the server holds its graph, or has its gradients) and before
    its backward: SIGKILL the server and start it again."""

    def __init__(self, server: Server, step: int) -> None:
        self.server, self.step = server, step

    def on_before_backward(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.server.end(signal.SIGKILL)
            self.server.start()


# Each split shape and each fault once (the four pairs took 90 s of CI, each server start ~8 s).
@pytest.mark.parametrize(("case", "fault"), [("gpt2_two_part", "killed-in-the-step"),
                                             ("gpt2", "killed-between-forward-and-backward")])
def test_a_server_killed_with_a_step_in_flight_is_brought_back_and_training_goes_on(pki, tmp_path, case,
                                                                                   fault) -> None:
    """The server keeps every step (``persist_sessions_s: 0``) and is SIGKILLed inside step 3:
    while it runs the request that carries the step (two-part: the step rides on the fused
    backward's BACKWARD; U-shape: on the BACKWARD with the gradients), or between the step's forward
    and its backward (the graph or gradients it built died with it). The restarted server comes
    back at step 2; the client sends it again what step 3 had sent and goes on (journal.py), and
    both sides end with the weights of the uninterrupted run."""
    steps = 6
    local = _local_run(case, steps)
    stuck = "BACKWARD:3" if fault == "killed-in-the-step" else ""
    server = Server(pki, tmp_path / "state", 0.0, case=case, stuck=stuck)
    server.start()
    try:
        if fault == "killed-in-the-step":
            server.restart_when_stuck()
            callbacks: list[Callback] = []
        else:
            callbacks = [KillBeforeBackward(server, 3)]
        strategy = _strategy(f"127.0.0.1:{server.port}", client_tls(pki, "alice"), tail="trainable",
                             channel=ChannelConfig(connections=1))
        split = CASES[case][2]()
        trainer, _ = _trainer(strategy, steps=steps, accumulate_grad_batches=1, callbacks=callbacks)
        trainer.fit(split, CASES[case][3]())
        stats = strategy.split.client.stats
        assert stats.reconnects == 1 and stats.replayed >= 1 and strategy._restart_seen is not None
        assert strategy._restart_seen["last_step"] == 2
        strategy._request(MessageType.STATE, {"op": "save", "tag": "final"})
        strategy.close()
    finally:
        if server.watcher is not None:
            server.watcher.join(timeout=60)
        server.end(signal.SIGKILL)
    saved = StateStore(tmp_path / "state").load("alice", "final")
    assert saved["last_step"] == steps - 1  # no step lost, none applied twice
    for name, p in split.named_parameters():
        torch.testing.assert_close(p, dict(local.named_parameters())[name], rtol=1e-5, atol=1e-6, msg=name)
    spec = CASES[case][1]
    server_part = [*local.model.transformer.h[spec.cut:spec.end]]
    for i, block in enumerate(server_part):
        for name, q in block.named_parameters():
            torch.testing.assert_close(saved["params"][f"blocks.{i}.{name}"], q, rtol=1e-5, atol=1e-6, msg=name)


# Each fault and each way of sampling once (the four pairs took 87 s of CI).
@pytest.mark.parametrize(("fault", "sampling"), [("between-tokens", True), ("in-flight", False)],
                         ids=["between-tokens-seeded-sampling", "in-flight-greedy"])
def test_generation_survives_a_server_restart_at_token_5_of_20(pki, tmp_path, sampling, fault) -> None:
    """The server is SIGKILLed and started again at token 5 of 20: between two tokens, or while it
    makes token 5. Its KV cache died with it; the client sends again the prompt's and each token's
    step (journal.py), the server's cache is rebuilt, and the tokens equal uninterrupted local
    generate's."""
    from transformers.generation.streamers import BaseStreamer

    from lightning_split.split.connect import open_split

    source, spec, _, _ = CASES["gpt2_two_part"]
    prompt = 7
    ids = torch.randint(0, source.config["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(3))
    kw: dict[str, Any] = {"max_new_tokens": 20, "do_sample": sampling, "pad_token_id": 0}
    if sampling:
        kw.update(top_k=20, temperature=1.5)
    local = build_model(source).eval()  # (building seeds torch's generator: before our seed)
    torch.manual_seed(11)
    expected = local.generate(ids, **kw)
    # In flight: the step that feeds token 4 back (its server cache holds the prompt and 3 more).
    server = Server(pki, tmp_path / "state", 3600.0, stuck=f"INFER:{prompt + 3}" if fault == "in-flight" else "")
    server.start()

    class RestartAtToken(BaseStreamer):
        def __init__(self) -> None:
            self.puts = 0

        def put(self, value: torch.Tensor) -> None:
            self.puts += 1
            if self.puts == 6:  # the prompt, then 5 tokens
                server.end(signal.SIGKILL)
                server.start()

        def end(self) -> None:
            pass

    try:
        if fault == "in-flight":
            server.restart_when_stuck()
        remote = open_split(f"127.0.0.1:{server.port}", "alice", client_tls(pki, "alice"), source=source,
                            spec=spec, config=ChannelConfig(connections=1))
        torch.manual_seed(11)
        got = remote.model.eval().generate(ids, streamer=RestartAtToken() if fault == "between-tokens" else None, **kw)
        stats = remote.client.stats
        # Sent again: the prompt's step and the steps of the tokens before (the one in flight is resent).
        assert stats.reconnects == 1 and stats.replayed == (5 if fault == "between-tokens" else 4)
        assert torch.equal(got, expected)
        remote.close()
    finally:
        if server.watcher is not None:
            server.watcher.join(timeout=60)
        server.end(signal.SIGKILL)
