"""Saving and restoring a session's server state on the server's own disk.

The model owner's weights never leave the server: a client's checkpoint records only a tag, and
the trainable segment's weights and optimizer state for that tag are kept here, as safetensors
(tensors) plus JSON (everything else). No pickle, no ``torch.load``.

On disk, per client node: ``<tag>.json`` (the commit record: a state exists exactly when its JSON
does) names ``<tag>.<version>.safetensors``. Every file is written under a temporary name
(``.<name>.tmp-<random>``), fsynced, renamed into place and its folder fsynced, so a crash leaves
either the old state or the new one, never a mix: a save writes fresh tensors under a new version
first, then swaps the JSON, then drops the tensors the old JSON named. What a crash leaves behind
(temporary files, tensors no JSON names) is removed when the store is opened.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_TEMP = re.compile(r"^\.(?P<final>.+)\.tmp-[0-9a-f]{16}$")  # a file still being written
_TENSORS = re.compile(r"^(?P<tag>[A-Za-z0-9_.-]+)\.[0-9a-f]{16}\.safetensors$")


class StateDamaged(ValueError):
    """A saved state whose files are there but cannot be read back (truncated, corrupt, incomplete)."""


def _check_name(kind: str, value: str) -> str:
    if not _SAFE.match(value) or value in (".", ".."):
        raise ValueError(f"{kind} {value!r} may use letters, digits, '_', '.', '-' only")
    return value


def _tag_of(name: str) -> str | None:
    """The tag a file of a node's folder belongs to (its temporary files included), or None."""
    temp = _TEMP.match(name)
    final = temp["final"] if temp else name
    if final.endswith(".json"):
        return final[: -len(".json")]
    tensors = _TENSORS.match(final)
    return tensors["tag"] if tensors else None


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable: the data's fsync does not cover its name."""
    if os.name == "posix":  # elsewhere a folder cannot be opened; NTFS journals its renames itself
        _fsync(folder)


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """``write`` a temporary file beside ``path``, fsync it, rename it onto ``path``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    try:
        write(str(tmp))
        _fsync(tmp, os.O_RDWR)  # the data reaches the disk before its name can
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # an error, not a crash: leave nothing for the next start
        raise
    _fsync_dir(path.parent)


def _flatten(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors in a nested structure by references, collecting them in ``tensors``."""
    if isinstance(state, torch.Tensor):
        key = prefix or "_"
        tensors[key] = state.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(state, dict):
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}", tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        items = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
        return {"__tuple__": items} if isinstance(state, tuple) else items
    return state


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            if obj["__tensor__"] not in tensors:
                raise KeyError(f"tensor {obj['__tensor__']!r} is missing")
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


class StateStore:
    """``root/<node_id>/<tag>.json`` + ``<tag>.<version>.safetensors``: one state per client and tag."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.clean_partial()

    def _folder(self, node_id: str) -> Path:
        return self.root / _check_name("node id", node_id)

    def _meta(self, node_id: str, tag: str) -> Path:
        return self._folder(node_id) / f"{_check_name('tag', tag)}.json"

    def _damaged(self, tag: str, path: Path, error: BaseException) -> StateDamaged:
        text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        reason = (text.strip().splitlines() or [type(error).__name__])[0][:300]
        return StateDamaged(f"saved server state {tag!r} is damaged: {path.relative_to(self.root)}: {reason}")

    @staticmethod
    def _committed_tensors(meta: Path, tag: str) -> str | None:
        """The tensors file name ``meta`` commits to, if it is readable and names one of ``tag``'s."""
        try:
            name = json.loads(meta.read_text())["tensors"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        match = _TENSORS.match(name) if isinstance(name, str) else None
        return name if match and match["tag"] == tag else None

    def save(self, node_id: str, tag: str, state: dict[str, Any]) -> None:
        meta = self._meta(node_id, tag)
        folder = meta.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
        tensors: dict[str, torch.Tensor] = {}
        record = {"tensors": f"{tag}.{secrets.token_hex(8)}.safetensors", "state": _flatten(state, "", tensors)}
        previous = self._committed_tensors(meta, tag)
        new_tensors = folder / record["tensors"]
        _write_atomic(new_tensors, lambda tmp: save_file(tensors, tmp))
        try:  # the commit: until this rename, a load still finds the old JSON and its old tensors
            _write_atomic(meta, lambda tmp: Path(tmp).write_text(json.dumps(record)))
        except BaseException:
            new_tensors.unlink(missing_ok=True)
            raise
        if previous is not None and previous != record["tensors"]:
            (folder / previous).unlink(missing_ok=True)

    def load(self, node_id: str, tag: str) -> dict[str, Any]:
        meta = self._meta(node_id, tag)
        try:
            record = json.loads(meta.read_text())
            name, skeleton = record["tensors"], record["state"]
            if not isinstance(name, str) or not (m := _TENSORS.match(name)) or m["tag"] != tag:
                raise ValueError(f"names no tensors file of this tag: {name!r}")
        except FileNotFoundError:
            raise FileNotFoundError(f"no saved server state {tag!r} for node {node_id!r} "
                                    f"({meta.relative_to(self.root)} does not exist)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, not JSON, not our record
            raise self._damaged(tag, meta, e) from e
        tensors_path = meta.parent / name
        try:
            tensors = load_file(str(tensors_path))
        except (OSError, SafetensorError) as e:  # missing, truncated, or not safetensors at all
            raise self._damaged(tag, tensors_path, e) from e
        try:
            state = _unflatten(skeleton, tensors)
            # JSON turns integer optimizer-state keys into strings; give them back.
            if isinstance(state.get("optimizer"), dict):
                state["optimizer"]["state"] = {int(k): v for k, v in state["optimizer"]["state"].items()}
        except KeyError as e:  # a tensor the JSON names that the file lacks
            raise self._damaged(tag, tensors_path, e) from e
        except (ValueError, TypeError, AttributeError) as e:  # JSON that parses but is no state of ours
            raise self._damaged(tag, meta, e) from e
        return state

    def delete(self, node_id: str, tag: str) -> bool:
        """Forget a saved state (its checkpoint was removed on the client); False if there was none."""
        meta = self._meta(node_id, tag)
        if not meta.parent.is_dir():
            return False
        # The JSON goes first: without it the state is gone, whatever a crash leaves after it.
        files = sorted((p for p in meta.parent.iterdir() if _tag_of(p.name) == tag), key=lambda p: p != meta)
        for path in files:
            path.unlink(missing_ok=True)
        if files:
            _fsync_dir(meta.parent)
        return bool(files)

    def clean_partial(self) -> int:
        """Remove what a crash left: temporary files, and tensors files that no JSON commits to."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for path in sorted(folder.iterdir()):
                tensors = _TENSORS.match(path.name)
                orphan = tensors is not None and not self._committed_by_json(folder, tensors["tag"], path.name)
                if not (_TEMP.match(path.name) or orphan) or not path.is_file():
                    continue
                size = path.stat().st_size
                path.unlink()
                removed += 1
                log.info("removed partial server state file %s (%d bytes)", path, size)
        return removed

    def _committed_by_json(self, folder: Path, tag: str, name: str) -> bool:
        meta = folder / f"{tag}.json"
        if not meta.exists():
            return False
        # A JSON that cannot be read keeps its files: load reports it as damaged, naming them.
        committed = self._committed_tensors(meta, tag)
        return committed is None or committed == name
