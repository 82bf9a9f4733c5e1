"""Shipping the client's part: safetensors bytes with a sha256, and an architecture fingerprint.

The server answers a LOAD request with the client part's tensors (parameters *and* buffers, the
non-persistent ones too: a skeleton built on the meta device has no values for them) serialised as
safetensors, a format that cannot run code on load. Tensors that are shared between modules (tied
embeddings) travel once; the aliases are restored on the client.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.nn as nn
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_parameter) for every parameter and buffer, aliases included."""
    out = [(n, p, True) for n, p in model.named_parameters(remove_duplicate=False)]
    out += [(n, b, False) for n, b in model.named_buffers(remove_duplicate=False)]
    return out


def fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and dtypes of every tensor: equal iff the architectures match."""
    rows = sorted(f"{n}|{tuple(t.shape)}|{t.dtype}|{int(p)}" for n, t, p in _named_tensors(model))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def pack_part(model: nn.Module) -> tuple[bytes, str]:
    """The model's tensors as safetensors bytes, and their sha256."""
    canonical: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor, _ in _named_tensors(model):
        key = id(tensor)
        if key in canonical:
            aliases[name] = canonical[key]
            continue
        canonical[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    data = safetensors_save(tensors, metadata={"aliases": json.dumps(aliases)})
    return data, hashlib.sha256(data).hexdigest()


def load_part(skeleton: nn.Module, data: bytes, sha256: str, device: str | torch.device = "cpu") -> None:
    """Fill a skeleton (usually on the meta device) with shipped tensors, in place.

    Every tensor the skeleton has must arrive with the same shape and dtype, and nothing else may.
    """
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError("shipped weights do not match their sha256 digest")
    shipped = safetensors_load(data)
    expected = {n: (t, is_param) for n, t, is_param in _named_tensors(skeleton)}
    aliases: dict[str, str] = {}
    # safetensors keeps metadata in its header; read it without a second parse of the tensors.
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    aliases = json.loads(header.get("__metadata__", {}).get("aliases", "{}"))

    missing = set(expected) - set(shipped) - set(aliases)
    unexpected = (set(shipped) | set(aliases)) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"shipped part does not fit the skeleton: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for name in list(shipped) + list(aliases):
        value = shipped[name] if name in shipped else shipped[aliases[name]]
        template, is_param = expected[name]
        if value.shape != template.shape or value.dtype != template.dtype:
            raise ValueError(
                f"{name}: shipped {tuple(value.shape)} {value.dtype}, "
                f"expected {tuple(template.shape)} {template.dtype}"
            )
    # Materialise each canonical tensor once, then point every alias at it.
    materialised: dict[str, torch.Tensor] = {}
    for name in list(shipped) + list(aliases):
        canonical = aliases.get(name, name)
        template, is_param = expected[name]
        if canonical not in materialised:
            value = shipped[canonical].to(device)
            materialised[canonical] = (
                nn.Parameter(value, requires_grad=template.requires_grad) if is_param else value
            )
        _set_tensor(skeleton, name, materialised[canonical], is_param)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if is_param:
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


def part_nbytes(model: nn.Module) -> int:
    """Bytes of parameter and buffer storage a model part holds (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for _, t, _ in _named_tensors(model):
        if id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
