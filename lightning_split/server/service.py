"""The model owner's side: build the target model, split it, serve its segment to sessions.

``SplitService`` is the channel's SessionHandler. Per instruction (message type):

==============  ================================================================================
SPLIT           describe the split: model config, split, the client part's fingerprint and size
LOAD            ship the client's part: safetensors bytes (a uint8 tensor) and their sha256
FORWARD         train: run the segment keeping the graph for the micro-batch's BACKWARD
BACKWARD        output gradients in, input gradient out
OPTIMIZER_STEP  ``op="step"`` steps the session's optimizer once per step number; ``"grad_norm"``
INFER           model inference and result output: no autograd state; KV cache when asked
CACHE           KV cache control: ``reset``, ``reorder`` (beam search), ``info`` (``held``: the session's bytes)
STATE           ``save`` / ``load`` / ``delete`` the session's server state under a tag, on the server's disk
==============  ================================================================================

Every request is checked before it is served (``checks.py``): indices in range on the host (a
device-side assert would end the process for every tenant), NaN and infinities refused (unless
``allow_nonfinite``), step numbers an int64 can answer. What a session holds between requests is
charged to its node's memory budget (``session.account``, ``session_memory.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

from lightning_split.channel import HandlerError, Session
from lightning_split.channel.budget import BudgetExceeded
from lightning_split.server.activity import Activity
from lightning_split.server.batching import Batcher
from lightning_split.server.checks import CacheError, SegmentError, check_request, step_number
from lightning_split.server.durable import DurableSessions
from lightning_split.server.fast_decode import PROMPT_GRAPH_TOKENS
from lightning_split.server.kv_cache import MAX_CACHE_BYTES
from lightning_split.server.placement import Replica, Replicas, as_devices, replicate, spread
from lightning_split.server.segment_state import MAX_GRAPHS, SessionSegment
from lightning_split.server.state_store import StateDamaged, StateStore
from lightning_split.server.tail import TAIL_MODES, check_tail
from lightning_split.split.block_args import from_neutral
from lightning_split.split.build import ModelSource, build_model, describe_config
from lightning_split.split.shipping import fingerprint, pack_part
from lightning_split.split.spec import SplitSpec
from lightning_split.split.surgery import cut_model
from lightning_split.wire import Message, MessageType
from lightning_split.wire.error_feedback import StepFeedback

log = logging.getLogger(__name__)

# What Python raises on a peer's value of the wrong kind deep in option parsing: a tensor where a
# number goes ("Boolean value of Tensor ... is ambiguous" is a RuntimeError), infinity where an
# int goes (OverflowError), a dict where a name goes (TypeError: unhashable).
HOSTILE_VALUE_ERRORS = (TypeError, ValueError, KeyError, AttributeError, RuntimeError, OverflowError)


class SplitService:
    """Holds the target model's segment and one SessionSegment per client session."""

    typed_bodies = True  # each instruction's body is its typed message in split.proto

    def __init__(
        self,
        source: ModelSource,
        spec: SplitSpec,
        device: str | torch.device = "cpu",
        device_map: dict[int, str] | None = None,
        devices: Sequence[int | str] | None = None,
        placement: str = "spread",
        tail_modes: tuple[str, ...] = TAIL_MODES,
        state_dir: str | Path | None = None,
        max_cache_tokens: int = 4096,
        max_graphs: int = MAX_GRAPHS,
        fast_decode: bool | None = None,
        prompt_graph_tokens: int = PROMPT_GRAPH_TOKENS,
        train_graphs: bool = True,
        max_cache_bytes: int = MAX_CACHE_BYTES,
        allow_nonfinite: bool = False,
        persist_sessions_s: float | None = None,
        batch_window_ms: float | None = None,
        max_batch: int = 64,
    ) -> None:
        self.source = source
        if devices is not None and device_map:
            raise ValueError("give devices (the segment spread evenly) or device_map (by hand), not both")
        if placement not in ("spread", "replicate"):
            raise ValueError(f"placement: 'spread' or 'replicate', not {placement!r}")
        if devices is not None and len(devices) == 1:
            device, devices = as_devices(devices)[0], None
        # A segment spread over devices is built in host memory first: it may not fit on one.
        model = build_model(source, device="cpu" if devices or device_map else device)
        self.hf_config = getattr(model, "config", None)
        self.split = spec.resolve(model)
        cut = cut_model(model, self.split)
        self.segment = cut.segment
        self.block_signature = cut.proxy.signature  # its first block's parameters (cut_model)
        segments = [self.segment]
        if devices and placement == "replicate":  # a whole copy per device (placement.py)
            segments = replicate(self.segment, devices)
            self.segment = segments[0]
        elif devices:  # spread evenly over several devices
            spread(self.segment, devices)
        elif device_map:  # spread by hand; blocks before the first key on ``device``
            self.segment.place({0: device, **{int(k): v for k, v in device_map.items()}})
        for segment in segments:  # the model owner's: sessions train copies or adapters, never it
            segment.requires_grad_(False)
            segment.eval()
        self.client_weights, self.client_sha256 = pack_part(model)
        self.client_fingerprint = fingerprint(model)
        del model  # the client's part lives on as shipped bytes only
        self.spec = spec
        self.tail_modes = tuple(tail_modes)
        self.store = StateStore(state_dir) if state_dir else None
        # Trainable sessions kept on disk, to come back after a restart (durable.py); None: not kept.
        self.durable = (DurableSessions(self.store, persist_sessions_s)
                        if self.store is not None and persist_sessions_s is not None else None)
        self.max_cache_tokens = max_cache_tokens  # per sequence
        self.max_cache_bytes = int(max_cache_bytes)  # per session, its whole batch (0: no limit)
        self.max_graphs = max_graphs
        # NaN and infinities in activations, gradients and step options are refused by default:
        # one would spread through every weight a trainable tail updates with it.
        self.allow_nonfinite = bool(allow_nonfinite)
        # Generation's decode steps on a static KV cache, replayed as CUDA graphs on a GPU
        # (fast_decode.py); None: where the segment is on a GPU; off: Hugging Face's DynamicCache
        # and eager blocks for every step.
        self.fast_decode = fast_decode
        # Prompts up to this many tokens (batch x length) replay CUDA graphs once their shape
        # recurs; each captured shape holds a memory pool of its own. 0: prompts always run eagerly.
        self.prompt_graph_tokens = int(prompt_graph_tokens)
        # Fused training micro-batches (the loss the only result) replay CUDA graphs once their
        # shape recurs (train_graphs.py); off: they always run eagerly.
        self.train_graphs = bool(train_graphs)
        # INFER steps of frozen-tail sessions (decode steps, stateless inference) that arrive within
        # batch_window_ms of each other run as one forward (batching.py). None: on where the segment
        # is on a GPU (there one token leaves the chip idle); 0: off.
        if batch_window_ms is None:
            batch_window_ms = 2.0 if next(self.segment.parameters()).device.type == "cuda" else 0.0
        self.replicas = Replicas([
            Replica(segment, Batcher(segment, next(segment.parameters()).device, batch_window_ms / 1000, max_batch)
                    if batch_window_ms > 0 else None)
            for segment in segments])
        self.activity = Activity()  # steps and tokens, for the operator's status line (activity.py)
        self.description = {
            "model": describe_config(source),
            "split": spec.to_dict(),
            "resolved": self.split.to_dict(),
            "fingerprint": self.client_fingerprint,
            "weights_sha256": self.client_sha256,
            "weights_bytes": len(self.client_weights),
            "tail_modes": list(self.tail_modes),
        }

    # -- SessionHandler -----------------------------------------------------------------------

    @property
    def batcher(self) -> Batcher | None:
        """The first copy's batcher (the only one unless the segment is replicated)."""
        return self.replicas.all[0].batcher

    def open_session(self, session: Session, hello: dict[str, Any]) -> dict[str, Any]:
        claimed = hello.get("fingerprint")
        if claimed is not None and not isinstance(claimed, str):
            raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT, "bad HANDSHAKE: fingerprint must be a string")
        if claimed and claimed != self.client_fingerprint:
            raise HandlerError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "architecture mismatch: the client's part (names, shapes, dtypes) differs from the "
                f"server's split (client {str(claimed)[:12]}..., server {self.client_fingerprint[:12]}...)",
            )
        try:
            tail = check_tail(hello.get("tail"))
            if tail.get("mode", "frozen") not in self.tail_modes:
                raise HandlerError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"tail mode {tail.get('mode')!r} is not offered by this server (offered: {self.tail_modes})",
                )
            index = self.replicas.take()
            replica = self.replicas.all[index]
            try:
                session.state["segment"] = SessionSegment(
                    replica.segment, tail, self.hf_config, self.max_graphs, self.max_cache_tokens,
                    self.fast_decode, self.prompt_graph_tokens, self.train_graphs,
                    max_cache_bytes=self.max_cache_bytes, account=session.account, session_id=session.id,
                    batcher=replica.batcher,
                )
            except BaseException:
                self.replicas.give_back(index)
                raise
            session.state["replica"] = index
        except SegmentError as e:
            raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        except torch.OutOfMemoryError as e:
            raise HandlerError(grpc.StatusCode.RESOURCE_EXHAUSTED, "no device memory for this session's tail") from e
        except HOSTILE_VALUE_ERRORS as e:  # tail options of the wrong kind (found by the fuzzer)
            raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"bad HANDSHAKE: tail options: {type(e).__name__}: {_first_line(e)}") from e
        segment = session.state["segment"]
        if self.durable is not None and not segment.trainable:  # its identity is all it has to keep
            self._durably(lambda: self.durable.save(session, segment), session)
        return {"split": self.description["resolved"], "fingerprint": self.client_fingerprint}

    def resume_session(self, session: Session, hello: dict[str, Any]) -> dict[str, Any]:
        # After a restart the client learns the step the server came back at: what it had in
        # flight is gone, and its next step must follow that one.
        restored = bool(session.state.pop("restored", False))
        segment = session.state["segment"]
        return {"split": self.description["resolved"], "fingerprint": self.client_fingerprint,
                "last_step": segment.last_step, "restored": restored, "trains": bool(segment.trainable)}

    def close_session(self, session: Session) -> None:
        segment = session.state.get("segment")
        if segment is not None and self.durable is not None:
            if session.suspended:  # the server stops: keep the session for its return
                self._durably(lambda: self.durable.save(session, segment), session)
            else:  # CLOSE or expiry: the session is over
                self._durably(lambda: self.durable.forget(session), session)
        if segment is not None:
            segment.close()  # graphs, caches and charges go now, not at a garbage collection
        if "replica" in session.state:
            self.replicas.give_back(session.state["replica"])
        session.state.clear()

    # -- sessions kept over a restart (durable.py) -----------------------------------------------

    def restored_sessions(self) -> list[dict[str, Any]]:
        """The sessions the last run of this server kept on disk (read by ChannelServer.start)."""
        found = []
        for node_id, tag in self.durable.records() if self.durable is not None else []:
            try:
                state = self.durable.load(node_id, tag)
                meta = state["session"]
                found.append({"id": meta["id"], "node_id": meta["node_id"], "fingerprint": meta["fingerprint"],
                              "hello": {"tail": meta["tail"], "fingerprint": meta["client_fingerprint"]},
                              "optimizer": meta.get("optimizer"), "state": state})
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("kept session %s of %s not restored: %s", tag, node_id, e)
        return found

    def reopen_session(self, session: Session, record: dict[str, Any]) -> None:
        """Build a kept session again: its tail as the hello asked, then its saved state."""
        self.open_session(session, record["hello"])
        segment: SessionSegment = session.state["segment"]
        if record.get("optimizer"):  # the client's optimizer, configured after the hello
            segment.configure_optimizer(dict(record["optimizer"]))
        segment.load_state_dict(record["state"])
        session.state["restored"] = True

    def _gradients_out(self, session: Session, request: Message, reply: dict[str, Any]) -> dict[str, Any]:
        """Input gradients that go back lossy carry the residual of their slot's last send
        (wire/error_feedback.py); a slot is the gradient's place among the step's replies."""
        cfg = session.reply_compression(request)
        if cfg.lossy == "none" or not any(k in reply for k in ("grad_input", "grad_extra")):
            return reply
        feedback: StepFeedback = session.state.setdefault("feedback", StepFeedback())
        slot = feedback.next_slot(request.step)
        if reply.get("grad_input") is not None:
            reply["grad_input"] = feedback.compensate((slot, "input"), reply["grad_input"], cfg)
        reply["grad_extra"] = [g if g is None else feedback.compensate((slot, j), g, cfg)
                               for j, g in enumerate(reply.get("grad_extra") or [])]
        if session.account is not None:
            try:
                session.account.set((session.id, "feedback"), feedback.nbytes, "error-feedback residuals")
            except BudgetExceeded:  # not worth a failed step: go on without feedback
                feedback.reset()
                session.account.set((session.id, "feedback"), 0, "error-feedback residuals")
        return reply

    def _stepped(self, session: Session, segment: SessionSegment) -> None:
        """A step was applied: keep the session on disk if it is due (before the step's reply)."""
        self.activity.stepped()
        if self.durable is not None:
            self._durably(lambda: self.durable.after_step(session, segment), session)

    def _durably(self, write: Any, session: Session) -> None:
        try:
            write()
        except (OSError, ValueError) as e:  # a full disk must not fail the step or the close
            log.error("could not keep session %s of %s on disk: %s", session.id[:8], session.node_id, e)

    def handle(self, session: Session, request: Message) -> Any:
        body = request.body if request.body is not None else {}
        if not isinstance(body, dict):
            raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT, "a request body must be a dict")
        segment: SessionSegment = session.state["segment"]
        try:
            if request.type in (MessageType.FORWARD, MessageType.INFER):
                # The block arguments by meaning, as keywords of this server's blocks (block_args.py).
                body = {**body, "args": (), "kwargs": from_neutral(self.block_signature, body.get("block"))}
                body.pop("block", None)
            check_request(request.type, body, request.step, self.allow_nonfinite)
            return self._dispatch(session, segment, request, body)
        except CacheError as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if "limit" in str(e) else grpc.StatusCode.FAILED_PRECONDITION
            raise HandlerError(code, str(e)) from e
        except (SegmentError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            # The request's fault: a value of the wrong kind where the segment needs another (an
            # AttributeError: a string where the KV cache goes); no optimizer step follows it.
            raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {_first_line(e)}") from e
        except torch.OutOfMemoryError as e:
            log.warning("out of device memory for %s of %s", MessageType.Name(request.type), session.node_id)
            raise HandlerError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               "the server's device memory cannot hold this request") from e
        except RuntimeError as e:
            if _device_fault(e):  # the device itself failed: the operator must know, the peer need not
                raise
            # The segment's own checks of what it was given (shapes, dtypes, masks that do not fit
            # the hidden state, a graph already backpropagated): the request's fault, and nothing
            # was stepped: an optimizer step only follows a request that ran.
            raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the segment cannot run on these inputs: {_first_line(e)}") from e

    def _dispatch(self, session: Session, segment: SessionSegment, request: Message, body: dict) -> Any:
        kind = request.type
        if kind == MessageType.FORWARD:
            return self._gradients_out(session, request, segment.forward(body, train=True, step=request.step))
        if kind == MessageType.BACKWARD:
            reply = self._gradients_out(session, request, segment.backward(body))
            if body.get("then_step") is not None:  # the step rode on the step's last backward
                then = dict(body["then_step"])
                reply["stepped"] = segment.step(step_number(then.pop("step")), then)["applied"]
                if reply["stepped"]:
                    self._stepped(session, segment)
            return reply
        if kind == MessageType.INFER:
            reply = segment.forward(body, train=False)
            self.activity.inferred(body)
            return reply
        if kind == MessageType.OPTIMIZER_STEP:
            if body.get("op") == "grad_norm":
                return segment.grad_sq_norm()
            if body.get("op") == "configure":
                return segment.configure_optimizer(dict(body["optimizer"]))
            reply = segment.step(step_number(request.step), body)
            if reply["applied"]:
                self._stepped(session, segment)
            return reply
        if kind == MessageType.CACHE:
            return segment.cache_control(body)
        if kind == MessageType.SPLIT:
            return dict(self.description)
        if kind == MessageType.LOAD:
            weights = torch.frombuffer(bytearray(self.client_weights), dtype=torch.uint8)
            return {"weights": weights, "sha256": self.client_sha256}
        if kind == MessageType.STATE:
            return self._state(session, segment, body)
        raise HandlerError(grpc.StatusCode.UNIMPLEMENTED, f"message type {kind} is not served")

    def _state(self, session: Session, segment: SessionSegment, body: dict) -> dict[str, Any]:
        if self.store is None:
            raise HandlerError(grpc.StatusCode.FAILED_PRECONDITION, "this server keeps no state (no state_dir)")
        tag = str(body.get("tag", ""))
        try:
            if body.get("op") == "save":
                self.store.save(session.node_id, tag, segment.state_dict())
                return {"tag": tag, "last_step": segment.last_step}
            if body.get("op") == "load":
                segment.load_state_dict(self.store.load(session.node_id, tag))
                if self.durable is not None and segment.trainable:  # a restart must not go back further
                    self._durably(lambda: self.durable.save(session, segment), session)
                return {"tag": tag, "last_step": segment.last_step}
            if body.get("op") == "delete":
                return {"tag": tag, "deleted": self.store.delete(session.node_id, tag)}
        except FileNotFoundError as e:
            raise HandlerError(grpc.StatusCode.NOT_FOUND, str(e)) from e
        except StateDamaged as e:  # the server's disk lost it, not the request's fault
            log.warning("%s (node %s)", e, session.node_id)
            raise HandlerError(grpc.StatusCode.DATA_LOSS, str(e)) from e
        except ValueError as e:
            raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        raise HandlerError(grpc.StatusCode.INVALID_ARGUMENT, "STATE op must be 'save', 'load' or 'delete'")


def _first_line(error: BaseException, limit: int = 300) -> str:
    """A short account of a refused request's fault for the peer (no traceback, no file names)."""
    text = str(error).strip().splitlines()
    return text[0][:limit] if text else type(error).__name__


def _device_fault(error: RuntimeError) -> bool:
    """A CUDA (or other accelerator) failure rather than the segment refusing its inputs."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(error, accelerator_error) or "CUDA error" in str(error) or "device-side assert" in str(error)
