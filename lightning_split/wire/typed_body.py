"""Typed bodies: each instruction's body is its own protobuf message in split.proto, mapped to and
from the dict the handlers read.

The mapping is by field name and driven by the message descriptors, so the .proto is the only
schema (a client in another language builds the same messages from it):

- every key of a body dict must name a field of the instruction's message; anything else is
  refused before a byte is sent;
- a key whose value is None is not sent, and an unset field comes back as an absent key: None and
  missing mean the same on both sides (scalar fields are ``optional`` in the .proto, so a 0 or an
  empty string that was sent comes back);
- a message with an ``extensions`` map (Hello, Welcome) takes the keys that name none of its fields
  there, and gives them back as keys of the dict (a channel's handler adds keys of its own);
- ``TensorMeta`` fields carry tensors, ``Value`` fields open-ended trees (block arguments, model
  configs), other message fields nest the same way; repeated fields are lists, ``map<string, X>``
  fields dicts (walked in key order).

Which message a body uses is decided by the instruction (``body_case``); the receiver learns it
from the ``PayloadMeta.body`` oneof and checks it against the header's type (``expected_case``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message as PbMessage

from lightning_split._proto import split_pb2 as pb

from .errors import invalid

__all__ = ["body_case", "expected_case", "fill", "walk", "build", "GENERIC"]

GENERIC = "value"  # the PayloadMeta.body case of an untyped Value tree
EXTENSIONS = "extensions"  # a message's map of the keys that name none of its fields

# The channel's own messages are always typed.
CHANNEL_REQUESTS: dict[int, str] = {pb.HANDSHAKE: "hello", pb.ERROR: "error"}
CHANNEL_REPLIES: dict[int, str] = {pb.HANDSHAKE: "welcome", pb.CLOSE: "close_reply"}
# The split protocol's instructions, typed when the server says so (Welcome.typed_bodies): the
# body of each request by header type, and of each RESULT by the type of the request it answers.
INSTRUCTION_REQUESTS: dict[int, str] = {
    pb.SPLIT: "split", pb.LOAD: "load", pb.FORWARD: "forward", pb.INFER: "forward", pb.BACKWARD: "backward",
    pb.OPTIMIZER_STEP: "optimizer_step", pb.STATE: "state", pb.CACHE: "cache",
}
INSTRUCTION_REPLIES: dict[int, str] = {
    pb.SPLIT: "split_description", pb.LOAD: "load_reply", pb.FORWARD: "forward_reply", pb.INFER: "forward_reply",
    pb.BACKWARD: "backward_reply", pb.OPTIMIZER_STEP: "optimizer_step_reply", pb.STATE: "state_reply",
    pb.CACHE: "cache_reply",
}

_TENSOR = pb.TensorMeta.DESCRIPTOR.full_name
_VALUE = pb.Value.DESCRIPTOR.full_name


def body_case(msg_type: int, answers: int = 0, typed: bool = False) -> str:
    """The PayloadMeta.body case of a message of ``msg_type`` (a RESULT: answering ``answers``);
    ``typed``: the instructions' own messages, else an untyped Value (channels of other protocols)."""
    if msg_type == pb.RESULT:
        return CHANNEL_REPLIES.get(answers) or (INSTRUCTION_REPLIES.get(answers, GENERIC) if typed else GENERIC)
    return CHANNEL_REQUESTS.get(msg_type) or (INSTRUCTION_REQUESTS.get(msg_type, GENERIC) if typed else GENERIC)


def expected_case(msg_type: int, typed: bool) -> str | None:
    """The body case a received request of ``msg_type`` must come as (None: any)."""
    return CHANNEL_REQUESTS.get(msg_type) or (INSTRUCTION_REQUESTS.get(msg_type) if typed else None)


class Encoder(Protocol):  # tensor_codec._Encoder, seen from here
    def count(self, depth: int, path: str) -> None: ...
    def check_len(self, n: int, path: str) -> None: ...
    def tensor(self, tm: pb.TensorMeta, t: torch.Tensor) -> None: ...
    def fill(self, v: pb.Value, x: Any, depth: int, path: str) -> None: ...


class Validator(Protocol):  # tensor_codec._Validator, seen from here
    def count(self, depth: int, path: str = "") -> None: ...
    def string(self, s: str, field: str) -> None: ...
    def byte_string(self, b: bytes, field: str) -> None: ...
    def tensor(self, tm: pb.TensorMeta) -> None: ...
    def walk(self, v: pb.Value, depth: int) -> None: ...


@functools.cache  # on every field of every message sent or received: asked once per field
def _is_map(f: FieldDescriptor) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _map_value(f: FieldDescriptor) -> FieldDescriptor:
    return f.message_type.fields_by_name["value"]


def fill(enc: Encoder, msg: PbMessage, x: Any, depth: int, path: str) -> None:
    """Set ``msg``'s fields from the dict ``x`` (see the module doc for the rules)."""
    desc: Descriptor = msg.DESCRIPTOR
    if not isinstance(x, dict):
        raise invalid(f"{path}: a {desc.name} is sent as a dict, not a {type(x).__name__}")
    msg.SetInParent()  # an empty dict is still a body
    extensions = desc.fields_by_name.get(EXTENSIONS)
    spill: dict[str, Any] = {}
    for key, value in x.items():
        f = desc.fields_by_name.get(key) if isinstance(key, str) else None
        if key == EXTENSIONS:
            raise invalid(f"{path}: {EXTENSIONS!r} is not a key of its own (a key no field names goes there)")
        if f is None and extensions is not None and isinstance(key, str):
            spill[key] = value
        elif f is None:
            raise invalid(f"{desc.name} has no field {key!r} (at {path}; fields: {', '.join(desc.fields_by_name)})")
        elif value is not None:
            _fill_field(enc, msg, f, value, depth, f"{path}.{key}")
    if spill:
        _fill_field(enc, msg, extensions, spill, depth, f"{path}.{EXTENSIONS}")


def _fill_field(enc: Encoder, msg: PbMessage, f: FieldDescriptor, value: Any, depth: int, where: str) -> None:
    enc.count(depth + 1, where)
    target = getattr(msg, f.name)
    if _is_map(f):
        if not isinstance(value, dict):
            raise invalid(f"{where} is a map: send a dict, not a {type(value).__name__}")
        vf = _map_value(f)
        for k, item in value.items():
            if not isinstance(k, str):
                raise invalid(f"map key {k!r} at {where} is not a str")
            enc.check_len(len(k.encode("utf-8")), f"{where} key")
            if vf.message_type is None:
                with _naming(f"{where}[{k!r}]"):
                    target[k] = _scalar(enc, vf, item, f"{where}[{k!r}]")
            else:
                _fill_one(enc, vf, target[k], item, depth + 2, f"{where}[{k!r}]")
    elif f.is_repeated:
        if not isinstance(value, (list, tuple)):
            raise invalid(f"{where} is repeated: send a list, not a {type(value).__name__}")
        for i, item in enumerate(value):
            if f.message_type is None:
                with _naming(f"{where}[{i}]"):
                    target.append(_scalar(enc, f, item, f"{where}[{i}]"))
            else:
                _fill_one(enc, f, target.add(), item, depth + 2, f"{where}[{i}]")
    elif f.message_type is None:
        with _naming(where):
            setattr(msg, f.name, _scalar(enc, f, value, where))
    else:
        _fill_one(enc, f, target, value, depth + 1, where)


@contextlib.contextmanager
def _naming(where: str) -> Iterator[None]:
    """protobuf's type and range errors (a str for an int, an int out of range), naming the field."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise invalid(f"{where}: {e}") from e


def _scalar(enc: Encoder, f: FieldDescriptor, value: Any, where: str) -> Any:
    if f.type == FieldDescriptor.TYPE_BOOL and not isinstance(value, bool):
        raise invalid(f"{where} is a bool, not a {type(value).__name__}")
    if f.cpp_type in _INTEGERS and isinstance(value, bool):
        raise invalid(f"{where} is an integer, not a bool")
    if f.type == FieldDescriptor.TYPE_STRING and isinstance(value, str):
        enc.check_len(len(value.encode("utf-8")), where)
    if f.type == FieldDescriptor.TYPE_BYTES and isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
        enc.check_len(len(value), where)
    return value  # protobuf checks the rest (type, range) and raises TypeError / ValueError


_INTEGERS = {FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT32,
             FieldDescriptor.CPPTYPE_UINT64, FieldDescriptor.CPPTYPE_ENUM}


def _fill_one(enc: Encoder, f: FieldDescriptor, msg: PbMessage, value: Any, depth: int, where: str) -> None:
    name = f.message_type.full_name
    if name == _TENSOR:
        if not isinstance(value, torch.Tensor):
            raise invalid(f"{where} is a tensor, not a {type(value).__name__}")
        enc.tensor(msg, value)
    elif name == _VALUE:
        enc.fill(msg, value, depth, where)
    else:
        fill(enc, msg, value, depth, where)


def walk(val: Validator, msg: PbMessage, depth: int) -> None:
    """Check every field of a received typed body (pass 1 of decoding: nothing is allocated)."""
    for f, value in msg.ListFields():
        val.count(depth + 1)
        if _is_map(f):
            vf = _map_value(f)
            for k in sorted(value):
                val.string(k, f"{f.full_name} key")
                _walk_one(val, vf, value[k], depth + 2)
        elif f.is_repeated:
            for item in value:
                _walk_one(val, f, item, depth + 2)
        else:
            _walk_one(val, f, value, depth + 1)


_SCALAR, _STRING, _BYTES, _TENSOR_META, _VALUE_TREE, _MESSAGE = range(6)


@functools.cache  # walk and build ask it of every field received
def _holds(f: FieldDescriptor) -> int:
    """What a field holds: a scalar (a string, bytes, another), a tensor, a Value tree, a message."""
    if f.message_type is None:
        return {FieldDescriptor.TYPE_STRING: _STRING, FieldDescriptor.TYPE_BYTES: _BYTES}.get(f.type, _SCALAR)
    return {_TENSOR: _TENSOR_META, _VALUE: _VALUE_TREE}.get(f.message_type.full_name, _MESSAGE)


def _walk_one(val: Validator, f: FieldDescriptor, value: Any, depth: int) -> None:
    holds = _holds(f)
    if holds == _TENSOR_META:
        val.tensor(value)
    elif holds == _VALUE_TREE:
        val.walk(value, depth)
    elif holds == _MESSAGE:
        walk(val, value, depth)
    elif holds == _STRING:
        val.string(value, f.full_name)
    elif holds == _BYTES:
        val.byte_string(value, f.full_name)


def build(msg: PbMessage, tensors: list[torch.Tensor], pos: list[int], build_value: Any) -> dict[str, Any]:
    """Pass 2: the dict of a checked typed body; tensors are taken in pass-1 order."""
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for f, value in msg.ListFields():
        if f.name == EXTENSIONS:
            vf = _map_value(f)
            extra = {k: _build_one(vf, value[k], tensors, pos, build_value) for k in sorted(value)}
        elif _is_map(f):
            vf = _map_value(f)
            out[f.name] = {k: _build_one(vf, value[k], tensors, pos, build_value) for k in sorted(value)}
        elif f.is_repeated:
            out[f.name] = [_build_one(f, item, tensors, pos, build_value) for item in value]
        else:
            out[f.name] = _build_one(f, value, tensors, pos, build_value)
    return {**extra, **out}  # a key that names a field is that field, never an extension


def _build_one(f: FieldDescriptor, value: Any, tensors: list[torch.Tensor], pos: list[int], build_value: Any) -> Any:
    holds = _holds(f)
    if holds == _TENSOR_META:
        t = tensors[pos[0]]
        pos[0] += 1
        return t
    if holds == _VALUE_TREE:
        return build_value(value, tensors, pos)
    if holds == _MESSAGE:
        return build(value, tensors, pos, build_value)
    return value
