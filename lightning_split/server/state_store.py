"""Saving and restoring a session's server state on the server's own disk.

The model owner's weights never leave the server: a client's checkpoint records only a tag, and
the trainable segment's weights and optimizer state for that tag are kept here, as safetensors
(tensors) plus JSON (everything else). No pickle, no ``torch.load``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def _check_name(kind: str, value: str) -> str:
    if not _SAFE.match(value) or value in (".", ".."):
        raise ValueError(f"{kind} {value!r} may use letters, digits, '_', '.', '-' only")
    return value


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
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


class StateStore:
    """``root/<node_id>/<tag>.safetensors`` and ``.json``: one saved state per client and tag."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _paths(self, node_id: str, tag: str) -> tuple[Path, Path]:
        folder = self.root / _check_name("node id", node_id)
        base = folder / _check_name("tag", tag)
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def save(self, node_id: str, tag: str, state: dict[str, Any]) -> None:
        tensors_path, meta_path = self._paths(node_id, tag)
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten(state, "", tensors)
        save_file(tensors, str(tensors_path))
        meta_path.write_text(json.dumps(skeleton))

    def load(self, node_id: str, tag: str) -> dict[str, Any]:
        tensors_path, meta_path = self._paths(node_id, tag)
        if not meta_path.exists():
            raise FileNotFoundError(f"no saved server state {tag!r} for {node_id!r}")
        tensors = load_file(str(tensors_path))
        state = _unflatten(json.loads(meta_path.read_text()), tensors)
        # JSON turns integer optimizer-state keys into strings; give them back.
        if isinstance(state.get("optimizer"), dict):
            state["optimizer"]["state"] = {int(k): v for k, v in state["optimizer"]["state"].items()}
        return state

    def delete(self, node_id: str, tag: str) -> bool:
        """Forget a saved state (its checkpoint was removed on the client); False if there was none."""
        found = False
        for path in self._paths(node_id, tag):
            if path.exists():
                path.unlink()
                found = True
        return found
