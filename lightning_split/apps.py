"""The Hydra apps behind ``lightning-split serve`` and ``lightning-split train``.

Both read the package's ``conf/`` (``serve.yaml``, ``train.yaml`` and a ``model/`` group), or a
``./conf`` of the user's; every key can be overridden on the command line the Hydra way
(``model=gpt2_tiny trainer.max_epochs=1``), and the package's ``recipes/`` are found by name.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

Runner = Callable[[list[str]], int]


PACKAGE = Path(__file__).resolve().parent
RECIPES = PACKAGE / "recipes"  # complete runs, found by name (``--config-name gpt2_lora_client``)


def config_dir() -> str:
    """``./conf`` if the working directory has one (the user's own), else the package's ``conf/``
    (installed with it: ``lightning-split serve`` works from any directory after ``pip install``)."""
    here = Path.cwd() / "conf"
    if (here / "serve.yaml").exists():
        return str(here)
    return str(PACKAGE / "conf")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def share_cores(threads: int | None, address: str) -> int:
    """Set torch's CPU threads: ``threads`` if given, else half the cores where ``address`` is this
    host's loopback (client and server then share the host: two processes each on every core spin
    against each other; the README's example took 171 s so, 36 s with one thread each), else
    torch's default. Returns the number set."""
    import os

    import torch

    from lightning_split.split.adaptive import is_loopback

    if not threads and is_loopback(address):
        threads = max(1, (os.cpu_count() or 2) // 2)
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def build_server(cfg: DictConfig) -> Any:
    """A started ChannelServer serving the configured model's split."""
    from lightning_split.channel import ChannelConfig, ChannelServer, server_tls
    from lightning_split.server.kv_cache import MAX_CACHE_BYTES
    from lightning_split.server.service import SplitService
    from lightning_split.split.build import ModelSource
    from lightning_split.split.spec import SplitSpec

    s = cfg.server
    service = SplitService(
        ModelSource.from_dict(_plain(cfg.model.source)),
        SplitSpec.from_dict(_plain(cfg.model.split)),
        device=s.device,
        device_map=_plain(s.get("device_map")),
        devices=_plain(s.get("devices")),
        placement=s.get("placement", "spread"),
        tail_modes=tuple(s.tail_modes),
        state_dir=s.state_dir,
        max_cache_tokens=s.max_cache_tokens,
        max_cache_bytes=s.get("max_cache_bytes", MAX_CACHE_BYTES),
        allow_nonfinite=s.get("allow_nonfinite", False),
        fast_decode=s.get("fast_decode"),
        prompt_graph_tokens=s.get("prompt_graph_tokens", 4096),
        train_graphs=s.get("train_graphs", True),
        batch_window_ms=s.get("batch_window_ms"),
        max_batch=s.get("max_batch", 64),
        persist_sessions_s=s.get("persist_sessions_s"),
    )
    tls = None if s.insecure else server_tls(s.certs)
    server = ChannelServer(service, s.address, tls=tls, insecure=s.insecure,
                           config=ChannelConfig.from_dict(_plain(cfg.channel)), max_workers=s.max_workers)
    server.start()
    return server


def serve(cfg: DictConfig) -> None:
    if cfg.server.get("log_tls_failures", True) and not cfg.server.get("insecure", False):
        # Before anything imports gRPC, which reads its trace settings then (tls_log.py).
        from lightning_split.tls_log import HandshakeWatch

        HandshakeWatch.install()
    import torch

    share_cores(cfg.server.get("torch_threads"), cfg.server.address)
    server = build_server(cfg)
    split = server.handler.description["resolved"]
    host = cfg.server.address.rsplit(":", 1)[0]
    print(f"lightning-split: serving {cfg.model.source.target} ({split['shape']}, server blocks "
          f"{split['cut']}..{split['end'] - 1}) on {host}:{server.port}"
          f"{' (INSECURE plaintext)' if cfg.server.insecure else ' with mutual TLS'}, "
          f"{torch.get_num_threads()} torch thread(s)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    every = float(cfg.server.get("status_every_s") or 0)
    if every > 0:
        threading.Thread(target=_status_lines, args=(server, every, stop), name="status", daemon=True).start()
    stop.wait()
    server.stop(grace=2)


def _status_lines(server: Any, every: float, stop: threading.Event) -> None:
    """The operator's periodic line: sessions, memory, steps/s and tokens/s (server/activity.py)."""
    import logging

    from lightning_split.server.activity import status_line

    log, activity = logging.getLogger("lightning_split.serve"), server.handler.activity
    since = activity.read()
    while not stop.wait(every):
        line, since = status_line(server, activity, since)
        log.info("%s", line)


def train(cfg: DictConfig) -> dict[str, float]:
    import lightning as L

    from lightning_split.strategy import SplitStrategy, register

    register()  # trainer.strategy=split resolves in the console script too (lightning_split/__init__.py)
    L.seed_everything(cfg.seed, verbose=False)
    c = cfg.client
    share_cores(c.get("torch_threads"), c.address)
    strategy = SplitStrategy(
        address=c.address, node_id=c.node_id, certs=c.certs, insecure=c.insecure, tail=_plain(c.tail),
        source=_plain(cfg.model.source), spec=_plain(cfg.model.split), channel=_plain(cfg.channel),
        privacy=_plain(c.get("privacy")),
    )
    module = hydra.utils.instantiate(cfg.model.module)
    train_loader, val_loader = hydra.utils.instantiate(cfg.model.data)
    trainer = make_trainer(cfg.trainer, strategy)
    trainer.fit(module, train_loader, val_loader)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    strategy.close()
    return metrics


def make_trainer(node: DictConfig, strategy: Any) -> Any:
    """The ``trainer`` section instantiated the Hydra way: ``logger``, ``callbacks``, ``plugins`` given
    with ``_target_`` become objects, and ``strategy`` (default: the client section's SplitStrategy)
    may be replaced. Logs and checkpoints go under the Hydra run's folder unless ``default_root_dir``
    says otherwise, so the jobs of a multirun keep theirs apart."""
    from hydra.core.hydra_config import HydraConfig

    spec = OmegaConf.to_container(node, resolve=False)
    spec.setdefault("_target_", "lightning.Trainer")
    if "default_root_dir" not in spec and HydraConfig.initialized():
        spec["default_root_dir"] = HydraConfig.get().runtime.output_dir
    extra = {} if "strategy" in spec else {"strategy": strategy}
    return hydra.utils.instantiate(OmegaConf.create(spec), **extra)


def _hydra_runner(config_name: str, task: Any) -> Runner:
    def run(argv: list[str]) -> int:
        app = hydra.main(config_path=config_dir(), config_name=config_name, version_base=None)(task)
        saved = sys.argv
        # The recipes' folder on the search path (an option: overrides may come anywhere after it).
        own_dir = any(a.startswith("--config-dir") or a == "-cd" for a in argv)
        searched = [] if own_dir else ["--config-dir", str(RECIPES)]
        sys.argv = [f"lightning-split {config_name}", *searched, *argv]
        try:
            app()
        finally:
            sys.argv = saved
        return 0

    return run


RUNNERS: dict[str, Runner] = {"serve": _hydra_runner("serve", serve), "train": _hydra_runner("train", train)}
