"""Typed bodies (protocol 2): every instruction's body is its own message in split.proto.

Golden frames pin the encoding byte for byte (a client in another language builds the same bytes
from the .proto), and the mapping rules are checked: None and missing are one, unknown keys are
refused before sending, a 0 that was sent comes back, handler keys ride in ``extensions``.
"""

from __future__ import annotations

import pytest
import torch

from lightning_split._proto import split_pb2 as pb
from lightning_split.wire import PROTOCOL_VERSION, Message, Reassembler, WireError, encode_message
from lightning_split.wire.tensor_codec import decode_body, encode_body
from lightning_split.wire.typed_body import body_case, expected_case


def _round_trip(body: object, case: str) -> object:
    meta, buffers = encode_body(body, case=case)
    return decode_body(meta, b"".join(bytes(b) for b in buffers))


def _frame_bytes(msg: Message) -> bytes:
    enc = encode_message(msg, chunk_size=1 << 20, checksum=True)
    return b"".join(f.SerializeToString() for f in enc.frames())


# What each message encodes to, frame and all. Regenerate only for a deliberate protocol change
# (and bump PROTOCOL_VERSION): a third-party client must change with it.
GOLDEN = {
    "forward": (
        "0a0f080310041a05616c6963653001380318012036281e35033f551c3a364a1c0a090801120301020338183a046175746f"
        "4800600768018201023000000000000000803f0000004000004040000080400000a040"
    ),
}


def _forward() -> Message:
    body = {"hidden": torch.arange(6, dtype=torch.float32).view(1, 2, 3), "block": {"use_cache": False},
            "result": "auto", "top_k": 0, "id": 7, "input_grad": True}
    return Message(type=pb.FORWARD, body=body, sequence=3, step=1, node_id="alice", typed=True)


def test_golden_forward_frame() -> None:
    got = _frame_bytes(_forward()).hex()
    assert got == GOLDEN["forward"], got
    # What those bytes say, read with protobuf alone (as a client in another language would)
    frame = pb.Frame.FromString(bytes.fromhex(GOLDEN["forward"]))
    header = frame.header
    assert (header.protocol_version, header.type, header.sequence) == (PROTOCOL_VERSION, pb.FORWARD, 3)
    meta = pb.PayloadMeta.FromString(frame.data[: frame.meta_bytes])
    fwd = meta.forward
    assert meta.WhichOneof("body") == "forward" and list(fwd.hidden.shape) == [1, 2, 3]
    assert fwd.hidden.dtype == pb.FLOAT32 and fwd.hidden.nbytes == 24 and fwd.hidden.offset == 0
    assert fwd.HasField("top_k") and fwd.top_k == 0 and fwd.id == 7 and fwd.result == "auto"
    assert not fwd.HasField("labels") and not fwd.HasField("keep_last")
    assert fwd.block.HasField("use_cache") and fwd.block.use_cache is False and not fwd.block.HasField("kv_cache")
    region = frame.data[frame.meta_bytes:]
    assert torch.equal(torch.frombuffer(bytearray(region[:24]), dtype=torch.float32), torch.arange(6.0))


def test_forward_body_round_trips_with_its_zeros_and_types() -> None:
    body = _forward().body
    back = _round_trip(body, "forward")
    assert back["top_k"] == 0 and back["id"] == 7 and back["input_grad"] is True and back["result"] == "auto"
    assert back["block"] == {"use_cache": False}  # a sent False comes back
    assert torch.equal(back["hidden"], body["hidden"])


def test_none_is_missing_and_unknown_keys_are_refused_before_sending() -> None:
    back = _round_trip({"hidden": torch.ones(1, 1, 2), "labels": None, "cache": None}, "forward")
    assert set(back) == {"hidden"}
    with pytest.raises(WireError, match="has no field 'hiden'"):
        encode_body({"hiden": torch.ones(1)}, case="forward")
    with pytest.raises(WireError, match="is a bool"):
        encode_body({"training": 1}, case="forward")
    with pytest.raises(WireError, match="is a tensor"):
        encode_body({"hidden": [1.0, 2.0]}, case="forward")
    with pytest.raises(WireError):
        encode_body({"top_k": "many"}, case="forward")


def test_nested_messages_maps_and_repeated_fields() -> None:
    grads = {"logits": torch.randn(2, 3), "loss": torch.tensor(0.5)}
    back = _round_trip({"id": 4, "grads": grads, "then_step": {"step": 9, "lr": 0.01}}, "backward")
    assert back["then_step"] == {"step": 9, "lr": 0.01} and set(back["grads"]) == {"logits", "loss"}
    assert all(torch.equal(back["grads"][k], v) for k, v in grads.items())
    reply = _round_trip({"grad_input": torch.ones(2), "grad_extra": [None, torch.zeros(1)]}, "forward_reply")
    assert reply["grad_extra"][0] is None and torch.equal(reply["grad_extra"][1], torch.zeros(1))
    cache = _round_trip({"hidden": torch.ones(1, 1, 4), "cache": {"past": 0, "new": 1, "crop": False}}, "forward")
    assert cache["cache"] == {"past": 0, "new": 1, "crop": False}


def test_handler_keys_ride_in_extensions_and_fields_win() -> None:
    hello = {"protocol_version": PROTOCOL_VERSION, "node_id": "alice", "greeting": "hi", "n": [1, 2]}
    assert _round_trip(hello, "hello") == hello
    meta, _ = encode_body(hello, case="hello")
    parsed = pb.PayloadMeta.FromString(meta)
    assert parsed.WhichOneof("body") == "hello" and set(parsed.hello.extensions) == {"greeting", "n"}
    with pytest.raises(WireError, match="not a key of its own"):
        encode_body({"extensions": {"x": 1}}, case="hello")  # the map is not a key of its own


def test_cases_by_instruction() -> None:
    assert body_case(pb.FORWARD, typed=True) == "forward" and body_case(pb.INFER, typed=True) == "forward"
    assert body_case(pb.RESULT, pb.BACKWARD, typed=True) == "backward_reply"
    assert body_case(pb.FORWARD) == "value"  # a channel of another protocol: untyped
    assert body_case(pb.HANDSHAKE) == "hello" and body_case(pb.RESULT, pb.HANDSHAKE) == "welcome"
    assert body_case(pb.ERROR) == "error" and body_case(pb.RESULT, pb.CLOSE) == "close_reply"
    assert expected_case(pb.STATE, typed=True) == "state" and expected_case(pb.STATE, typed=False) is None


def test_a_protocol_1_frame_is_refused_with_the_versions_named() -> None:
    enc = encode_message(_forward(), chunk_size=1 << 20)
    frame = next(iter(enc.frames()))
    frame.header.protocol_version = 1
    with pytest.raises(WireError, match=f"unsupported protocol version 1.*{PROTOCOL_VERSION}"):
        Reassembler().add(frame)


def test_the_split_server_refuses_an_untyped_instruction_body(split_server) -> None:  # noqa: ANN001
    """A FORWARD whose body is an untyped Value: INVALID_ARGUMENT naming the message to use, and the
    session goes on serving."""
    from lightning_split.channel import RemoteError
    from lightning_split.split.connect import open_split
    from lightning_split.split.spec import SplitSpec
    from lightning_split.wire import MessageType
    from tests.split_cases import MLP as source

    spec = SplitSpec(cut=1, shape="u_shape", end=3)
    address, tls_for = split_server(source, spec)
    remote = open_split(address, "alice", tls_for("alice"), source=source, spec=spec)
    try:
        client = remote.client
        client.welcome["typed_bodies"] = False  # this client now writes untyped Values
        with pytest.raises(RemoteError) as err:
            client.request(MessageType.INFER, {"hidden": torch.randn(2, 32)})
        assert err.value.code.name == "INVALID_ARGUMENT" and "forward message" in err.value.message
        client.welcome["typed_bodies"] = True
        out = client.request(MessageType.INFER, {"hidden": torch.randn(2, 32)})
        assert "output" in out.body
    finally:
        remote.close()


def test_markers_are_values_of_their_own_and_strings_stay_strings() -> None:
    from lightning_split.wire.markers import KV_CACHE, GradInputRef

    args = (KV_CACHE, GradInputRef(0), GradInputRef(7), "<kv-cache>", "<grad-input:0>")
    block = {"extra": {"odd": args}}
    back = _round_trip({"hidden": torch.ones(1, 1, 2), "block": block}, "forward")
    assert back["block"] == block and isinstance(back["block"]["extra"]["odd"][3], str)
    meta, _ = encode_body({"block": block}, case="forward")
    kinds = [v.WhichOneof("kind") for v in pb.PayloadMeta.FromString(meta).forward.block.extra["odd"].tuple.items]
    assert kinds == ["marker", "marker", "marker", "string_value", "string_value"]
    with pytest.raises(WireError, match="outside"):
        encode_body({"block": {"rotary": (GradInputRef(-1),)}}, case="forward")
    unset = pb.PayloadMeta()
    unset.forward.block.extra["odd"].marker.SetInParent()  # a marker of no kind
    with pytest.raises(WireError, match="marker.kind"):
        decode_body(unset.SerializeToString(), b"")
