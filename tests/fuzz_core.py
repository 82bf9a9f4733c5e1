"""Mutation fuzzer for the split server: a corpus of valid messages, mutators and a case runner.

Shared by ``tests/test_fuzz.py`` (a few thousand cases against an in-process server) and
``benchmarks/fuzz.py`` (100,000 cases and more against a server in its own process).

Corpus: what a real client sends. :func:`record_scenarios` drives a real ``open_split`` client
(trainable tail) through every instruction (SPLIT, LOAD, FORWARD/BACKWARD, fused loss steps,
INFER with a KV cache incl. beam search reorders and top-k decoding, CACHE reorder/info/reset,
OPTIMIZER_STEP grad_norm/configure/step, STATE save/load/delete) and keeps each group of requests
as a :class:`Scenario`; :func:`hello_scenarios` adds HANDSHAKE hellos as ``build_hello`` makes
them (and a bond join). Every recorded request was answered OK when it was recorded.

Case: a scenario's messages, re-addressed to the fuzzing stream's session (fresh micro-batch ids
and step numbers), then mutated at one or more layers:

* body (before encoding): NaN/Inf and out-of-range integers in tensors, other dtypes and shapes,
  values of another type, extreme ints, dropped/added keys, markers, nesting, many values;
* payload (PayloadMeta and the buffer region): every TensorMeta field, Value kinds, ValueMap
  mismatches, deep nesting, too many values, long strings, bit flips and NaN/Inf in tensor data,
  lying blosc2 chunk headers;
* frame fields: header type/version/node/code/session/step (incl. >= 2**63)/sequence, fragment
  index/count, payload_bytes/meta_bytes lies, CRC, data truncation;
* frame sequence: dropped, duplicated, swapped, truncated (a partial message), interleaved frames;
* serialized bytes: bit flips, truncation, garbage, a second data field, unknown fields, groups.

Running a case (:class:`Fuzzer`): each worker keeps a handshaken session and one stream; a case's
frames go out followed by a *probe* (a small valid CACHE info request): the server answers in
order, so the probe's reply closes the case (every reply before it is the case's). A case that
leaves a partial message (predicted by a local ``Reassembler``), and a share of the others, ends
by half-closing the request stream instead: the server must then end the stream. A case that gets
neither its probe's reply nor the stream's end within the deadline is a *hang*. A stream the
server aborted is replaced by a new one that resumes the session.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import logging
import math
import queue
import random
import re
import struct
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from lightning_split._proto import split_pb2 as pb
from lightning_split.channel import ChannelConfig, TLSFiles
from lightning_split.channel.framing import split_frame
from lightning_split.channel.handshake import build_hello
from lightning_split.channel.server import EXCHANGE_METHOD
from lightning_split.wire import CompressionConfig, Message, Reassembler, WireError, encode_message
from lightning_split.wire.markers import KV_CACHE, GradInputRef, KvCacheRef

NODE = "fuzz"  # the recording client's node id (its certificate's CN)
OTHER_NODE = "fuzz-other"  # a node id no certificate has, to name in headers


def worker_node(index: int) -> str:
    """Worker ``index``'s node id: each worker is a tenant of its own (per-node caps, its own sessions)."""
    return f"fuzz-w{index}"


def client_ids(workers: int) -> list[str]:
    """The client certificates a run needs: the recording client's and one per worker."""
    return [NODE] + [worker_node(i) for i in range(workers)]
TYPES = {v: k for k, v in pb.MessageType.items()}
STATUS = {c.value[0]: c for c in grpc.StatusCode}
BAD_CODES = ("INTERNAL", "UNKNOWN")  # an unhandled exception on the server
MAX_STATUS_DETAILS = 4096  # a longer status message echoes the peer's input back
GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                ("grpc.use_local_subchannel_pool", 1)]

# -- the servers under test ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerKind:
    """One SplitService configuration the fuzzer attacks."""

    spec: dict[str, Any]
    service: dict[str, Any]
    channel: dict[str, Any]


KINDS: dict[str, ServerKind] = {
    # The deployment defaults: TLS, no CRCs on requests, DynamicCache generation on a CPU.
    "two_part": ServerKind(dict(cut=1, shape="two_part"), {}, {}),
    # A U-shape whose server verifies CRCs and runs the static-cache decoder (fast_decode) on a CPU.
    "u_shape": ServerKind(dict(cut=1, shape="u_shape"), dict(fast_decode=True), dict(checksum=True)),
}
SESSION_TTL_S = 120.0  # sessions a fuzz case leaks (a hello it could not close) expire


def model_source() -> Any:
    """The tiny GPT-2 the split tests use (4 blocks, 64 wide, vocabulary 128)."""
    from tests.split_cases import GPT2

    return GPT2


def make_server(kind: str, pki: str | Path, state_dir: str | Path, **channel: Any) -> Any:
    """A (not yet started) mutual-TLS ChannelServer on 127.0.0.1:0 serving ``kind``'s SplitService."""
    from lightning_split.channel import ChannelServer, server_tls
    from lightning_split.server.service import SplitService
    from lightning_split.split.spec import SplitSpec

    k = KINDS[kind]
    service = SplitService(model_source(), SplitSpec(**k.spec), state_dir=Path(state_dir) / kind, **k.service)
    config = ChannelConfig(session_ttl_s=SESSION_TTL_S, **{**k.channel, **channel})
    return ChannelServer(service, "127.0.0.1:0", tls=server_tls(pki), config=config)


# -- corpus ----------------------------------------------------------------------------------------


@dataclass
class Template:
    """One request as a real client sent it (the header's session and sequence are filled per case)."""

    type: int
    body: Any
    step: int = 0


@dataclass
class Scenario:
    name: str
    messages: list[Template]
    weight: float = 1.0
    where: str = "session"  # "session": after a handshake; "hello": first on a new stream; "resume"


@dataclass
class Corpus:
    kind: str
    scenarios: list[Scenario]
    hello_extra: dict[str, Any]  # what open_split puts in its hello (tail, fingerprint)

    def pick(self, rng: random.Random, where: str) -> Scenario:
        pool = [s for s in self.scenarios if s.where == where]
        return rng.choices(pool, weights=[s.weight for s in pool])[0]

    def types(self) -> Counter:
        return Counter(TYPES[m.type] for s in self.scenarios for m in s.messages)


class _Recorder:
    """Records every request a ChannelClient submits, grouped into named scenarios."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.current: list[Template] | None = None
        self.scenarios: list[Scenario] = []
        original = client.submit

        def submit(type_: int, body: Any = None, step: int = 0, timeout: float | None = None) -> Any:
            future = original(type_, body, step, timeout)
            if self.current is not None:
                self.current.append(Template(type_, body, step))
            return future

        client.submit = submit

    @contextlib.contextmanager
    def scenario(self, name: str, weight: float = 1.0) -> Iterator[None]:
        self.current = []
        try:
            yield
        finally:
            assert self.current, f"scenario {name} sent nothing"
            self.scenarios.append(Scenario(name, self.current, weight))
            self.current = None


def record_scenarios(address: str, tls: TLSFiles, kind: str) -> Corpus:
    """Drive a real client through every instruction ``kind``'s server serves; returns the corpus.

    Every request is answered OK (``request`` raises otherwise), so the corpus is valid.
    """
    from lightning_split.split.connect import open_split
    from lightning_split.split.spec import SplitSpec
    from lightning_split.wire import MessageType as T

    source, spec = model_source(), SplitSpec(**KINDS[kind].spec)
    tail = {"mode": "trainable", "optimizer": {"name": "SGD", "lr": 1e-3}}
    remote = open_split(address, NODE, tls, source=source, spec=spec, tail=tail,
                        config=ChannelConfig(connections=1))
    try:
        client, model, runner = remote.client, remote.model, remote.runner
        rec = _Recorder(client)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 128, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # left padding: the mask reaches the server's blocks
        two_part = spec.shape == "two_part"
        with rec.scenario("split", 0.5):
            client.request(T.SPLIT, {})
        with rec.scenario("load", 0.2):
            client.request(T.LOAD, {})
        model.train()
        with rec.scenario("train_step", 3.0):
            runner.step = 1
            runner.pending_step = {"lr": 1e-3, "step": 1}  # rides on the last BACKWARD
            if two_part:  # fused: the loss alone, FORWARD with backward, one BACKWARD with the scale
                model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            else:
                out = model(input_ids=ids, attention_mask=mask).logits
                (out * torch.randn(out.shape, generator=g)).sum().backward()
            runner.confirm()
        if two_part:
            with rec.scenario("train_logits", 2.0):  # FORWARD with labels and logits, BACKWARD with both
                out = model(input_ids=ids, attention_mask=mask, labels=ids, result="logits")
                ((out.logits * torch.randn(out.logits.shape, generator=g)).sum() + out.loss).backward()
            with rec.scenario("forward_hidden", 1.0):
                model(input_ids=ids, result="hidden_states").hidden_states.sum().backward()
        model.eval()
        gen = dict(attention_mask=mask, pad_token_id=0, do_sample=False)
        with torch.no_grad():
            with rec.scenario("infer_greedy", 3.0):
                model.generate(ids, max_new_tokens=3, **gen)
            with rec.scenario("infer_beam", 2.0):
                model.generate(ids, max_new_tokens=3, num_beams=2, **gen)
            if two_part:
                with rec.scenario("infer_topk", 1.5):
                    remote.proxy.decode_top_k = 4
                    model.generate(ids, max_new_tokens=2, **gen)
                    remote.proxy.decode_top_k = 0
            with rec.scenario("infer_nocache", 1.5):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            with rec.scenario("cache_ops", 2.0):
                model.generate(ids, max_new_tokens=1, **gen)  # the prompt: the server holds a cache
                client.request(T.CACHE, {"op": "reorder", "beam_idx": torch.tensor([1, 0])})
                client.request(T.CACHE, {"op": "info"})
                client.request(T.CACHE, {"op": "reset"})
        with rec.scenario("optimizer", 2.0):
            client.request(T.OPTIMIZER_STEP, {"op": "grad_norm"})
            client.request(T.OPTIMIZER_STEP, {"op": "configure", "optimizer": {
                "name": "AdamW", "lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.01}})
            client.request(T.OPTIMIZER_STEP, {"lr": 1e-3, "clip_coef": 0.5}, step=2)
        with rec.scenario("state", 1.0):
            client.request(T.STATE, {"op": "save", "tag": "fuzz-state"})
            client.request(T.STATE, {"op": "load", "tag": "fuzz-state"})
            client.request(T.STATE, {"op": "delete", "tag": "fuzz-state"})
        scenarios = rec.scenarios
        hello_extra = dict(client.hello_extra)
    finally:
        remote.close()
    scenarios.append(Scenario("close", [Template(pb.CLOSE, None)], 0.3))
    for s in list(scenarios):  # the same requests as the first message of a new stream (a reconnect)
        if s.name not in ("close", "load"):
            scenarios.append(Scenario(s.name, s.messages, s.weight, where="resume"))
    scenarios += hello_scenarios(hello_extra)
    return Corpus(kind, scenarios, hello_extra)


def hello_scenarios(hello_extra: dict[str, Any]) -> list[Scenario]:
    """HANDSHAKE hellos as ``build_hello`` makes them: tails frozen/trainable/lora, compression
    requests, and a bond join naming an unknown token."""
    out = []
    tails = {
        "frozen": {"mode": "frozen"},
        "trainable": {"mode": "trainable", "optimizer": {"name": "Adam", "lr": 1e-4}},
        "lora": {"mode": "lora", "lora": {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}},
    }
    for name, tail in tails.items():
        for comp in ("none", "blosc2", "int8"):
            c2s = CompressionConfig(lossless="blosc2") if comp == "blosc2" else \
                CompressionConfig(lossy="int8") if comp == "int8" else CompressionConfig()
            cfg = ChannelConfig(connections=1, client_to_server=c2s, server_to_client=c2s)
            hello = build_hello(cfg, NODE, {**hello_extra, "tail": tail}, checksum=comp == "int8")
            out.append(Scenario(f"{name}:{comp}", [Template(pb.HANDSHAKE, hello)], 1.0, where="hello"))
    bonded = build_hello(ChannelConfig(connections=2), NODE, dict(hello_extra))
    out.append(Scenario("bonded", [Template(pb.HANDSHAKE, bonded)], 0.5, where="hello"))
    join = {"join": "00" * 16, "index": 1}
    out.append(Scenario("join", [Template(pb.HANDSHAKE, join)], 0.5, where="hello"))
    return out


def build_corpus(address: str, tls: TLSFiles, kind: str) -> Corpus:
    """The corpus for ``kind``'s server at ``address`` (recorded from a real client)."""
    return record_scenarios(address, tls, kind)


# -- body mutators (Python values, before encoding) --------------------------------------------------

WIRE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
               torch.int16, torch.int8, torch.uint8, torch.bool]
BIG_INTS = [-1, -100, 0, 1, 127, 128, 129, 255, 4095, 4096, 4097, 10**6, 2**31 - 1, -(2**31), 2**32,
            2**62, 2**63 - 1, -(2**63)]
KEYS = ["hidden", "block", "extra", "rotary", "kv_cache", "cache_position", "training", "id", "input_grad",
        "fused", "call", "weight", "scale",
        "grads", "output", "logits", "loss", "then_step", "step", "lr", "clip_coef", "op", "optimizer",
        "name", "betas", "momentum", "tag", "beam_idx", "cache", "past", "new", "reorder", "result",
        "labels", "top_k", "logits_to_keep", "keep_last", "autocast", "grad_inputs", "attention_mask",
        "position_ids", "use_cache", "join", "index", "session_id", "capabilities", "chunk_size",
        "checksum", "connections", "lossless", "lossy", "compression", "client_to_server",
        "server_to_client", "codec", "level", "filter", "nthreads", "int8_block_size", "min_bytes",
        "protocol_version", "node_id", "tail", "mode", "lora", "target_modules", "r", "alpha", "dropout",
        "fingerprint", "train_graphs", "fast_decode", "__class__", "", "\u00fc\u00df"]
STRINGS = ["", "x", "<kv-cache>", "<grad-input:0>", "<grad-input:1>", "<grad-input:99>", "<grad-input:-1>",
           "<grad-input:>", "<grad-input:x>", "<grad-input:99999999999999999999>", "logits", "loss",
           "topk", "hidden_states", "evil", "reset", "reorder", "info", "save", "load", "delete",
           "grad_norm", "configure", "step", "bfloat16", "float16", "float32", "float64", "int8",
           "frozen", "trainable", "lora", "../../etc/passwd", "a" * 200, "NaN", "SGD", "Evil",
           "none", "blosc2", "ZSTD", "EVIL", "\u00fc\u00df\u2603", "\x00", "c_attn", "nonexistent", "L" * 20_000]


# The places the server fills (Value.marker): the cache, grad inputs in and out of range.
MARKERS = [KV_CACHE, GradInputRef(0), GradInputRef(1), GradInputRef(99), GradInputRef(2**32 - 1)]


def _copy_tree(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _copy_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy_tree(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_copy_tree(v) for v in x)
    return x


def _nodes(x: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    yield path, x
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _nodes(v, (*path, i))


def _replace(x: Any, path: tuple, new: Any, delete: bool = False) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(x, dict):
        out = dict(x)
        if delete and not rest:
            out.pop(head, None)
        elif not rest:
            out[head] = new
        else:
            out[head] = _replace(x[head], rest, new, delete)
        return out
    items = list(x)
    if delete and not rest:
        del items[head]
    else:
        items[head] = _replace(items[head], rest, new, delete)
    return tuple(items) if isinstance(x, tuple) else items


def _path(path: tuple) -> str:
    return "body" + "".join(f"[{p!r}]" for p in path)


MAX_FUZZ_ELEMENTS = 1 << 20  # tensors the fuzzer builds stay small (its own memory, the case's size)


def _small_shape(rng: random.Random, dims: list[int], rank: int) -> list[int]:
    shape: list[int] = []
    for _ in range(rng.randint(0, rank)):
        d = rng.choice(dims)
        if math.prod(shape) * d > MAX_FUZZ_ELEMENTS:
            break
        shape.append(d)
    return shape


def _random_tensor(rng: random.Random) -> torch.Tensor:
    shape = _small_shape(rng, [0, 1, 2, 3, 9, 64], 4)
    dtype = rng.choice(WIRE_DTYPES)
    g = torch.Generator().manual_seed(rng.getrandbits(32))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    return torch.randint(-3, 200, shape, generator=g).to(dtype)


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.randrange(14 if depth < 2 else 10)
    if r == 0:
        return None
    if r == 1:
        return rng.choice([True, False])
    if r == 2:
        return rng.choice(BIG_INTS)
    if r == 3:
        return rng.choice([0.0, -1.0, 0.5, 1e308, -1e-308, math.nan, math.inf, -math.inf])
    if r == 4:
        return rng.choice(STRINGS)
    if r == 5:
        return rng.choice(STRINGS + MARKERS)
    if r == 6:
        return rng.choice([b"", b"\x00\xff", bytes(1000)])
    if r in (7, 8, 9):
        return _random_tensor(rng)
    if r == 10:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if r == 11:
        return tuple(_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3)))
    return {rng.choice(KEYS): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _pick(rng: random.Random, body: Any, want: Callable[[Any], bool]) -> tuple[tuple, Any] | None:
    found = [(p, v) for p, v in _nodes(body) if want(v)]
    return rng.choice(found) if found else None


def _fill(t: torch.Tensor, rng: random.Random, values: list[Any]) -> tuple[torch.Tensor, str]:
    t = t.clone()
    flat = t.view(-1)
    if flat.numel() == 0:
        return t, "empty"
    if rng.random() < 0.2:
        v = rng.choice(values)
        flat.fill_(v)
        return t, f"all={v}"
    idx = [rng.randrange(flat.numel()) for _ in range(rng.randint(1, 4))]
    v = rng.choice(values)
    for i in idx:
        flat[i] = v
    return t, f"{len(idx)} element(s)={v}"


def bm_nonfinite(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    hit = _pick(rng, body, lambda v: isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 0)
    if hit is None:
        return None
    t, what = _fill(hit[1], rng, [math.nan, math.inf, -math.inf, 1e30 if hit[1].dtype != torch.float16 else 6e4])
    return _replace(body, hit[0], t), f"{_path(hit[0])}: {what}"


def bm_int_range(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    hit = _pick(rng, body, lambda v: isinstance(v, torch.Tensor) and not v.is_floating_point()
                and v.dtype != torch.bool and v.numel() > 0)
    if hit is None:
        return None
    info = torch.iinfo(hit[1].dtype)
    values = [v for v in BIG_INTS if info.min <= v <= info.max] + [info.min, info.max]
    t, what = _fill(hit[1], rng, values)
    return _replace(body, hit[0], t), f"{_path(hit[0])}: {what}"


def bm_dtype(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    hit = _pick(rng, body, lambda v: isinstance(v, torch.Tensor))
    if hit is None:
        return None
    dtype = rng.choice([d for d in WIRE_DTYPES if d != hit[1].dtype])
    return _replace(body, hit[0], hit[1].to(dtype)), f"{_path(hit[0])}: dtype {hit[1].dtype} -> {dtype}"


def bm_shape(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    hit = _pick(rng, body, lambda v: isinstance(v, torch.Tensor))
    if hit is None:
        return None
    t = hit[1]
    r = rng.randrange(7)
    if r == 0:
        new = t.unsqueeze(rng.randint(0, t.dim()))
    elif r == 1:
        new = t.reshape(-1)
    elif r == 2 and t.dim() > 0:
        d = rng.randrange(t.dim())
        new = t.narrow(d, 0, 0)
    elif r == 3:
        new = t.reshape(-1)[:1].reshape(()) if t.numel() else torch.zeros((), dtype=t.dtype)
    elif r == 4 and t.dim() > 0 and t.numel() and t.numel() * 4 < 400_000:
        d = rng.randrange(t.dim())
        new = torch.cat([t] * rng.randint(2, 4), dim=d)
    elif r == 5 and t.dim() > 0 and t.shape[-1] > 1:
        new = t[..., : t.shape[-1] - 1]
    else:
        shape = _small_shape(rng, [0, 1, 2, 3, 9, 64, 65], 5)
        new = torch.zeros(shape, dtype=t.dtype)
    return _replace(body, hit[0], new.contiguous()), f"{_path(hit[0])}: shape {tuple(t.shape)} -> {tuple(new.shape)}"


def bm_retype(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    nodes = list(_nodes(body))
    path, old = rng.choice(nodes)
    new = _random_value(rng)
    return _replace(body, path, new), f"{_path(path)}: {type(old).__name__} -> {_short(new)}"


def bm_int(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    hit = _pick(rng, body, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    if hit is None:
        return None
    new = rng.choice(BIG_INTS + [math.nan, math.inf, -0.0, 1e300])
    return _replace(body, hit[0], new), f"{_path(hit[0])}: {hit[1]!r} -> {new!r}"


def bm_drop_key(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    keys = [(p, k) for p, v in _nodes(body) if isinstance(v, dict) for k in v]
    if not keys:
        return None
    p, k = rng.choice(keys)
    return _replace(body, (*p, k), None, delete=True), f"{_path(p)}: drop key {k!r}"


def bm_add_key(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    hit = _pick(rng, body, lambda v: isinstance(v, dict))
    if hit is None:
        return None
    k, v = rng.choice(KEYS), _random_value(rng)
    return _replace(body, (*hit[0], k), v), f"{_path(hit[0])}: set {k!r} = {_short(v)}"


def bm_string(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    hit = _pick(rng, body, lambda v: isinstance(v, (str, KvCacheRef, GradInputRef)))
    if hit is None:
        return None
    new = rng.choice(STRINGS + MARKERS)
    return _replace(body, hit[0], new), f"{_path(hit[0])}: {hit[1]!r} -> {new!r}"


def bm_root(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    new = rng.choice([None, [], (), 0, "x", b"", torch.zeros(3), [body], {"body": body}, True])
    return new, f"body -> {_short(new)}"


def bm_nest(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    path, old = rng.choice(list(_nodes(body)))
    depth = rng.randint(1, 28)
    new = old
    for _ in range(depth):
        new = [new] if rng.random() < 0.5 else {"k": new}
    return _replace(body, path, new), f"{_path(path)}: nested {depth} deep"


def bm_many(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    path, _ = rng.choice(list(_nodes(body)))
    n = rng.choice([1000, 20_000, 99_000])
    new = [rng.choice([0, None, "", 1.0]) for _ in range(n)] if rng.random() < 0.7 else \
        {f"k{i}": i for i in range(min(n, 20_000))}
    return _replace(body, path, new), f"{_path(path)}: {type(new).__name__} of {len(new)} values"


def bm_swap(rng: random.Random, body: Any) -> tuple[Any, str] | None:
    tensors = [(p, v) for p, v in _nodes(body) if isinstance(v, torch.Tensor)]
    if len(tensors) < 2:
        return None
    (p1, a), (p2, b) = rng.sample(tensors, 2)
    return _replace(_replace(body, p1, b), p2, a), f"swap {_path(p1)} <-> {_path(p2)}"


BODY_MUTATORS: list[tuple[Callable, float]] = [
    (bm_nonfinite, 3), (bm_int_range, 3), (bm_dtype, 2), (bm_shape, 3), (bm_retype, 3), (bm_int, 2),
    (bm_drop_key, 2), (bm_add_key, 2), (bm_string, 1.5), (bm_root, 0.3), (bm_nest, 0.5), (bm_many, 0.3),
    (bm_swap, 1),
]


def mutate_body(rng: random.Random, body: Any, rounds: int = 1) -> tuple[Any, list[str]]:
    """``body`` (a copy, never modified in place) with ``rounds`` body mutations; their descriptions."""
    ops: list[str] = []
    body = _copy_tree(body)
    for _ in range(rounds * 4):
        if len(ops) >= rounds:
            break
        fn = rng.choices([m for m, _ in BODY_MUTATORS], weights=[w for _, w in BODY_MUTATORS])[0]
        out = fn(rng, body)
        if out is not None:
            body, what = out
            ops.append(f"{fn.__name__}: {what}")
    return body, ops


def _short(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}"
    s = repr(v)
    return s if len(s) < 60 else s[:57] + "..."


# -- frames -----------------------------------------------------------------------------------------


def fragment(header: pb.Header, payload: bytes, meta_bytes: int, chunk: int) -> list[pb.Frame]:
    """``payload`` cut into Frames of ``chunk`` bytes, every field consistent, CRC-32s set."""
    chunk = max(1, chunk)
    count = max(1, -(-len(payload) // chunk))
    return [pb.Frame(header=header, fragment_index=i, fragment_count=count, payload_bytes=len(payload),
                     meta_bytes=meta_bytes, crc32=zlib.crc32(payload[i * chunk:(i + 1) * chunk]),
                     data=payload[i * chunk:(i + 1) * chunk]) for i in range(count)]


def encode_frames_of(msg: Message, compression: CompressionConfig | None, chunk: int) -> list[pb.Frame]:
    msg.typed = True  # every target is a split server: instructions take their typed bodies
    enc = encode_message(msg, compression, chunk_size=1 << 30, checksum=True)
    payload = bytes(enc.meta) + b"".join(bytes(b) for b in enc.buffers)
    return fragment(enc.header, payload, enc.meta_bytes, chunk)


def _groups(frames: list[pb.Frame]) -> list[list[int]]:
    """Indices of the frames of each message (a new one at each fragment_index 0)."""
    groups: list[list[int]] = []
    for i, f in enumerate(frames):
        if f.fragment_index == 0 or not groups:
            groups.append([])
        groups[-1].append(i)
    return groups


# payload mutators: (rng, meta: pb.PayloadMeta | None, region: bytearray) -> description | None


def _submessages(m: Any) -> Iterator[Any]:
    """Every message of a body, depth first: its typed fields, map values and repeated items, and
    the Values and TensorMetas of its untyped trees."""
    yield m
    for f, value in m.ListFields():
        if f.message_type is None:
            continue
        if f.message_type.GetOptions().map_entry:
            items = value.values() if f.message_type.fields_by_name["value"].message_type else []
        else:
            items = value if f.is_repeated else [value]
        for item in items:
            yield from _submessages(item)


def _body_messages(meta: pb.PayloadMeta | None, kind: type) -> list[Any]:
    """The body's messages of one kind (pb.Value, pb.TensorMeta), whichever PayloadMeta.body case it is."""
    case = meta.WhichOneof("body") if meta is not None else None
    return [m for m in _submessages(getattr(meta, case)) if isinstance(m, kind)] if case else []


def _body_values(meta: pb.PayloadMeta | None) -> list[pb.Value]:
    return _body_messages(meta, pb.Value)


def _tensor_metas(meta: pb.PayloadMeta | None) -> list[pb.TensorMeta]:
    return _body_messages(meta, pb.TensorMeta)


TM_VALUES: dict[str, list[Any]] = {
    "dtype": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 77, 2**31 - 1],
    "encoding": [0, 1, 2, 3, 4, 9, 2**31 - 1],
    "block_size": [0, 1, 3, 128, 2**31, 2**32 - 1],
    "offset": [0, 1, 63, 64, 4096, 2**31, 2**63, 2**64 - 1],
    "nbytes": [0, 1, 4, 63, 64, 4096, 2**31, 2**63, 2**64 - 1],
}


def pm_tensor_field(rng: random.Random, meta: pb.PayloadMeta | None, region: bytearray) -> str | None:
    tms = _tensor_metas(meta)
    if not tms:
        return None
    tm = rng.choice(tms)
    name = rng.choice(["dtype", "shape", "shape", "shape", "encoding", "block_size", "blosc2", "offset",
                       "offset", "nbytes", "nbytes"])
    if name == "shape":
        r = rng.randrange(6)
        if r == 0:
            shape = [rng.choice([-1, -(2**63), 2**31, 2**62, 2**63 - 1]) for _ in range(rng.randint(1, 3))]
        elif r == 1:
            shape = [1] * rng.choice([9, 16, 64])
        elif r == 2:
            shape = [2**31, 2**31, 2**31]
        elif r == 3:
            shape = []
        else:
            shape = list(tm.shape)
            if shape:
                i = rng.randrange(len(shape))
                shape[i] = rng.choice([0, shape[i] + 1, max(shape[i] - 1, 0), shape[i] * 2, 2**40])
            else:
                shape = [rng.choice([0, 1, 2])]
        shape = [max(-(2**63), min(d, 2**63 - 1)) for d in shape]  # int64 dims
        old = list(tm.shape)
        del tm.shape[:]
        tm.shape.extend(shape)
        if rng.random() < 0.5 and all(0 <= d < 2**40 for d in shape):  # keep nbytes consistent
            n = math.prod(shape) * {1: 4, 2: 2, 3: 2, 4: 8, 5: 8, 6: 4, 7: 2, 8: 1, 9: 1, 10: 1}.get(tm.dtype, 4)
            if not tm.blosc2 and tm.encoding == pb.RAW and n < 2**64:
                tm.nbytes = n
        return f"TensorMeta.shape {old} -> {shape}"
    if name == "blosc2":
        tm.blosc2 = not tm.blosc2
        return f"TensorMeta.blosc2 -> {tm.blosc2}"
    old = getattr(tm, name)
    if name in ("offset", "nbytes") and rng.random() < 0.5:
        new = min(max(0, old + rng.choice([-64, -1, 1, 64])), 2**64 - 1)
    else:
        new = rng.choice(TM_VALUES[name])
    setattr(tm, name, new)
    return f"TensorMeta.{name} {old} -> {new}"


def pm_value_kind(rng: random.Random, meta: pb.PayloadMeta | None, region: bytearray) -> str | None:
    values = _body_values(meta)
    if not values:
        return None
    v = rng.choice(values)
    r = rng.randrange(5)
    if r == 0:
        v.Clear()
        return "a Value with no kind"
    if r == 1:
        v.int_value = rng.choice([-(2**63), 2**63 - 1, -1, 0])
        return f"a Value -> int {v.int_value}"
    if r == 2:
        v.float_value = rng.choice([math.nan, math.inf, -math.inf, 1e308])
        return f"a Value -> float {v.float_value}"
    if r == 3:
        v.string_value = rng.choice(STRINGS)
        return f"a Value -> string {v.string_value!r}"
    v.none = rng.choice([True, False])
    return f"a Value -> none={v.none}"


def pm_map(rng: random.Random, meta: pb.PayloadMeta | None, region: bytearray) -> str | None:
    maps = [v.dict for v in _body_values(meta) if v.WhichOneof("kind") == "dict"]
    maps = [m for m in maps if m.keys]
    if not maps:
        return None
    m = rng.choice(maps)
    r = rng.randrange(4)
    if r == 0:
        m.keys.append("extra")
        return "ValueMap: one key more than values"
    if r == 1:
        m.values.add().none = True
        return "ValueMap: one value more than keys"
    if r == 2:
        m.keys.append(m.keys[0])
        m.values.add().int_value = 1
        return f"ValueMap: duplicate key {m.keys[0]!r}"
    i = rng.randrange(len(m.keys))
    old = m.keys[i]
    m.keys[i] = rng.choice(KEYS)
    if len(set(m.keys)) != len(m.keys):
        m.keys[i] = old + "_"
    return f"ValueMap: key {old!r} -> {m.keys[i]!r}"


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def pm_deep(rng: random.Random, meta: pb.PayloadMeta | None, region: bytearray) -> tuple[str, bytes] | None:
    """The body nested ``depth`` lists/dicts deep, written as bytes (protobuf would refuse to)."""
    if meta is None:
        return None
    depth = rng.choice([31, 32, 33, 40, 99, 100, 101, 150, 1000, 5000])
    inner = meta.value.SerializeToString() if meta.HasField("value") else _varint((9 << 3) | 0) + b"\x01"
    for _ in range(depth):
        if rng.random() < 0.5:  # Value.list(2) { items(1): inner }
            inner = _len_field(2, _len_field(1, inner))
        else:  # Value.dict(4) { keys(1): "k", values(2): inner }
            inner = _len_field(4, _len_field(1, b"k") + _len_field(2, inner))
    return f"body nested {depth} deep", _len_field(1, inner)


def pm_many(rng: random.Random, meta: pb.PayloadMeta | None, region: bytearray) -> str | None:
    if meta is None:
        return None
    n = rng.choice([99_999, 100_000, 100_001, 100_001])
    body = pb.Value()
    items = body.list.items
    for _ in range(n):
        items.add().none = True
    if meta.HasField("value"):
        items.add().CopyFrom(meta.value)
    meta.value.CopyFrom(body)
    return f"body: a list of {n} values"


def pm_long_string(rng: random.Random, meta: pb.PayloadMeta | None, region: bytearray) -> str | None:
    values = _body_values(meta)
    if not values:
        return None
    n = rng.choice([(1 << 20) - 1, 1 << 20, (1 << 20) + 1, 300_000])
    multibyte = rng.random() < 0.3
    s = ("\u00fc" * (n // 2)) if multibyte else "x" * n
    vals = [v for v in values if v.WhichOneof("kind") in ("string_value", "dict", "bytes_value")]
    v = rng.choice(vals) if vals else values[0]
    if v.WhichOneof("kind") == "dict" and v.dict.keys:
        v.dict.keys[0] = s
        return f"a dict key of {len(s)} chars"
    if v.WhichOneof("kind") == "bytes_value":
        v.bytes_value = bytes(n)
        return f"bytes of {n}"
    v.string_value = s
    return f"a string of {len(s)} chars"


def _float_spans(meta: pb.PayloadMeta | None, region: bytearray) -> list[tuple[pb.TensorMeta, int, int]]:
    out = []
    for tm in _tensor_metas(meta):
        if tm.nbytes and tm.offset + tm.nbytes <= len(region):
            out.append((tm, tm.offset, tm.offset + tm.nbytes))
    return out


def pm_region_bits(rng: random.Random, meta: pb.PayloadMeta | None, region: bytearray) -> str | None:
    if not region:
        return None
    spans = _float_spans(meta, region)
    lo, hi = (rng.choice(spans)[1:] if spans and rng.random() < 0.8 else (0, len(region)))
    n = rng.randint(1, 8)
    for _ in range(n):
        i = rng.randrange(lo, hi)
        region[i] ^= 1 << rng.randrange(8)
    return f"{n} bit flip(s) in tensor data [{lo}:{hi}]"


_PATTERNS = {
    pb.FLOAT32: [struct.pack("<f", x) for x in (math.nan, math.inf, -math.inf)] + [b"\xff\xff\xff\xff"],
    pb.FLOAT64: [struct.pack("<d", x) for x in (math.nan, math.inf, -math.inf)],
    pb.FLOAT16: [b"\x00\x7c", b"\x00\xfc", b"\x01\x7e", b"\xff\xff"],
    pb.BFLOAT16: [b"\x80\x7f", b"\x80\xff", b"\xc1\x7f"],
    pb.INT64: [struct.pack("<q", x) for x in (-1, -100, 2**63 - 1, -(2**63), 10**6, 128)],
    pb.INT32: [struct.pack("<i", x) for x in (-1, 2**31 - 1, -(2**31), 128)],
    pb.INT16: [struct.pack("<h", x) for x in (-1, 32767, -32768)],
    pb.INT8: [b"\x80", b"\x7f", b"\xff"],
    pb.UINT8: [b"\xff", b"\x02"],
    pb.BOOL: [b"\x02", b"\xff"],
}


def pm_region_values(rng: random.Random, meta: pb.PayloadMeta | None, region: bytearray) -> str | None:
    """NaN/Inf into RAW float tensors, extreme values into int tensors, odd bytes into bools."""
    spans = [(tm, lo, hi) for tm, lo, hi in _float_spans(meta, region) if tm.encoding == pb.RAW and not tm.blosc2
             and tm.dtype in _PATTERNS and hi - lo >= len(_PATTERNS[tm.dtype][0])]
    if not spans:
        return None
    tm, lo, hi = rng.choice(spans)
    pats = _PATTERNS[tm.dtype]
    size = len(pats[0])
    n = rng.randint(1, 4)
    every = rng.random() < 0.15
    pat = rng.choice(pats)
    for k in range((hi - lo) // size if every else n):
        i = lo + (k if every else rng.randrange((hi - lo) // size)) * size
        region[i:i + size] = pat
    return f"{'every' if every else n} element(s) of a {pb.DType.Name(tm.dtype)} tensor = {pat.hex()}"


def pm_blosc2(rng: random.Random, meta: pb.PayloadMeta | None, region: bytearray) -> str | None:
    """Lie in a blosc2 chunk header (sizes, typesize, flags, filters, codec, special) or corrupt its body."""
    spans = [(tm, lo, hi) for tm, lo, hi in _float_spans(meta, region) if tm.blosc2 and hi - lo >= 32]
    if not spans:
        return None
    tm, lo, hi = rng.choice(spans)
    field_ = rng.choice(["version", "versionlz", "flags", "typesize", "nbytes", "blocksize", "cbytes",
                         "filters", "codec", "special", "body", "body"])
    put = lambda off, fmt, v: struct.pack_into(fmt, region, lo + off, v)  # noqa: E731
    if field_ == "nbytes":
        near = struct.unpack_from("<i", region, lo + 4)[0] + rng.choice([-1, 1])
        put(4, "<i", rng.choice([0, 1, -1, 2**31 - 1, max(-(2**31), min(near, 2**31 - 1))]))
    elif field_ == "blocksize":
        put(8, "<i", rng.choice([0, 1, -1, 2**31 - 1, 7]))
    elif field_ == "cbytes":
        put(12, "<i", rng.choice([0, 32, -1, 2**31 - 1, hi - lo + 1, hi - lo - 1]))
    elif field_ == "filters":
        region[lo + 16 + rng.randrange(6)] = rng.choice([0, 1, 2, 3, 4, 35, 255])
    elif field_ == "codec":
        region[lo + 22] = rng.choice([0, 1, 4, 5, 6, 7, 32, 255])
    elif field_ == "special":
        region[lo + 31] = rng.choice([0x10, 0x20, 0x30, 0x40, 0x50, 0x70, 0xff])
    elif field_ == "body":
        for _ in range(rng.randint(1, 16)):
            region[rng.randrange(lo + 32, hi) if hi - lo > 32 else lo] = rng.randrange(256)
    else:
        off = {"version": 0, "versionlz": 1, "flags": 2, "typesize": 3}[field_]
        region[lo + off] = rng.choice([0, 1, 2, 3, 4, 5, 7, 8, 16, 0x7f, 0xff])
    return f"blosc2 chunk header/body lie: {field_}"


def pm_region_size(rng: random.Random, meta: pb.PayloadMeta | None, region: bytearray) -> str | None:
    r = rng.randrange(3)
    if r == 0 and region:
        cut = rng.randrange(len(region))
        del region[cut:]
        return f"buffer region truncated to {cut} bytes"
    if r == 1:
        n = rng.choice([1, 63, 64, 4096])
        region.extend(bytes(n))
        return f"buffer region + {n} bytes"
    region.clear()
    return "buffer region removed"


PAYLOAD_MUTATORS: list[tuple[Callable, float]] = [
    (pm_tensor_field, 6), (pm_value_kind, 2), (pm_map, 1.5), (pm_deep, 0.5), (pm_many, 0.15),
    (pm_long_string, 0.3), (pm_region_bits, 2), (pm_region_values, 3), (pm_blosc2, 2), (pm_region_size, 1),
]


def mutate_payload(rng: random.Random, frames: list[pb.Frame], fix: bool = True) -> list[str]:
    """Mutate the PayloadMeta or the buffers of one message of ``frames`` (in place); refragment."""
    groups = _groups(frames)
    group = rng.choice(groups)
    first = frames[group[0]]
    payload = b"".join(frames[i].data for i in group)
    mb = min(first.meta_bytes, len(payload))
    meta: pb.PayloadMeta | None = pb.PayloadMeta()
    try:
        meta.ParseFromString(payload[:mb])
    except (DecodeError, ValueError, RuntimeError):
        meta = None
    region = bytearray(payload[mb:])
    ops = []
    raw_meta: bytes | None = None
    for _ in range(8):
        fn = rng.choices([m for m, _ in PAYLOAD_MUTATORS], weights=[w for _, w in PAYLOAD_MUTATORS])[0]
        what = fn(rng, meta, region)
        if isinstance(what, tuple):  # (description, the serialized PayloadMeta to send instead)
            what, raw_meta = what
        if what is not None:
            ops.append(f"{fn.__name__}: {what}")
            if rng.random() < 0.75:
                break
    if not ops:
        return []
    try:
        meta_raw = raw_meta if raw_meta is not None else meta.SerializeToString() if meta is not None \
            else payload[:mb]
    except Exception:  # noqa: BLE001 - e.g. an unserializable recursion depth
        return []
    new_payload = meta_raw + bytes(region)
    chunk = max(len(first.data), 1) if len(group) > 1 else max(len(new_payload), 1)
    if rng.random() < 0.2:
        chunk = rng.choice([1, 7, 64, 1000, 4096, 65536])
    chunk = max(chunk, -(-len(new_payload) // 512))  # at most 512 fragments
    new = fragment(first.header, new_payload, len(meta_raw), chunk)
    if not fix:
        for f in new:
            f.meta_bytes, f.payload_bytes = first.meta_bytes, first.payload_bytes
        ops.append("meta_bytes/payload_bytes kept from before")
    frames[group[0]:group[-1] + 1] = new
    return ops


# frame field mutators: (rng, frames, ctx) -> description | None

HEADER_VALUES: dict[str, list[Any]] = {
    "type": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 99, 2**31 - 1],
    "protocol_version": [0, 2, 7, 2**32 - 1],
    "code": [1, 2, 13, 16, 17, 2**32 - 1],
    "step": [1, 2**31, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1],
    "sequence": [0, 1, 2**63, 2**64 - 1],
    "node_id": ["", OTHER_NODE, NODE, worker_node(0), worker_node(1), "FUZZ-W0", "fuzz-w0\x00", "server",
                "f\u00fczz", "x" * 5000],
    "session_id": ["", "0" * 32, "x" * 33, "x" * 100_000, "\u2603"],
}


def fm_header(rng: random.Random, frames: list[pb.Frame], ctx: Any) -> str | None:
    name = rng.choice(list(HEADER_VALUES) + ["step", "step", "type", "session_id"])
    values = list(HEADER_VALUES[name])
    if name == "session_id" and ctx is not None and ctx.sid:
        values += [ctx.sid[:-1] + ("0" if ctx.sid[-1] != "0" else "1"), ctx.sid.upper(), ctx.sid + " "]
    if name in ("step", "sequence"):
        values.append(rng.getrandbits(64))
    new = rng.choice(values)
    every = rng.random() < 0.8
    targets = frames if every else [rng.choice(frames)]
    try:
        for f in targets:
            setattr(f.header, name, new)
    except (ValueError, TypeError):
        return None
    return f"Header.{name} = {_short(new)} on {'every frame' if every else 'one frame'}"


FRAG_VALUES: dict[str, list[int]] = {
    "fragment_index": [1, 2, 5000, 2**31, 2**32 - 1],
    "fragment_count": [0, 1, 2, 4096, 4097, 2**32 - 1],
    "payload_bytes": [0, 1, 2**30, 2**30 + 1, 2**40, 2**63, 2**64 - 1],
    "meta_bytes": [0, 1, 64 << 20, (64 << 20) + 1, 2**32 - 1],
    "crc32": [0, 1, 2**32 - 1],
}


def fm_fragment(rng: random.Random, frames: list[pb.Frame], ctx: Any) -> str | None:
    at = rng.randrange(len(frames))
    f = frames[at]
    name = rng.choice(list(FRAG_VALUES) + ["payload_bytes", "meta_bytes", "fragment_count"])
    old = getattr(f, name)
    new = rng.choice(FRAG_VALUES[name] + [max(0, old + d) for d in (-1, 1)])
    same = name != "fragment_index" and rng.random() < 0.5
    group = [g for g in _groups(frames) if at in g][0] if same else []
    new = min(new, 2**64 - 1 if name == "payload_bytes" else 2**32 - 1)  # the field's width
    for i in group or [at]:
        setattr(frames[i], name, new)
    return f"Frame.{name} {old} -> {new}{' on the whole message' if same else ''}"


def fm_data(rng: random.Random, frames: list[pb.Frame], ctx: Any) -> str | None:
    f = rng.choice(frames)
    r = rng.randrange(4)
    if r == 0 and f.data:
        cut = rng.randrange(len(f.data))
        f.data = f.data[:cut]
        what = f"data truncated to {cut}"
    elif r == 1:
        f.data = f.data + bytes(rng.choice([1, 64, 5000]))
        what = "data extended"
    elif r == 2:
        f.data = b""
        what = "data emptied"
    else:
        f.data = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 16, 200])))
        what = "data replaced by garbage"
    if rng.random() < 0.7:
        f.crc32 = zlib.crc32(f.data)
    return f"Frame.{what}"


FRAME_MUTATORS: list[tuple[Callable, float]] = [(fm_header, 3), (fm_fragment, 3), (fm_data, 1.5)]


def sm_sequence(rng: random.Random, frames: list[pb.Frame], pool: list[pb.Frame]) -> str | None:
    r = rng.randrange(8)
    n = len(frames)
    if r == 0 and n > 1:
        i = rng.randrange(n)
        del frames[i]
        return f"frame {i} of {n} dropped"
    if r == 1:
        i = rng.randrange(n)
        frames.insert(i, frames[i])
        return f"frame {i} duplicated"
    if r == 2 and n > 1:
        i, j = rng.sample(range(n), 2)
        frames[i], frames[j] = frames[j], frames[i]
        return f"frames {i} and {j} swapped"
    if r == 3 and n > 1:
        cut = rng.randrange(1, n)
        del frames[cut:]
        return f"truncated to the first {cut} of {n} frames"
    if r == 4 and pool:
        i = rng.randrange(n + 1)
        frames.insert(i, rng.choice(pool))
        return f"a frame of another message inserted at {i}"
    if r == 5:
        frames.insert(rng.randrange(n + 1), pb.Frame())
        return "an empty Frame inserted"
    if r == 6:
        frames.extend(list(frames) * rng.randint(1, 3))
        return "the case repeated"
    frames.reverse()
    return "frames reversed"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def byte_mutate(rng: random.Random, raw: bytes) -> tuple[bytes, str]:
    b = bytearray(raw)
    r = rng.randrange(9)
    if r == 0 and b:
        n = rng.randint(1, 8)
        for _ in range(n):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b), f"{n} bit flip(s) in the serialized Frame"
    if r == 1 and b:
        n = rng.randint(1, 4)
        for _ in range(n):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b), f"{n} random byte(s) in the serialized Frame"
    if r == 2 and b:
        cut = rng.randrange(len(b))
        return bytes(b[:cut]), f"serialized Frame truncated to {cut} bytes"
    if r == 3:
        return raw + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 20))), "garbage appended"
    if r == 4:
        extra = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        return raw + b"\x3a" + _varint(len(extra)) + extra, "a second data field appended"
    if r == 5:
        return raw + _varint((rng.randint(8, 2**29 - 1) << 3) | rng.choice([0, 1, 2, 5])) + b"\x01" * 8, \
            "an unknown field appended"
    if r == 6:
        return raw + _varint((rng.randint(1, 20) << 3) | rng.choice([3, 4, 6, 7])), "a group/invalid wire type"
    if r == 7:
        return raw + b"\x3a" + _varint(rng.choice([2**31, 2**63, 2**64 - 1])), "a data field with a huge length"
    return b"", "an empty serialized Frame"


def mutate(rng: random.Random, frames: list[pb.Frame], ctx: Any = None, pool: list[pb.Frame] | None = None,
           fix_crc: bool = True) -> tuple[list[bytes], list[str]]:
    """Mutate a case's frames at one or more layers; returns (serialized frames, what was done).

    ``frames``: the case's well-formed frames (one or more messages, in order); they are copied.
    ``ctx``: the stream's context (its session id is used for near-miss session ids).
    ``pool``: frames of other messages, for interleaving. ``fix_crc``: recompute the CRC-32 of
    every fragment after the payload and field mutations (so that they reach the deeper checks of
    a server that verifies CRCs); a CRC mutation itself is never fixed.
    """
    work = [pb.Frame() for _ in frames]
    for w, f in zip(work, frames, strict=True):
        w.CopyFrom(f)
    ops: list[str] = []
    crc_lie = False
    while not ops:
        if rng.random() < 0.5:
            ops += mutate_payload(rng, work, fix=rng.random() < 0.9)
        if rng.random() < 0.35:
            for _ in range(rng.choice([1, 1, 2])):
                fn = rng.choices([m for m, _ in FRAME_MUTATORS], weights=[w for _, w in FRAME_MUTATORS])[0]
                what = fn(rng, work, ctx)
                if what:
                    ops.append(f"{fn.__name__}: {what}")
                    crc_lie |= "crc32" in what or "data" in what
        if rng.random() < 0.2:
            what = sm_sequence(rng, work, pool or [])
            if what:
                ops.append(f"sm_sequence: {what}")
    if fix_crc and not crc_lie:
        for f in work:
            f.crc32 = zlib.crc32(f.data)
    raws = [f.SerializeToString() for f in work]
    if rng.random() < 0.12 and raws:
        i = rng.randrange(len(raws))
        raws[i], what = byte_mutate(rng, raws[i])
        ops.append(f"byte_mutate: frame {i}: {what}")
    return raws, ops


# -- predicting what the server should do with a case ------------------------------------------------


def predict(raws: list[bytes], checksum: bool, node: str = NODE) -> tuple[int, bool]:
    """(complete messages, a partial message left at the end) as the server's Reassembler sees
    ``raws``; stops at the first violation (the server aborts the stream there)."""
    reasm = Reassembler(checksum=checksum)
    done = 0
    try:
        for raw in raws:
            frame, data = split_frame(raw)
            if frame.header.node_id != node:
                return done, False
            if reasm.add(frame, data) is not None:
                done += 1
    except (WireError, ValueError, RuntimeError):
        return done, False
    return done, reasm.in_progress


# -- the stream ------------------------------------------------------------------------------------


class FuzzStream:
    """One Exchange stream of raw bytes; replies and the final status arrive as events."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.ended = threading.Event()
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.cancelled = False
        self._reasm = Reassembler(checksum=False)
        self._call = channel.stream_stream(EXCHANGE_METHOD)(self._gen())
        self._reader = threading.Thread(target=self._read, name="fuzz-stream-reader", daemon=True)
        self._reader.start()

    def _gen(self) -> Iterator[bytes]:
        while (item := self._out.get()) is not None:
            yield item

    def _read(self) -> None:
        code, details = grpc.StatusCode.OK, ""
        try:
            for raw in self._call:
                try:
                    msg = self._reasm.add(*split_frame(raw))
                except Exception as e:  # noqa: BLE001 - a malformed reply from the server is a finding
                    self.events.put(("bad", f"{type(e).__name__}: {e}"))
                    self._reasm.reset()
                    continue
                if msg is not None:
                    self.events.put(("reply", msg))
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        self.code, self.details = code, details
        self.ended.set()
        self._out.put(None)  # free gRPC's thread that iterates our requests
        self.events.put(("end", code, details))

    def send(self, raws: list[bytes]) -> None:
        for raw in raws:
            self._out.put(raw)

    def half_close(self) -> None:
        self._out.put(None)

    def cancel(self) -> None:
        self.cancelled = True
        self._out.put(None)
        self._call.cancel()

    def next_event(self, timeout: float) -> tuple | None:
        try:
            return self.events.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None


# -- results -----------------------------------------------------------------------------------------


@dataclass
class FuzzStats:
    cases: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)  # "reply:CODE" per reply, "end:CODE" per stream end
    outcomes: Counter = field(default_factory=Counter)  # per case: probe / ended / welcome / hang
    scenarios: Counter = field(default_factory=Counter)
    layers: Counter = field(default_factory=Counter)
    hangs: int = 0
    bad_replies: int = 0
    setup_failures: Counter = field(default_factory=Counter)
    harness_errors: Counter = field(default_factory=Counter)  # exceptions in the fuzzer's own mutators
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)  # signature -> first case, count
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def finding(self, kind: str, code: str, details: str, case: dict[str, Any]) -> None:
        sig = f"{kind}:{code}:{_normalise(details)}"
        with self.lock:
            entry = self.findings.get(sig)
            if entry is None:
                self.findings[sig] = {"kind": kind, "code": code, "details": details[:2000], "count": 1,
                                      "case": case_json(case)}
            else:
                entry["count"] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "cases": self.cases, "seconds": round(self.seconds, 2),
            "cases_per_s": round(self.cases / self.seconds, 1) if self.seconds else None,
            "statuses": dict(self.statuses.most_common()), "outcomes": dict(self.outcomes),
            "hangs": self.hangs, "bad_replies": self.bad_replies,
            "setup_failures": dict(self.setup_failures), "harness_errors": dict(self.harness_errors),
            "scenarios": dict(self.scenarios.most_common()), "layers": dict(self.layers.most_common()),
            "findings": sorted(self.findings.values(), key=lambda f: -f["count"]),
        }


def _normalise(text: str) -> str:
    text = re.sub(r"0x[0-9a-f]+|\b[0-9a-f]{8,}\b", "H", text)
    return re.sub(r"-?\d+(\.\d+)?", "N", text)[:160]


def case_json(case: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in case.items() if k != "raws"}
    out["frames_b64"] = [base64.b64encode(r).decode() for r in case.get("raws", [])]
    out["frame_bytes"] = sum(len(r) for r in case.get("raws", []))
    return out


def describe(case: dict[str, Any]) -> str:
    """One line per case: server, scenario, how it ended, the mutations."""
    head = f"[{case.get('server')}] case {case.get('index')} {case.get('where')}:{case.get('scenario')} " \
           f"({case.get('mode')}, {len(case.get('raws', case.get('frames_b64', [])))} frames)"
    return head + "".join(f"\n    - {op}" for op in case.get("ops", [])) or head


# -- the runner ------------------------------------------------------------------------------------


@dataclass
class Target:
    """A server to fuzz: its address, the PKI folder (``client_ids`` certificates), its corpus,
    whether it verifies CRCs."""

    name: str
    address: str
    pki: Path
    corpus: Corpus
    checksum: bool


@dataclass
class _Ctx:
    sid: str = ""
    c2s: CompressionConfig = field(default_factory=CompressionConfig)
    tail: dict[str, Any] = field(default_factory=lambda: {"mode": "trainable"})


# What worker sessions ask for (client -> server); min_bytes=64: small tensors (a decode step's
# hidden state) are compressed too, so that blosc2 chunks and lossy encodings reach the server often.
COMPRESSIONS = {
    "none": CompressionConfig(),
    "blosc2": CompressionConfig(lossless="blosc2", min_bytes=64),
    "blosc2+int8": CompressionConfig(lossless="blosc2", lossy="int8", codec="LZ4", filter="BITSHUFFLE", min_bytes=64),
    "bf16": CompressionConfig(lossy="bf16", min_bytes=64),
    "fp16": CompressionConfig(lossy="fp16", min_bytes=64),
    "int8": CompressionConfig(lossy="int8", int8_block_size=32, min_bytes=64),
    "fp8": CompressionConfig(lossy="fp8", int8_block_size=32, min_bytes=64),
}
TAILS = [({"mode": "trainable", "optimizer": {"name": "SGD", "lr": 1e-3}}, 5), ({"mode": "frozen"}, 2),
         ({"mode": "lora", "lora": {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}}, 2)]
_PROBE_BODY = {"op": "info"}


class _Worker:
    """One client connection to one target: a session, its current stream, and the cases it ran."""

    def __init__(self, fuzzer: Fuzzer, index: int, target: Target) -> None:
        self.fz = fuzzer
        self.index = index
        self.target = target
        from lightning_split.channel import client_tls

        self.node = worker_node(index)
        ca, cert, key = client_tls(target.pki, self.node).read()
        creds = grpc.ssl_channel_credentials(ca, key, cert)
        self.channel = grpc.secure_channel(target.address, creds, options=GRPC_OPTIONS)
        self.rng = random.Random(f"{fuzzer.seed}:worker:{index}")
        self.ctx = _Ctx()
        self.next_ctx: _Ctx | None = None  # what the next new session asks for (else: random)
        self.stream: FuzzStream | None = None
        self.history: collections.deque = collections.deque(maxlen=12)
        self.ids = 1_000_000 * (index + 1)
        self.steps = 10 + 1_000_000 * index
        self.seq = 100

    # -- session and streams ---------------------------------------------------------------------
    def _hello(self, resume: bool) -> dict[str, Any]:
        cfg = ChannelConfig(connections=1, client_to_server=self.ctx.c2s)
        extra = {**self.target.corpus.hello_extra, "tail": self.ctx.tail}
        return build_hello(cfg, self.node, extra, self.ctx.sid if resume else "", checksum=False)

    def _handshake(self, stream: FuzzStream, resume: bool) -> str | None:
        """Send a valid hello on ``stream``; the session id, or None (the status is recorded)."""
        msg = Message(type=pb.HANDSHAKE, body=self._hello(resume), node_id=self.node, sequence=self._next_seq())
        stream.send([f.SerializeToString() for f in encode_frames_of(msg, None, 1 << 20)])
        ev = stream.next_event(self.fz.deadline_s)
        if ev is not None and ev[0] == "reply" and ev[1].type == pb.RESULT and isinstance(ev[1].body, dict):
            return ev[1].body.get("session_id")
        what = "timeout" if ev is None else (ev[1].name if ev[0] == "end" else ev[0])
        self.fz.stats.setup_failures[f"{'resume' if resume else 'handshake'}:{what}"] += 1
        if ev is None:
            self.fz.record_finding("hang", "setup", f"no answer to a valid {'resume ' if resume else ''}hello",
                                   {"index": -1, "server": self.target.name, "where": "setup",
                                    "scenario": "hello", "mode": "setup", "ops": [], "raws": []})
        return None

    def _session_stream(self) -> FuzzStream:
        if self.stream is not None and not self.stream.ended.is_set():
            return self.stream
        self.close_stream()
        for attempt in range(20):
            if self.ctx.sid:
                stream = FuzzStream(self.channel)
                sid = self._handshake(stream, resume=True)
                if sid == self.ctx.sid:
                    self.stream = stream
                    return stream
                stream.cancel()
            self.ctx = self.next_ctx or _Ctx(
                sid="", c2s=COMPRESSIONS[self.rng.choice(list(COMPRESSIONS))],
                tail=self.rng.choices([t for t, _ in TAILS], weights=[w for _, w in TAILS])[0])
            stream = FuzzStream(self.channel)
            sid = self._handshake(stream, resume=False)
            if sid:
                self.ctx.sid = sid
                self.stream = stream
                return stream
            stream.cancel()
            time.sleep(min(0.05 * 2**attempt, 2.0))
        raise RuntimeError(f"worker {self.index}: could not open a session on {self.target.name}")

    def close_stream(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None

    def close(self, close_session: bool = True) -> None:
        """End the worker's session (CLOSE) and its connection."""
        if close_session and self.ctx.sid and not self.fz.stop_event.is_set():
            with contextlib.suppress(Exception):
                stream = self._session_stream()
                msg = Message(type=pb.CLOSE, session_id=self.ctx.sid, node_id=self.node, sequence=self._next_seq())
                stream.send([f.SerializeToString() for f in encode_frames_of(msg, None, 1 << 20)])
                stream.half_close()
                stream.ended.wait(self.fz.deadline_s)
        self.close_stream()
        self.channel.close()

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # -- building cases ----------------------------------------------------------------------------
    def _materialise(self, rng: random.Random, scenario: Scenario, sid: str) -> list[Message]:
        """The scenario's messages addressed to ``sid``, with fresh micro-batch/call ids and steps."""
        mapping: dict[int, int] = {}

        def fresh(path: tuple, v: Any) -> Any:
            if path and path[-1] in ("id", "call") and isinstance(v, int) and not isinstance(v, bool):
                if v not in mapping:
                    self.ids += 1
                    mapping[v] = self.ids
                return mapping[v]
            if len(path) >= 2 and path[-2:] == ("then_step", "step"):
                self.steps += 1
                return self.steps
            return v

        out = []
        for t in scenario.messages:
            body = _copy_tree(t.body)
            for path, v in list(_nodes(body)):
                new = fresh(path, v)
                if new is not v:
                    body = _replace(body, path, new)
            step = t.step
            if t.type == pb.OPTIMIZER_STEP and step:
                self.steps += 1
                step = self.steps
            if t.type == pb.HANDSHAKE and isinstance(body, dict) and "node_id" in body:
                body["node_id"] = self.node  # the hello names the worker's certificate
            out.append(Message(type=t.type, body=body, session_id=sid if t.type != pb.HANDSHAKE else "",
                               step=step, sequence=self._next_seq(), node_id=self.node))
        return out

    def build_case(self, index: int, rng: random.Random) -> dict[str, Any]:
        """A case: where it runs, its serialized frames and the mutations that made them."""
        corpus = self.target.corpus
        r = rng.random()
        where = "hello" if r < self.fz.p_hello else "resume" if r < self.fz.p_hello + self.fz.p_resume else "session"
        scenario = corpus.pick(rng, where)
        if where == "hello" and scenario.name != "join" and rng.random() < 0.1 and self.ctx.sid:
            # a hello that resumes this worker's session (its welcome is not closed afterwards)
            body = dict(scenario.messages[0].body, session_id=self.ctx.sid)
            scenario = Scenario(scenario.name + ":resume", [Template(pb.HANDSHAKE, body)], where="hello")
        msgs = self._materialise(rng, scenario, self.ctx.sid)
        if where == "session" and len(msgs) > 1 and rng.random() < 0.3:  # a prefix or a suffix
            msgs = msgs[rng.randrange(len(msgs)):] if rng.random() < 0.5 else msgs[:rng.randrange(1, len(msgs) + 1)]
        originals = [m.body for m in msgs]
        ops: list[str] = []
        valid = rng.random() < self.fz.p_valid
        layers = []
        if not valid and rng.random() < 0.4:
            i = rng.randrange(len(msgs))
            body, body_ops = mutate_body(rng, msgs[i].body, rounds=rng.choice([1, 1, 1, 2, 3]))
            msgs[i].body = body
            ops += [f"message {i} ({TYPES.get(msgs[i].type)}): {op}" for op in body_ops]
            layers.append("body")
        comp = self.ctx.c2s if where != "hello" else None
        if not valid and rng.random() < 0.04:
            comp = COMPRESSIONS[rng.choice(list(COMPRESSIONS))]
            ops.append(f"encoded with compression {comp.lossless}/{comp.lossy} (maybe not granted)")
        frames: list[pb.Frame] = []
        for i, (m, original) in enumerate(zip(msgs, originals, strict=True)):
            chunk = rng.choice([1 << 20, 1 << 20, 1 << 20, 4096, rng.randint(1, 2048)])
            try:
                enc = encode_frames_of(m, comp, chunk)
            except (WireError, ValueError, TypeError, OverflowError, RuntimeError) as e:
                ops = [op for op in ops if not op.startswith(f"message {i} ")]
                ops.append(f"(message {i}'s mutated body did not encode: {type(e).__name__}; sent unmutated)")
                m.body = original
                enc = encode_frames_of(m, comp, chunk)
            if len(enc) > 512:
                enc = encode_frames_of(m, comp, 1 << 20)
            frames += enc
        if valid or (not ops and rng.random() < 0.05):
            raws = [f.SerializeToString() for f in frames]
            layers = layers or ["valid"]
        else:
            pool = self.fz.frame_pool(self.target.name)
            if ops and rng.random() < 0.6:  # body mutated: mostly leave the frames well-formed
                raws = [f.SerializeToString() for f in frames]
            else:
                raws, frame_ops = mutate(rng, frames, self.ctx, pool, fix_crc=rng.random() < 0.9)
                ops += frame_ops
                layers += sorted({op.split(":")[0] for op in frame_ops})
            self.fz.remember_frames(self.target.name, frames)
        return {"index": index, "server": self.target.name, "worker": self.index, "where": where,
                "scenario": scenario.name, "types": [TYPES.get(m.type, m.type) for m in msgs], "ops": ops,
                "layers": layers, "raws": raws, "sid": self.ctx.sid,
                "compression": f"{self.ctx.c2s.lossless}/{self.ctx.c2s.lossy}", "tail": self.ctx.tail.get("mode")}

    # -- running cases -----------------------------------------------------------------------------
    def run_case(self, index: int) -> None:
        rng = random.Random(f"{self.fz.seed}:case:{index}")
        if self.ctx.sid == "" or self.stream is None or self.stream.ended.is_set():
            self._session_stream()
        try:
            case = self.build_case(index, rng)
        except Exception:  # noqa: BLE001 - a bug of the fuzzer itself: counted, shown, not fatal
            with self.fz.stats.lock:
                self.fz.stats.harness_errors[traceback.format_exc(limit=-3)] += 1
            return
        self.history.append(case)
        st = self.fz.stats
        with st.lock:
            st.scenarios[f"{case['where']}:{case['scenario']}"] += 1
            for layer in case["layers"]:
                st.layers[layer] += 1
        if case["where"] == "session":
            self._run_on_session(case, rng)
        else:
            self._run_on_new_stream(case, rng)
        with st.lock:
            st.cases += 1

    def _count(self, case: dict[str, Any], ev: tuple) -> None:
        st = self.fz.stats
        if ev[0] == "reply":
            msg = ev[1]
            code = "OK" if msg.type != pb.ERROR else STATUS.get(msg.code, grpc.StatusCode.UNKNOWN).name
            with st.lock:
                st.statuses[f"reply:{code}"] += 1
            if code in BAD_CODES:
                self.fz.record_finding("reply", code, str(msg.body), case)
        elif ev[0] == "end":
            with st.lock:
                st.statuses[f"end:{ev[1].name}"] += 1
            if ev[1].name in BAD_CODES:
                self.fz.record_finding("status", ev[1].name, ev[2], case)
            elif "metadata size exceeds" in ev[2] or len(ev[2]) > MAX_STATUS_DETAILS:
                # The server's status message was too long to be delivered (gRPC's 16 KiB metadata
                # limit): the peer gets RESOURCE_EXHAUSTED instead of the code the server meant.
                self.fz.record_finding("oversized_status", ev[1].name, ev[2][:300], case)
        elif ev[0] == "bad":
            with st.lock:
                st.bad_replies += 1
            self.fz.record_finding("bad_reply", "-", ev[1], case)

    def _outcome(self, name: str) -> None:
        with self.fz.stats.lock:
            self.fz.stats.outcomes[name] += 1

    def _hang(self, case: dict[str, Any], stream: FuzzStream, what: str) -> None:
        with self.fz.stats.lock:
            self.fz.stats.hangs += 1
        self._outcome("hang")
        self.fz.record_finding("hang", "-", what, case)
        stream.cancel()

    def _drain_to_end(self, case: dict[str, Any], stream: FuzzStream, deadline: float,
                      seen: list[Message] | None = None) -> bool:
        """Count events until the stream ends; False (a hang) if it does not end in time. The
        replies are appended to ``seen``."""
        while True:
            ev = stream.next_event(deadline - time.monotonic())
            if ev is None:
                return False
            self._count(case, ev)
            if ev[0] == "reply" and seen is not None:
                seen.append(ev[1])
            if ev[0] == "end":
                return True

    def _close_leftovers(self, replies: list[Message]) -> None:
        """Sessions a hello case opened but could not close on its own stream (it was aborted
        after the welcome): close them now, each by a CLOSE that opens a stream naming it, so that
        they neither count against the node's session cap nor hold memory until their TTL."""
        opened = {m.body["session_id"] for m in replies if isinstance(m.body, dict)
                  and isinstance(m.body.get("session_id"), str) and not m.body.get("resumed")}
        closed = {m.session_id for m in replies if isinstance(m.body, dict) and m.body.get("closed")}
        for sid in opened - closed - {self.ctx.sid, ""}:
            stream = FuzzStream(self.channel)
            close = Message(type=pb.CLOSE, session_id=sid, node_id=self.node, sequence=self._next_seq())
            stream.send([f.SerializeToString() for f in encode_frames_of(close, None, 1 << 20)])
            stream.half_close()
            if not stream.ended.wait(self.fz.deadline_s):
                stream.cancel()
            with self.fz.stats.lock:
                self.fz.stats.outcomes["leftover_session_closed"] += 1

    def _run_on_session(self, case: dict[str, Any], rng: random.Random) -> None:
        stream = self._session_stream()
        case["sid"] = self.ctx.sid
        complete, partial = predict(case["raws"], self.target.checksum, self.node)
        half_close = partial or rng.random() < self.fz.p_half_close
        case["mode"] = "half-close" if half_close else "probe"
        deadline = time.monotonic() + self.fz.deadline_s
        stream.send(case["raws"])
        if half_close:
            stream.half_close()
            if not self._drain_to_end(case, stream, deadline):
                self._hang(case, stream, f"the stream did not end within {self.fz.deadline_s:.0f} s of a "
                                         f"half-close ({'partial message' if partial else 'complete messages'})")
                self._abandon_session()
                return
            self._outcome("ended")
            self.stream = None
            return
        # The session's next number: the server answers a number at or below the highest it saw
        # from its record of replies (channel/replies.py), so a probe numbered far ahead would make
        # every later request of the session a refused replay instead of a case.
        probe_seq = self._next_seq()
        probe = Message(type=pb.CACHE, body=_PROBE_BODY, session_id=self.ctx.sid, sequence=probe_seq, node_id=self.node)
        stream.send([f.SerializeToString() for f in encode_frames_of(probe, None, 1 << 20)])
        replies = 0
        while True:
            ev = stream.next_event(deadline - time.monotonic())
            if ev is None:
                self._hang(case, stream, f"neither the probe's reply nor a status within {self.fz.deadline_s:.0f} s "
                                         f"({complete} complete message(s) predicted)")
                self._abandon_session()
                return
            if ev[0] == "reply" and ev[1].sequence == probe_seq:
                self._outcome("probe")
                if replies != complete:  # the stream went on, so every complete message was handled
                    self.fz.record_finding("reply_count", "-", f"{replies} replies to {complete} complete "
                                                                "message(s) before the probe's", case)
                if ev[1].type == pb.ERROR:  # e.g. the case closed the session: start a new one
                    # (a session the server refuses requests on, e.g. after a sequence number far
                    # ahead, is closed first: left to its orphan grace it would outlive the run)
                    self._end_session(stream)
                return
            replies += ev[0] == "reply"
            self._count(case, ev)
            if ev[0] == "end":
                self._outcome("ended")
                self.stream = None
                return

    def _end_session(self, stream: FuzzStream) -> None:
        """CLOSE the current session on ``stream`` (if the server still has it), then forget it."""
        if self.ctx.sid and not stream.ended.is_set():
            close = Message(type=pb.CLOSE, session_id=self.ctx.sid, node_id=self.node, sequence=self._next_seq())
            stream.send([f.SerializeToString() for f in encode_frames_of(close, None, 1 << 20)])
            stream.half_close()
            stream.ended.wait(self.fz.deadline_s)
        self.close_stream()
        self.ctx.sid = ""

    def _abandon_session(self) -> None:
        """After a hang the session may be stuck (its lock held): start a new one."""
        self.stream = None
        self.ctx.sid = ""

    def _run_on_new_stream(self, case: dict[str, Any], rng: random.Random) -> None:
        """A hello (or a reconnect naming the session in its header) as a new stream's first message."""
        stream = FuzzStream(self.channel)
        deadline = time.monotonic() + self.fz.deadline_s
        complete, partial = predict(case["raws"], self.target.checksum, self.node)
        try:
            stream.send(case["raws"])
            if case["where"] == "resume" and not partial and rng.random() > self.fz.p_half_close:
                case["mode"] = "probe"
                probe_seq = self._next_seq()  # see _run_on_session
                probe = Message(type=pb.CACHE, body=_PROBE_BODY, session_id=self.ctx.sid, sequence=probe_seq,
                                node_id=self.node)
                stream.send([f.SerializeToString() for f in encode_frames_of(probe, None, 1 << 20)])
                while True:
                    ev = stream.next_event(deadline - time.monotonic())
                    if ev is None:
                        self._hang(case, stream, "a reconnecting stream: no probe reply, no status")
                        return
                    if ev[0] == "reply" and ev[1].sequence == probe_seq:
                        self._outcome("probe")
                        stream.half_close()
                        if not self._drain_to_end(case, stream, deadline):
                            self._hang(case, stream, "a reconnecting stream did not end after a half-close")
                        return
                    self._count(case, ev)
                    if ev[0] == "end":
                        self._outcome("ended")
                        return
            replies: list[Message] = []
            if case["where"] == "hello" and complete and not partial:
                case["mode"] = "hello"
                ev = stream.next_event(deadline - time.monotonic())
                if ev is None:
                    self._hang(case, stream, "no welcome and no status after a complete hello")
                    return
                self._count(case, ev)
                if ev[0] == "end":
                    self._outcome("ended")
                    return
                if ev[0] == "reply":
                    replies.append(ev[1])
                if ev[0] == "reply" and isinstance(ev[1].body, dict) and ev[1].body.get("session_id"):
                    self._outcome("welcome")
                    sid = ev[1].body["session_id"]
                    if sid != self.ctx.sid and not ev[1].body.get("resumed"):  # free the new session
                        close = Message(type=pb.CLOSE, session_id=sid, node_id=self.node, sequence=self._next_seq())
                        stream.send([f.SerializeToString() for f in encode_frames_of(close, None, 1 << 20)])
            else:
                case["mode"] = "half-close"
            stream.half_close()
            if not self._drain_to_end(case, stream, deadline, replies):
                self._hang(case, stream, f"a new stream did not end after a half-close ({case['mode']})")
                return
            self._outcome("ended")
            self._close_leftovers(replies)
        finally:
            if not stream.ended.is_set():
                stream.cancel()


_INTERNAL_LINE = re.compile(r"internal error ([0-9a-f]{6,}) in (.*?): (\w+(?:\.\w+)*): (.*)")


class LogRefs:
    """Error references in the server's log -> 'Type: message (in what) at file:line'.

    The server answers an unhandled exception with ``internal server error (ref R)`` and logs
    ``internal error R in WHAT: Type: message`` at ERROR, its traceback at DEBUG. Fed either by
    :meth:`handler` (a logging.Handler, in-process) or by :meth:`follow` (a log file, tailed)."""

    def __init__(self) -> None:
        self.refs: dict[str, str] = {}
        self._lock = threading.RLock()
        self._path: Path | None = None
        self._pos = 0
        self._pending = ""

    def handler(self) -> logging.Handler:
        refs = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    text = record.getMessage()
                except Exception:  # noqa: BLE001
                    return
                m = _INTERNAL_LINE.match(text)
                if m:
                    refs._add(m.group(1), f"{m.group(3)}: {m.group(4)} (in {_strip_ids(m.group(2))})")
                elif record.exc_info and text.startswith("internal error "):
                    site = _site(traceback.extract_tb(record.exc_info[2]))
                    refs._add_site(text.split()[-1], site)

        return _Handler(logging.DEBUG)

    def follow(self, path: str | Path) -> LogRefs:
        self._path = Path(path)
        self._pos = 0
        return self

    def _add(self, ref: str, text: str) -> None:
        with self._lock:
            self.refs[ref] = text + self.refs.get(ref, "")

    def _add_site(self, ref: str, site: str) -> None:
        with self._lock:
            self.refs[ref] = self.refs.get(ref, "") + f" at {site}"

    def _read_file(self) -> None:
        if self._path is None or not self._path.exists():
            return
        with self._path.open(errors="replace") as f:
            f.seek(self._pos)
            chunk = f.read()
            self._pos = f.tell()
        lines = (self._pending + chunk).split("\n")
        self._pending = lines.pop()  # an unfinished last line
        ref = None
        frames: list[str] = []
        for line in lines:
            m = _INTERNAL_LINE.search(line)
            if m:
                self._add(m.group(1), f"{m.group(3)}: {m.group(4)} (in {_strip_ids(m.group(2))})")
                continue
            d = re.search(r"internal error ([0-9a-f]{6,})$", line)
            if d:
                ref, frames = d.group(1), []
                continue
            if ref is not None:
                f = re.search(r'File "([^"]*lightning_split/[^"]*)", line (\d+)', line)
                if f:
                    frames.append(f"{f.group(1).split('lightning_split/')[-1]}:{f.group(2)}")
                elif line and not line.startswith((" ", "Traceback", "During", "The above")):
                    if frames:
                        self._add_site(ref, frames[-1])
                    ref = None

    def lookup(self, ref: str) -> str | None:
        with self._lock:
            if ref not in self.refs and self._path is not None:
                self._read_file()
            return self.refs.get(ref)


def _strip_ids(what: str) -> str:
    return re.sub(r"\(session [0-9a-f]+, step \d+\)", "", what).strip()


def _site(tb: Any) -> str:
    mine = [f for f in tb if "lightning_split" in f.filename]
    f = (mine or list(tb) or [None])[-1]
    return "?" if f is None else f"{f.filename.split('lightning_split/')[-1]}:{f.lineno}"


class Fuzzer:
    """Runs cases over ``workers`` concurrent client streams spread over ``targets``.

    Case ``i`` is built from ``random.Random(f"{seed}:case:{i}")`` (and the worker's session), so a
    run is reproducible up to the server-chosen session ids and the interleaving of workers.
    """

    def __init__(self, targets: list[Target], seed: int = 0, workers: int = 2, deadline_s: float = 10.0,
                 p_valid: float = 0.08, p_hello: float = 0.08, p_resume: float = 0.04,
                 p_half_close: float = 0.1, resolver: LogRefs | None = None) -> None:
        self.targets = targets
        self.seed = seed
        self.deadline_s = deadline_s
        self.p_valid, self.p_hello, self.p_resume, self.p_half_close = p_valid, p_hello, p_resume, p_half_close
        self.stats = FuzzStats()
        self.stop_event = threading.Event()
        self._pool: dict[str, collections.deque] = {t.name: collections.deque(maxlen=64) for t in targets}
        self._pool_lock = threading.Lock()
        self.workers = [_Worker(self, i, targets[i % len(targets)]) for i in range(workers)]
        self.next_index = 0
        # Turns an error reference in a short INTERNAL reply into what the server logged for it.
        self.resolver = resolver

    def frame_pool(self, target: str) -> list[pb.Frame]:
        with self._pool_lock:
            return list(self._pool[target])

    def remember_frames(self, target: str, frames: list[pb.Frame]) -> None:
        if frames:
            with self._pool_lock:
                self._pool[target].append(frames[0])

    def record_finding(self, kind: str, code: str, details: str, case: dict[str, Any]) -> None:
        ref = re.search(r"\(ref ([0-9a-f]{6,})\)", details)
        if ref and self.resolver is not None:  # the server logged what the short reply stands for
            logged = self.resolver.lookup(ref.group(1))
            if logged:
                details = f"{logged} [reply: {details}]"
        self.stats.finding(kind, code, details, case)

    def run(self, n: int) -> FuzzStats:
        """Run the next ``n`` cases (indices continue from the last call)."""
        start, self.next_index = self.next_index, self.next_index + n
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def work(w: _Worker) -> None:
            try:
                for i in range(start + w.index, start + n, len(self.workers)):
                    if self.stop_event.is_set():
                        return
                    w.run_case(i)
            except BaseException as e:  # noqa: BLE001 - reported by run()
                errors.append(e)
                self.stop_event.set()

        threads = [threading.Thread(target=work, args=(w,), name=f"fuzz-worker-{w.index}", daemon=True)
                   for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.stats.seconds += time.monotonic() - t0
        if errors:
            raise errors[0]
        return self.stats

    def history(self) -> list[dict[str, Any]]:
        """The last cases of every worker (what to replay after a crash), oldest first per worker."""
        return [case_json(c) for w in self.workers for c in w.history]

    def close(self) -> None:
        for w in self.workers:
            w.close(close_session=not self.stop_event.is_set())


def run_cases(targets: list[Target], n: int, seed: int = 0, workers: int = 2, deadline_s: float = 10.0,
              **kw: Any) -> FuzzStats:
    """Run ``n`` cases against ``targets`` and close every session afterwards; the statistics."""
    fuzzer = Fuzzer(targets, seed=seed, workers=workers, deadline_s=deadline_s, **kw)
    try:
        return fuzzer.run(n)
    finally:
        fuzzer.close()


def _readdress(raw: bytes, old: bytes, new: bytes) -> bytes:
    """``raw`` with session id ``old`` replaced by ``new`` (same length: the protobuf stays valid);
    a fragment whose CRC-32 was right before is given the right one again."""
    if old not in raw:
        return raw
    try:
        frame = pb.Frame.FromString(raw)
    except (DecodeError, ValueError):
        return raw.replace(old, new)
    if old in frame.data and frame.crc32 == zlib.crc32(frame.data):
        out = raw.replace(old, new)
        fixed = pb.Frame.FromString(out)
        fixed.crc32 = zlib.crc32(fixed.data)
        return fixed.SerializeToString()
    return raw.replace(old, new)


def replay(target: Target, cases: list[dict[str, Any]], deadline_s: float = 10.0) -> list[list[tuple]]:
    """Send saved cases (``case_json`` form) again on a new session of ``target``; per case its events.

    Each case goes out as its worker's node id (``client_ids`` must cover the workers), on a fresh
    session of that worker: the old session id in the frames is replaced by the new one. A hello
    or reconnect case goes first on a new stream, as it did. The stream is half-closed after the
    frames (no probe), so every reply and the final status are seen.
    """
    fz = Fuzzer([target], workers=max(int(c.get("worker", 0)) for c in cases) + 1, deadline_s=deadline_s)
    results = []
    try:
        for case in cases:
            w = fz.workers[int(case.get("worker", 0))]
            raws = [base64.b64decode(r) for r in case["frames_b64"]]
            # A session like the one the case ran on: the same compression grant and tail mode.
            c2s = next((c for c in COMPRESSIONS.values() if f"{c.lossless}/{c.lossy}" == case.get("compression")),
                       CompressionConfig())
            tail = next((t for t, _ in TAILS if t["mode"] == case.get("tail")), TAILS[0][0])
            if (w.ctx.c2s, w.ctx.tail) != (c2s, tail):
                w.close_stream()
                w.ctx, w.next_ctx = _Ctx(), _Ctx(c2s=c2s, tail=tail)
            stream = w._session_stream()  # a session to name (a reconnect) or to resume (a hello)
            if case["where"] != "session":
                stream = FuzzStream(w.channel)
            old, new = case.get("sid", "").encode(), w.ctx.sid.encode()
            if old and len(old) == len(new):
                raws = [_readdress(r, old, new) for r in raws]
            stream.send(raws)
            stream.half_close()
            events = []
            deadline = time.monotonic() + deadline_s
            while (ev := stream.next_event(deadline - time.monotonic())) is not None:
                events.append(("reply", TYPES.get(ev[1].type), STATUS.get(ev[1].code, ev[1].code).name
                               if ev[1].type == pb.ERROR else "OK", str(ev[1].body)[:300]) if ev[0] == "reply"
                              else ev if ev[0] == "bad" else ("end", ev[1].name, ev[2][:300]))
                if ev[0] == "end":
                    break
            else:
                events.append(("hang",))
                stream.cancel()
            w.stream = None
            results.append(events)
    finally:
        fz.close()
    return results


def summary_lines(stats: FuzzStats, limit: int = 40) -> list[str]:
    """The findings, one block each, most frequent first."""
    lines = []
    for f in sorted(stats.findings.values(), key=lambda f: -f["count"])[:limit]:
        lines.append(f"{f['kind']} {f['code']} x{f['count']}: {f['details'][:300]}")
        lines.append("  " + describe(f["case"]).replace("\n", "\n  "))
    return lines


def traceback_summary(text: str) -> Counter:
    """Distinct tracebacks in a log: (last lightning_split frame, exception line) -> count."""
    out: Counter = Counter()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("Traceback"):
            continue
        where, j = "?", i + 1
        while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("Traceback")
                                  or lines[j].startswith("During handling") or lines[j].startswith("The above")
                                  or not lines[j].strip()):
            m = re.search(r'File "([^"]*lightning_split[^"]*)", line (\d+)', lines[j])
            if m:
                where = f"{m.group(1).split('lightning_split/')[-1]}:{m.group(2)}"
            j += 1
        exc = lines[j] if j < len(lines) else "?"
        out[f"{where} {exc[:200]}"] += 1
    return out

