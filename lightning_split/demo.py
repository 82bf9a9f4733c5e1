"""``make demo``: split training over mutual TLS, start to finish, in about a minute on 2 CPU cores.

1. certificates from our own ``lightning-split certs``;
2. a server (``lightning-split serve``, a Hydra app) in the background on a loopback port;
3. ``Trainer(strategy="split")`` training an MLP on scikit-learn's bundled digits: the client keeps
   the first layer, the classifier and the labels; the server trains the middle blocks;
4. the loss falling, the bytes each way and the round-trip time; then the server is stopped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_split import cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lightning_split.cli", "serve", f"server.address=127.0.0.1:{port}",
           f"server.certs={work / 'certs'}", f"server.state_dir={work / 'server_state'}",
           f"hydra.run.dir={work / 'server_run'}",
           f"server.torch_threads={max(1, (os.cpu_count() or 2) // 2)}"]  # this process has the other half
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    for line in proc.stdout:  # wait for the server to say it is serving
        if "lightning-split: serving" in line:
            print("  " + line.strip())
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the demo server did not start")


class Report(Callback):
    """Prints the loss and the transport figures as training goes."""

    def __init__(self, every: int = 20) -> None:
        self.every = every
        self.first: float | None = None
        self.last = float("nan")
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        loss = float(outputs["loss"])
        self.first = loss if self.first is None else self.first
        self.last = loss
        if trainer.global_step % self.every == 0:
            stats = trainer.strategy.split.client.stats
            print(f"  step {trainer.global_step:4d}  loss {loss:6.3f}  sent {stats.bytes_sent / 1e6:7.2f} MB  "
                  f"received {stats.bytes_received / 1e6:7.2f} MB  mean RTT {1e3 * stats.mean_rtt_s:5.2f} ms")


def main() -> int:
    from lightning_split.examples.modules import Classifier, digits_loaders

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the server process has the other half
    with tempfile.TemporaryDirectory(prefix="lightning-split-demo-") as tmp:
        work = Path(tmp)
        print("1. certificates (lightning-split certs):")
        cli.main(["certs", "--out", str(work / "certs"), "--client", "demo-client"])
        port = _free_port()
        print(f"2. server on 127.0.0.1:{port} (lightning-split serve, mutual TLS):")
        server = start_server(work, port)
        try:
            os.environ.update(LIGHTNING_SPLIT_ADDRESS=f"127.0.0.1:{port}", LIGHTNING_SPLIT_NODE_ID="demo-client",
                              LIGHTNING_SPLIT_CERTS=str(work / "certs"), LIGHTNING_SPLIT_TAIL="trainable")
            print('3. Trainer(strategy="split") on the digits data (the server trains the middle blocks):')
            L.seed_everything(0, verbose=False)
            report = Report()
            trainer = L.Trainer(strategy="split", accelerator="cpu", max_epochs=3, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, callbacks=[report])
            module = Classifier(lr=1e-2, optimizer="Adam")
            train, val = digits_loaders(32, shuffle=True)
            trainer.fit(module, train, val)  # (without val, Lightning says it skips the val loop)
            metrics = trainer.validate(module, val, verbose=False)[0]
            stats = trainer.strategy.split.client.stats
            elapsed = time.perf_counter() - report.start
            print("4. result:")
            print(f"  loss {report.first:.3f} -> {report.last:.3f}, "
                  f"validation accuracy {metrics['val_acc']:.3f}, {trainer.global_step} steps in {elapsed:.1f} s")
            print(f"  bytes client->server {stats.bytes_sent / 1e6:.2f} MB, server->client "
                  f"{stats.bytes_received / 1e6:.2f} MB, {stats.messages} round trips, "
                  f"mean RTT {1e3 * stats.mean_rtt_s:.2f} ms")
            trainer.strategy.close()
        finally:
            server.terminate()
            server.wait(timeout=10)
            print("  server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
