"""The server's saved states: atomic and durable writes, crash leftovers cleaned at start, and a
missing or damaged state reported by tag and file (DATA_LOSS over the wire, never INTERNAL)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from lightning_split.channel import RemoteError
from lightning_split.server import state_store
from lightning_split.server.state_store import StateDamaged, StateStore
from lightning_split.split.connect import open_split
from lightning_split.split.spec import SplitSpec
from lightning_split.wire import MessageType
from tests.split_cases import GPT2


def _state(value: float) -> dict[str, Any]:
    """A state shaped like SessionSegment.state_dict(): params, an optimizer with int keys, a step."""
    w = torch.full((3, 2), value)
    return {"mode": "trainable", "last_step": int(value),
            "params": {"block.weight": w, "block.bias": torch.zeros(2)},
            "optimizer": {"state": {0: {"step": torch.tensor(value), "exp_avg": w * 2}},
                          "param_groups": [{"lr": 0.1, "params": [0, 1], "betas": (0.9, 0.99)}]}}


def _assert_state(got: dict[str, Any], value: float) -> None:
    want = _state(value)
    assert got["last_step"] == want["last_step"] and got["mode"] == "trainable"
    for name, tensor in want["params"].items():
        assert torch.equal(got["params"][name], tensor), name
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], want["optimizer"]["state"][0]["exp_avg"])
    assert got["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _tensors_file(root: Path, node: str, tag: str) -> Path:
    return root / node / json.loads((root / node / f"{tag}.json").read_text())["tensors"]


def test_save_load_replace_and_delete(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save("alice", "t1", _state(1.0))
    _assert_state(store.load("alice", "t1"), 1.0)
    store.save("alice", "t1", _state(2.0))  # over the same tag: replaced, the old tensors gone
    _assert_state(store.load("alice", "t1"), 2.0)
    assert len(_files(tmp_path / "alice")) == 2  # one JSON, one tensors file; no temporary file left
    store.save("alice", "t1.v2", _state(3.0))  # a dotted tag is a tag of its own
    _assert_state(store.load("alice", "t1"), 2.0)
    (tmp_path / "alice" / ".t1.json.tmp-0123456789abcdef").write_text("{")  # a crashed save's leftover
    assert store.delete("alice", "t1")
    assert _files(tmp_path / "alice") == sorted(["t1.v2.json", _tensors_file(tmp_path, "alice", "t1.v2").name])
    assert not store.delete("alice", "t1")


@pytest.mark.parametrize("failing_call", [1, 2], ids=["tensors_rename", "json_rename"])
def test_a_save_that_fails_midway_leaves_the_old_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       failing_call: int) -> None:
    """A crash at either rename of a save over an existing tag: the old state loads, intact, and
    nothing half-written is ever loadable or left behind."""
    store = StateStore(tmp_path)
    store.save("alice", "t", _state(1.0))
    before = _files(tmp_path / "alice")
    real_replace, calls = os.replace, []

    def replace(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(state_store.os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        store.save("alice", "t", _state(2.0))
    monkeypatch.undo()
    _assert_state(store.load("alice", "t"), 1.0)
    assert _files(tmp_path / "alice") == before
    with pytest.raises(FileNotFoundError):
        store.load("alice", "new")
    store.save("alice", "t", _state(2.0))  # and the next save goes through
    _assert_state(StateStore(tmp_path).load("alice", "t"), 2.0)


def test_a_crash_between_the_files_leaves_no_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors renamed into place but the process killed before its JSON: no state exists,
    and the next start removes the tensors file."""
    store = StateStore(tmp_path)
    monkeypatch.setattr(state_store.Path, "unlink", lambda *a, **k: None)  # a kill runs no cleanup
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(".json"):
            raise OSError("killed")
        real_replace(src, dst)

    monkeypatch.setattr(state_store.os, "replace", replace)
    with pytest.raises(OSError, match="killed"):
        store.save("alice", "t", _state(1.0))
    monkeypatch.undo()
    assert any(n.endswith(".safetensors") for n in _files(tmp_path / "alice"))
    with pytest.raises(FileNotFoundError, match="'t'"):
        store.load("alice", "t")
    StateStore(tmp_path)
    assert _files(tmp_path / "alice") == []


def test_partial_files_are_removed_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore(tmp_path)
    store.save("alice", "keep", _state(1.0))
    store.save("bob", "keep", _state(2.0))
    kept = {"alice": _files(tmp_path / "alice"), "bob": _files(tmp_path / "bob")}
    leftovers = {
        tmp_path / "alice" / ".keep.0123456789abcdef.safetensors.tmp-fedcba9876543210": 100,  # a temp file
        tmp_path / "alice" / ".other.json.tmp-00112233445566aa": 7,
        tmp_path / "alice" / "gone.0123456789abcdef.safetensors": 50,  # tensors without their JSON
        tmp_path / "bob" / "keep.00000000000000ff.safetensors": 60,  # tensors its JSON does not name
    }
    for path, size in leftovers.items():
        path.write_bytes(b"x" * size)
    with caplog.at_level(logging.INFO, logger=state_store.__name__):
        store = StateStore(tmp_path)
    assert {"alice": _files(tmp_path / "alice"), "bob": _files(tmp_path / "bob")} == kept
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == len(leftovers)
    for path, size in leftovers.items():
        assert any(path.name in line and f"{size} bytes" in line for line in lines), (path, lines)
    _assert_state(store.load("alice", "keep"), 1.0)
    _assert_state(store.load("bob", "keep"), 2.0)
    assert StateStore(tmp_path).clean_partial() == 0


def test_a_missing_state_names_tag_node_and_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        store.load("alice", "step3-abc")
    message = str(err.value)
    assert "'step3-abc'" in message and "'alice'" in message and "alice/step3-abc.json" in message
    assert str(tmp_path) not in message  # relative to the root: the server's layout stays its own


def _damage(kind: str, root: Path) -> str:
    """Damage alice's state 't' in one way; the file the error must name."""
    meta, tensors = root / "alice" / "t.json", _tensors_file(root, "alice", "t")
    if kind == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:5])
    elif kind == "cut_short":
        tensors.write_bytes(tensors.read_bytes()[:-8])
    elif kind == "tensors_lost":
        tensors.unlink()
    elif kind == "bad_json":
        meta.write_text('{"tensors": ')
    elif kind == "missing_key":
        record = json.loads(meta.read_text())
        record["state"]["__dict__"].append(["extra", {"__tensor__": "not.in.file"}])
        meta.write_text(json.dumps(record))
    return f"alice/{tensors.name}" if kind in ("truncated", "cut_short", "tensors_lost", "missing_key") \
        else "alice/t.json"


@pytest.mark.parametrize("kind", ["truncated", "cut_short", "tensors_lost", "bad_json", "missing_key"])
def test_a_damaged_state_names_tag_and_file(tmp_path: Path, kind: str) -> None:
    store = StateStore(tmp_path)
    store.save("alice", "t", _state(1.0))
    file = _damage(kind, tmp_path)
    with pytest.raises(StateDamaged) as err:
        store.load("alice", "t")
    message = str(err.value)
    assert "'t'" in message and file in message and "damaged" in message, message
    assert "\n" not in message
    StateStore(tmp_path)  # a start keeps a damaged state's files for the operator to look at
    assert (tmp_path / "alice" / "t.json").exists()


SPEC = SplitSpec(cut=1, shape="two_part")
TRAIN = {"mode": "trainable", "optimizer": {"name": "SGD", "lr": 0.1}}


def test_a_damaged_state_is_data_loss_over_the_wire_and_the_server_serves_on(split_server, tmp_path: Path) -> None:
    address, tls_for = split_server(GPT2, SPEC)
    remote = open_split(address, "alice", tls_for("alice"), source=GPT2, spec=SPEC, tail=TRAIN, micro_batches=1)
    try:
        client, segment = remote.client, split_server.segment(remote)
        assert client.request(MessageType.STATE, {"op": "save", "tag": "good"}).body["tag"] == "good"
        client.request(MessageType.STATE, {"op": "save", "tag": "bad"})
        saved = {n: p.detach().clone() for n, p in segment.module.named_parameters()}
        with torch.no_grad():
            for p in segment.module.parameters():
                p.add_(1.0)
        root = tmp_path / "server-state"
        tensors = _tensors_file(root, "alice", "bad")
        tensors.write_bytes(tensors.read_bytes()[:5])

        with pytest.raises(RemoteError) as err:
            client.request(MessageType.STATE, {"op": "load", "tag": "bad"})
        assert err.value.code == grpc.StatusCode.DATA_LOSS, err.value
        assert "'bad'" in err.value.message and f"alice/{tensors.name}" in err.value.message
        assert "Traceback" not in err.value.message and "\n" not in err.value.message
        with pytest.raises(RemoteError) as err:
            client.request(MessageType.STATE, {"op": "load", "tag": "never"})
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "alice/never.json" in err.value.message

        # The session serves on: the good state loads and restores the weights it saved.
        client.request(MessageType.STATE, {"op": "load", "tag": "good"})
        for name, p in segment.module.named_parameters():
            assert torch.equal(p, saved[name]), name
        assert client.request(MessageType.STATE, {"op": "delete", "tag": "bad"}).body["deleted"]
        assert sorted(p.name for p in (root / "alice").glob("*.json")) == ["good.json"]
    finally:
        remote.close()
