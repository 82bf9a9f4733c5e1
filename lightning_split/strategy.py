"""SplitStrategy: Lightning training, validation, testing and prediction through a remote segment.

A thin adapter over a few of Lightning's Strategy hooks (like ``SingleDeviceStrategy``, which it
extends):

* ``setup``: connect to the server (mutual TLS), handshake, SPLIT and LOAD, and put the client's
  part of the model where the LightningModule expects its model (``model_attr``), *before* the
  optimizers are made, so they only see the client's parameters. A trainable or LoRA tail gets an
  optimizer of the same class and hyper-parameters on the server.
* ``training_step``: stamp the step number on every message; log transport metrics. Step numbers
  are the session's, not the Trainer's: they never restart within a session (a second ``fit`` with
  the same strategy goes on counting), and a checkpoint restore rolls both sides back together.
* ``optimizer_step``: the server's optimizer steps with the client's, once per step number (a
  retried step is never applied twice); without clipping the step rides on the step's last
  backward. Gradient clipping by norm is global: the server's squared gradient norm joins the
  client's before the clip coefficient is computed.
* ``save_checkpoint`` / ``load_model_state_dict``: the server saves (restores) its session state
  under a tag that the client's checkpoint records; the model owner's weights stay on the server.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import grpc
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities.types import STEP_OUTPUT

from lightning_split.channel import ChannelConfig, RemoteError, TLSFiles, client_tls
from lightning_split.privacy.defenses import Defenses
from lightning_split.split.adaptive import AdaptiveCompression, resolve_mode
from lightning_split.split.build import ModelSource
from lightning_split.split.connect import SplitModel, open_split
from lightning_split.split.spec import SplitSpec
from lightning_split.split.surgery import SegmentProxy, squared_grad_norm
from lightning_split.wire import MessageType

log = logging.getLogger(__name__)

OPTIMIZER_OPTIONS = ("lr", "momentum", "weight_decay", "betas", "eps", "nesterov", "dampening", "alpha", "amsgrad")


class SessionLost(RuntimeError):
    """The server no longer holds this client's session (it restarted, or closed it): what it had
    trained since the last checkpoint is gone, and only a resume from a checkpoint continues."""


def _optimizer_spec(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's class and first parameter group's hyper-parameters, for the server's copy."""
    group = optimizer.param_groups[0]
    spec: dict[str, Any] = {"name": type(optimizer).__name__}
    for key in OPTIMIZER_OPTIONS:
        value = group.get(key)
        if value is not None:
            spec[key] = list(value) if isinstance(value, tuple) else value
    return spec


class SplitStrategy(SingleDeviceStrategy):
    """Run the LightningModule's model split between this client and a remote server.

    Args:
        address: the server, ``host:port`` (default: ``$LIGHTNING_SPLIT_ADDRESS`` or ``127.0.0.1:50051``).
        node_id: this client's identity, the CN of its certificate (``$LIGHTNING_SPLIT_NODE_ID``).
        certs: a folder made by ``lightning-split certs`` (``$LIGHTNING_SPLIT_CERTS``, default ``certs``).
        tls: explicit certificate files, instead of ``certs``.
        insecure: plaintext, for loopback experiments only; never the default.
        model_attr: the LightningModule attribute that holds the split model (``None`` until setup).
        source, spec: the client's own copy of the model source and split, checked against the
            server's at the handshake; by default the server's description is used.
        tail: the server segment's mode, ``"frozen"`` (``$LIGHTNING_SPLIT_TAIL``, default), ``"trainable"``
            or ``"lora"``, or a dict ``{"mode": ..., "optimizer": {...}, "lora": {...}}``.
        channel: ChannelConfig (chunk size, compression per direction, limits, deadlines, and
            ``connections``: the TLS connections the stream is bonded over; by default one per 4
            cores, at most 4).
        log_transport: log bytes each way, compression ratio and round-trip time each step.
        micro_batches: cut each training batch into this many micro-batches in flight, so that
            transfers overlap the server's compute (default: 2 once a hidden state reaches 4 MiB).
        compression: ``"auto"``: the training steps' activations and gradients each go on the wire
            in the encoding the measured link and step time call for (none, bf16, or int8/fp8 with
            error feedback for gradients; ``split/adaptive.py``), revised every 8 steps; logged as
            ``split/bits_activations`` and ``split/bits_gradients``. ``"channel"``: ``channel``'s
            compression, exact unless it says lossy. None (default): ``"auto"`` for a server on
            another host, ``"channel"`` for one on this host's loopback.
        privacy: defenses on what the client sends (``lightning_split.privacy.Defenses`` or a dict
            of its arguments): noise on the activations, a decorrelation penalty added to the loss
            ``training_step`` returns, label protection on the gradients; see docs/privacy.md.
    """

    strategy_name = "split"

    def __init__(
        self,
        address: str | None = None,
        node_id: str | None = None,
        certs: str | Path | None = None,
        tls: TLSFiles | None = None,
        insecure: bool = False,
        model_attr: str = "model",
        source: ModelSource | dict | None = None,
        spec: SplitSpec | dict | None = None,
        tail: str | dict[str, Any] | None = None,
        channel: ChannelConfig | dict | None = None,
        log_transport: bool = True,
        micro_batches: int | None = None,
        compression: str | None = None,
        privacy: Defenses | dict[str, Any] | None = None,
        server_name_override: str | None = None,
        device: str | torch.device | None = None,
        accelerator: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
    ) -> None:
        if device is None:
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
        super().__init__(device=device, accelerator=accelerator, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin)
        self._given_plugins = (accelerator, checkpoint_io, precision_plugin)
        self._trainer_plugins: tuple[Any, Any, Any] | None = None
        self.address = address or os.environ.get("LIGHTNING_SPLIT_ADDRESS", "127.0.0.1:50051")
        self.node_id = node_id or os.environ.get("LIGHTNING_SPLIT_NODE_ID", "client")
        self.certs = Path(certs or os.environ.get("LIGHTNING_SPLIT_CERTS", "certs"))
        self.tls = tls
        self.insecure = insecure
        self.model_attr = model_attr
        self.source = ModelSource.from_dict(source) if isinstance(source, dict) else source
        self.spec = SplitSpec.from_dict(spec) if isinstance(spec, dict) else spec
        tail = tail or os.environ.get("LIGHTNING_SPLIT_TAIL", "frozen")
        self.tail = {"mode": tail} if isinstance(tail, str) else dict(tail)
        self.channel = ChannelConfig.from_dict(channel) if isinstance(channel, dict) else channel
        self.log_transport = log_transport
        self.micro_batches = micro_batches
        self.compression = resolve_mode(compression, self.address)
        self.privacy = Defenses.from_config(privacy)
        self._step_started: float | None = None
        self.server_name_override = server_name_override
        self.split: SplitModel | None = None
        self._clip_coef: float | None = None
        self._tags: dict[str, str] = {}  # checkpoint path -> the server-state tag saved with it
        self._stats_before: Any = None
        # The session's step number of the Trainer's global step 0 in this fit, and the next step
        # number never used in the session (the server answers a used one as a repeat).
        self._step_base = 0
        self._next_step = 0
        self._restart_seen: dict[str, Any] | None = None  # the welcome of a restart already checked
        self._committed_step = -1  # the last step this client completed (its server step sent)

    # -- connection ---------------------------------------------------------------------------

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # The client's part exists only once setup has connected; restore into it afterwards.
        return True

    def connect_split(self) -> SplitModel:
        """Open the split (once per strategy; later fit/validate/test calls reuse the session)."""
        if self.split is None:
            tls = None if self.insecure else (self.tls or client_tls(self.certs, self.node_id))
            self.split = open_split(
                self.address, self.node_id, tls, source=self.source, spec=self.spec, tail=self.tail,
                config=self.channel, insecure=self.insecure, device=self.root_device,
                server_name_override=self.server_name_override, micro_batches=self.micro_batches,
                privacy=self.privacy,
            )
            weakref.finalize(self, self.split.close)
            if self.compression == "auto":
                client = self.split.client
                self.split.runner.adaptive = AdaptiveCompression(client.welcome.get("lossy_modes", ()), client.sending)
                log.info("compression auto: on a slow link activations and gradients may go lossy (bf16, int8, fp8; "
                         "gradients with error feedback); compression='channel' keeps the wire exact")
        return self.split

    def setup_environment(self) -> None:
        # The device was guessed at construction (cuda:0 where there is one); a Trainer that asks
        # for the CPU (``accelerator="cpu"``, as lightning_split/conf/train.yaml does) keeps the client there.
        from lightning.pytorch.accelerators import CPUAccelerator

        if isinstance(self.accelerator, CPUAccelerator) and self.root_device.type != "cpu":
            self._root_device = torch.device("cpu")
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        module = self.lightning_module
        current = getattr(module, self.model_attr, None)
        split = self.connect_split()
        if current is not split.model:
            if current is not None and not any(isinstance(m, SegmentProxy) for m in current.modules()):
                raise ValueError(
                    f"{type(module).__name__}.{self.model_attr} holds a whole local model; with "
                    "SplitStrategy leave it None: the client's part comes from the server"
                )
            setattr(module, self.model_attr, split.model)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_global_norm
        # A new fit counts its steps from 0; the session's numbers go on (a restore from a
        # checkpoint sets them back, in load_model_state_dict, after this).
        self._step_base = self._next_step - trainer.global_step
        super().setup(trainer)
        if self.tail.get("mode", "frozen") != "frozen" and "optimizer" not in self.tail and self.optimizers:
            self._request(MessageType.OPTIMIZER_STEP,
                          {"op": "configure", "optimizer": _optimizer_spec(self.optimizers[0])})

    def on_train_end(self) -> None:
        if self.split is not None:
            self.split.runner.confirm()  # the last step's fused backward, too, reached the server
        super().on_train_end()

    def teardown(self) -> None:
        super().teardown()
        # Put back the plugins we were given, so that the strategy (and its session) can run under
        # another Trainer: Lightning refuses a strategy that arrives with an accelerator already
        # set. The same Trainer's next run gets its own back in ``connect``.
        self._trainer_plugins = (self._accelerator, self._checkpoint_io, self._precision_plugin)
        self._accelerator, self._checkpoint_io, self._precision_plugin = self._given_plugins

    def connect(self, model: Any) -> None:
        if self._trainer_plugins is not None:
            if self._accelerator is self._given_plugins[0]:  # no new Trainer set its own since
                self._accelerator, self._checkpoint_io, self._precision_plugin = self._trainer_plugins
            self._trainer_plugins = None
        super().connect(model)

    def close(self) -> None:
        """End the server session (its state is freed; saved checkpoints stay on the server)."""
        if self.split is not None:
            self.split.close()
            self.split = None

    def _request(self, kind: int, body: dict[str, Any], step: int = 0) -> Any:
        assert self.split is not None, "SplitStrategy is not connected"
        return self.split.client.request(kind, body, step=step).body

    # -- training -----------------------------------------------------------------------------

    def training_step(self, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        assert self.split is not None
        self.split.runner.step = self._session_step()
        self._time_step()
        with self._session_kept():
            output = super().training_step(*args, **kwargs)
        if self.privacy is not None:  # NoPeek: the client's loss pays for what its activations reveal
            output = self.privacy.add_penalty(output, self.lightning_module)
        self._check_restart()
        self._log_transport()
        return output

    def _time_step(self) -> None:
        """Adaptive compression learns from each step's time (training_step to training_step)."""
        adaptive, now = self.split.runner.adaptive if self.split else None, time.perf_counter()
        if adaptive is not None and self._step_started is not None:
            if adaptive.end_step(now - self._step_started):
                log.info("adaptive compression: activations %s, gradients %s", *adaptive.modes.values())
        self._step_started = now

    def _check_restart(self) -> None:
        """A server that restarted resumed our session from its saved state: training goes on
        only if that state is the one this client's next step follows."""
        assert self.split is not None
        welcome = self.split.client.welcome
        if not welcome.get("restored") or welcome is self._restart_seen:
            return
        self._restart_seen = welcome
        # What the client sent again brought the server from the step it kept up to ``replayed_step``
        # (channel/journal.py): including this client's last completed step is what goes on.
        kept, client_step = welcome.get("last_step"), self._committed_step
        replayed = welcome.get("replayed_step", kept)
        frozen = self.tail.get("mode", "frozen") == "frozen"  # the server trains nothing: no step to match
        if not frozen and not kept <= client_step <= replayed:
            raise self._session_lost(RemoteError(grpc.StatusCode.ABORTED, (
                f"the server restarted from its state at step {kept}, this client is at step {client_step}")))
        log.warning("the server restarted and resumed session %s at step %s; it is at this client's step %s "
                    "again: training goes on", self.split.client.session_id[:8], welcome.get("last_step"), client_step)

    @contextlib.contextmanager
    def _session_kept(self) -> Any:
        """A lost session is one clear error that names the checkpoint to resume from."""
        try:
            yield
        except RemoteError as e:
            lost = e.code == grpc.StatusCode.NOT_FOUND and "session" in e.message
            restarted = e.code == grpc.StatusCode.ABORTED and "server restarted" in e.message
            if not (lost or restarted):
                raise
            raise self._session_lost(e) from e

    def _session_lost(self, error: RemoteError) -> SessionLost:
        trainer = self.lightning_module.trainer
        saved = [cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks]
        path = next((p for p in saved if p), None)
        sid = self.split.client.session_id[:8] if self.split is not None else "?"
        hint = (f"resume with trainer.fit(..., ckpt_path={path!r}) and a new SplitStrategy" if path else
                "no checkpoint was saved in this run (add a ModelCheckpoint to be able to resume)")
        return SessionLost(f"the server no longer holds session {sid} as this client left it (it restarted "
                           f"or closed it), so the training state since the last checkpoint is gone: {hint}. "
                           f"({error.message})")

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        assert self.split is not None
        self._check_restart()
        step = self._session_step()
        self._next_step = step + 1
        with self._session_kept():
            output = self._step_both_sides(step, optimizer, closure, model, **kwargs)
        self._committed_step = step  # sent; a server error in it surfaces at the next request
        return output

    def _step_both_sides(self, step: int, optimizer: Any, closure: Any, model: Any, **kwargs: Any) -> Any:
        """The client's optimizer step, and the server's with it (riding on the backward, or asked for)."""
        assert self.split is not None
        if self.tail.get("mode", "frozen") == "frozen":  # nothing to step on the server
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        body: dict[str, Any] = {"lr": float(optimizer.param_groups[0]["lr"])}
        runner = self.split.runner
        fused = self._server_may_step_with_backward()
        if fused:
            # The closure's backward carries the step: the server steps as soon as its gradients
            # are complete, while the client finishes its own backward; one round trip fewer.
            runner.pending_step = dict(body, step=step)
        self._clip_coef = None
        try:
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        finally:
            unsent, runner.pending_step = runner.pending_step, None
            runner.outstanding.clear()  # a graph not backpropagated by now never will be
            runner.pending_loss_steps.clear()
        runner.confirm(wait=False)  # a server error in a fused backward surfaces at once or next step
        if not fused or unsent is not None:
            # Clipping needs the global norm first; or no backward carried the step (manual
            # optimization, a closure that skipped its backward): ask for it now.
            if self._clip_coef is not None:
                body["clip_coef"] = self._clip_coef
            self._request(MessageType.OPTIMIZER_STEP, body, step=step)
        return output

    def _session_step(self) -> int:
        """The session's number for the Trainer's current step."""
        return self._step_base + self.lightning_module.trainer.global_step

    def _server_may_step_with_backward(self) -> bool:
        """Only when nothing can come between the backward and the step: no gradient clipping."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        module = self.lightning_module
        return (
            module.automatic_optimization
            and not module.trainer.gradient_clip_val
            and not is_overridden("configure_gradient_clipping", module)
        )

    def _clip_grad_by_global_norm(self, optimizer: torch.optim.Optimizer, clip_val: float) -> None:
        """torch's clip_grad_norm_, over the client's and the server's gradients together."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        local_sq = squared_grad_norm(params)
        remote_sq = 0.0
        if self.tail.get("mode", "frozen") != "frozen":
            remote_sq = float(self._request(MessageType.OPTIMIZER_STEP, {"op": "grad_norm"})["sq_norm"])
        total = math.sqrt(local_sq + remote_sq)
        coef = min(float(clip_val) / (total + 1e-6), 1.0)
        for p in params:
            p.grad.mul_(coef)
        self._clip_coef = coef

    def _log_transport(self) -> None:
        if not self.log_transport or self.split is None:
            return
        stats = self.split.client.stats
        now = stats.snapshot()
        delta = now - self._stats_before if self._stats_before is not None else now
        self._stats_before = now
        module = self.lightning_module
        module.log("split/rtt_ms", 1e3 * delta.mean_rtt_s, prog_bar=True, on_step=True, on_epoch=False)
        module.log("split/sent_MB", now.bytes_sent / 1e6, prog_bar=True, on_step=True, on_epoch=False)
        module.log("split/recv_MB", now.bytes_received / 1e6, prog_bar=True, on_step=True, on_epoch=False)
        module.log("split/compression", now.compression_ratio_sent, prog_bar=self.split.runner.adaptive is not None,
                   on_step=True, on_epoch=False)
        # Faults survived: connections resumed, and requests sent again (each ran once on the server).
        module.log("split/reconnects", float(now.reconnects), prog_bar=True, on_step=True,
                   on_epoch=False)
        module.log("split/resent", float(now.resent), on_step=True, on_epoch=False)
        module.log("split/replayed", float(now.replayed), on_step=True, on_epoch=False)  # after a server restart
        adaptive = self.split.runner.adaptive
        if adaptive is not None:  # the encodings chosen now, as bits per fp32 value (32, 16, 8.25)
            for kind, bits in adaptive.wire_bits.items():
                module.log(f"split/bits_{kind}", bits, prog_bar=True, on_step=True, on_epoch=False)

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        step = self.lightning_module.trainer.global_step
        tag = f"step{step}-{uuid.uuid4().hex[:12]}"
        saved = self._request(MessageType.STATE, {"op": "save", "tag": tag})
        checkpoint["lightning_split"] = {"tag": tag, "last_step": saved["last_step"], "node_id": self.node_id,
                                         "step_base": self._step_base}
        super().save_checkpoint(checkpoint, filepath, storage_options)
        # A checkpoint written over another (``last.ckpt``) no longer refers to the old state.
        replaced = self._tags.get(str(filepath))
        self._tags[str(filepath)] = tag
        if replaced is not None and replaced not in self._tags.values():
            self._request(MessageType.STATE, {"op": "delete", "tag": replaced})

    def remove_checkpoint(self, filepath: Any) -> None:
        """ModelCheckpoint dropped a checkpoint (``save_top_k``): the server forgets its state too."""
        super().remove_checkpoint(filepath)
        tag = self._tags.pop(str(filepath), None)
        if tag is not None:
            self._request(MessageType.STATE, {"op": "delete", "tag": tag})

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)
        record = checkpoint.get("lightning_split")
        if record is not None:
            loaded = self._request(MessageType.STATE, {"op": "load", "tag": record["tag"]})
            # Both sides roll back to the checkpoint: the server's step counter is the saved one,
            # and this fit's steps continue from the checkpoint's global step with the same numbers.
            base = record.get("step_base")
            if base is None:  # a checkpoint from before step_base was recorded
                base = int(loaded["last_step"]) + 1 - int(checkpoint.get("global_step", 0))
            self._step_base = int(base)
            self._next_step = int(loaded["last_step"]) + 1
            self._committed_step = int(loaded["last_step"])


def register() -> None:
    """Make ``Trainer(strategy="split")`` resolve to SplitStrategy (connection from the environment)."""
    if "split" not in StrategyRegistry:
        StrategyRegistry.register("split", SplitStrategy, description="split learning over mutual-TLS gRPC")
