"""The hand-built split of ``benchmarks/train.py``: what a PyTorch user writes with torch.distributed.

Two spawned processes, gloo over TCP, no TLS, no authentication, no overlap of transfer and
compute: rank 0 runs embeddings + blocks[:cut] and its AdamW, rank 1 the remaining blocks, ln_f,
the LM head, the loss and its own AdamW. Per step, rank 0 sends the labels and the activation,
rank 1 sends back the activation's gradient (then steps while rank 0 runs its backward); the loss
stays where it is computed (rank 1 reports it at the end, as ``../shared/baselines/naive_split.py``
never sends it).

Written to be at least as fast as naive_split.py (the reference): host buffers allocated once and
pinned on CUDA, no host allocation per step, non-blocking host-to-device copies into device buffers
allocated once, positions built once; the same precision as the other rows (fp32 weights, bf16
autocast with --dtype bf16); on the wire fp32 (exact, as ours by default), bf16 (``wire="bf16"``,
as ours with lossy bf16 compression), sent as raw 16-bit words like naive_split's WIRE=bf16, or
int8 (``wire="int8"``, as ours with lossy int8). On a CPU, an fp32 activation and its gradient go
to gloo straight from the tensors autograd uses.

``wire="int8"``, both ways (activation up, gradient down): our codec, written out here (``_Int8``),
so that the comparison is about the system and not the codec: block-wise absmax, a float32 scale
``absmax / 127`` per block of 128 values and ``round(x / scale)`` as int8, packed as our INT8_BLOCK
(the scales, then the values) into one uint8 buffer and sent with one ``dist.send``. Quantised on the
sending rank's device into device buffers made once, then copied into a host buffer made once (pinned
on CUDA; on a CPU the device buffer is the host buffer); dequantised on the receiver's device into a
buffer made once. Unlike ours: no error feedback on the gradient, and a non-finite value is not
sent exact (it spoils its block).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
from typing import Any

import torch
from _common import autocast, random_batches, sync
from link import enter_netns

from lightning_split.split.build import ModelSource, build_model

LR = 1e-4
WIRE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}  # int8: _Int8 packs it
INT8_BLOCK = 128  # CompressionConfig.int8_block_size's default
_TINY = torch.finfo(torch.float32).tiny


def _blocks(blocks: Any, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        out = block(x)
        x = out[0] if isinstance(out, tuple) else out
    return x


class _Wire:
    """The host buffers of one direction pair, allocated once (pinned on CUDA)."""

    def __init__(self, shape: tuple[int, ...], wire: torch.dtype, device: torch.device) -> None:
        self.pinned = device.type == "cuda"
        self.act = torch.empty(shape, dtype=wire, pin_memory=self.pinned)
        self.grad = torch.empty(shape, dtype=wire, pin_memory=self.pinned)
        self.labels = torch.empty(shape[:2], dtype=torch.long, pin_memory=self.pinned)
        self.device = device
        self._dev: dict[str, torch.Tensor] = {}

    @staticmethod
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # gloo: bf16 as 16-bit words

    def out(self, t: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """``t`` as sent: itself when gloo can take it as it is, else copied into ``buf``."""
        if t.device.type == "cpu" and t.dtype == buf.dtype and t.is_contiguous():
            return self.raw(t)
        buf.copy_(t)  # device-to-host (blocking: the send needs it) and/or the cast to the wire dtype
        return self.raw(buf)

    def into(self, name: str, buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``buf`` received, as a tensor of ``dtype`` on the device (a buffer of its own, made once)."""
        if self.device.type == "cpu" and buf.dtype == dtype:
            return buf
        if name not in self._dev:
            self._dev[name] = torch.empty(buf.shape, dtype=dtype, device=self.device)
        return self._dev[name].copy_(buf, non_blocking=self.pinned)


class _Int8:
    """Block-wise absmax int8 of one tensor shape, our INT8_BLOCK layout (``ceil(n / block)`` float32
    scales, then ``n`` int8 values) in one uint8 buffer; every buffer allocated once."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, pinned: bool, block: int = INT8_BLOCK) -> None:
        n = 1
        for d in shape:
            n *= d
        nb = -(-n // block)
        self.shape, self.n, self.device, self.pinned = shape, n, device, pinned
        self.host = torch.empty(4 * nb + n, dtype=torch.uint8, pin_memory=pinned)  # what gloo sends / receives
        self.packed = self.host if device.type == "cpu" else torch.empty_like(self.host, device=device)
        self.scales = self.packed[: 4 * nb].view(torch.float32)
        self.values = self.packed[4 * nb :].view(torch.int8)
        self.work = torch.zeros(nb, block, device=device)  # x as float32, a last partial block zero-padded
        self.tmp = torch.empty_like(self.work)
        self.safe = torch.empty(nb, device=device)
        self._out: dict[torch.dtype, torch.Tensor] = {}

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        """The packed bytes of ``t`` in the host buffer, ready for ``dist.send``."""
        flat, n = self.work.view(-1), self.n
        flat[:n].copy_(t.reshape(-1))
        torch.abs(self.work, out=self.tmp)
        torch.amax(self.tmp, dim=1, out=self.safe)
        torch.div(self.safe, 127.0, out=self.scales)
        torch.clamp(self.scales, min=_TINY, out=self.safe)  # a scale-0 block is all zeros: any divisor
        torch.div(self.work, self.safe[:, None], out=self.tmp)
        self.tmp.clamp_(-127.0, 127.0).round_()
        self.values.copy_(self.tmp.view(-1)[:n])
        if self.packed is not self.host:
            self.host.copy_(self.packed)  # device-to-host, blocking: the send needs it
        return self.host

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        """The host buffer (just received) dequantised on the device, as ``dtype`` in a buffer of its own."""
        if self.packed is not self.host:
            self.packed.copy_(self.host, non_blocking=self.pinned)
        flat, n = self.work.view(-1), self.n
        flat[:n].copy_(self.values)
        self.work.mul_(self.scales[:, None])
        if dtype not in self._out:
            self._out[dtype] = torch.empty(self.shape, dtype=dtype, device=self.device)
        return self._out[dtype].view(-1).copy_(flat[:n]).view(self.shape)


def wire_bytes(conf: dict[str, Any], hidden: int) -> tuple[int, int]:
    """(rank 0 -> rank 1, rank 1 -> rank 0) payload bytes of one step: labels and activation up, its gradient down."""
    n = conf["batch"] * conf["seq"] * hidden
    act = 4 * -(-n // INT8_BLOCK) + n if conf["wire"] == "int8" else n * WIRE[conf["wire"]].itemsize
    return conf["batch"] * conf["seq"] * 8 + act, act


def _rank(rank: int, port: int, conf: dict[str, Any], source: dict, out: Any) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    if rank == 1:
        enter_netns(conf["server_netns"])  # across the link, when there is one
    if conf["ifnames"]:
        os.environ["GLOO_SOCKET_IFNAME"] = conf["ifnames"][rank]
    device = torch.device(conf["device"] if rank == 0 else conf["server_device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # its pinned buffers and context on its own GPU
    dist.init_process_group("gloo", init_method=f"tcp://{conf['master']}:{port}", rank=rank, world_size=2)
    model = build_model(ModelSource.from_dict(source), device=device).train()
    t, cut, dtype = model.transformer, conf["cut"], conf["dtype"]
    mine = [t.wte, t.wpe, *t.h[:cut]] if rank == 0 else [*t.h[cut:], t.ln_f, model.lm_head]
    opt = torch.optim.AdamW(list({id(p): p for m in mine for p in m.parameters()}.values()), lr=LR)
    b, s, h = conf["batch"], conf["seq"], model.config.n_embd
    wire = _Wire((b, s, h), WIRE[conf["wire"]], device)
    int8 = conf["wire"] == "int8"
    if int8:  # the fp32 buffers of _Wire stay unused (but labels)
        act8, grad8 = _Int8((b, s, h), device, wire.pinned), _Int8((b, s, h), device, wire.pinned)
    steps = conf["warmup"] + conf["steps"]
    if rank == 0:
        batches = random_batches(steps, b, s, model.config.vocab_size, str(device))
        pos = torch.arange(s, device=device)[None]
        times = []
        for ids in batches:
            sync(device)
            t0 = time.perf_counter()
            dist.send(wire.out(ids, wire.labels), dst=1)  # first: it crosses while the blocks run
            with autocast(device, dtype):
                x = _blocks(t.h[:cut], t.drop(t.wte(ids) + t.wpe(pos)))
            if int8:
                dist.send(act8.encode(x.detach()), dst=1)
                dist.recv(grad8.host, src=1)
                x.backward(grad8.decode(x.dtype))
            else:
                dist.send(wire.out(x.detach(), wire.act), dst=1)
                dist.recv(wire.raw(wire.grad), src=1)
                x.backward(wire.into("grad", wire.grad, x.dtype))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - t0)
        out.put((0, times))
    else:
        losses = []
        for _ in range(steps):
            dist.recv(wire.labels, src=0)
            dist.recv(act8.host if int8 else wire.raw(wire.act), src=0)
            labels = wire.into("labels", wire.labels, torch.long)
            x = act8.decode(torch.float32) if int8 else wire.into("act", wire.act, torch.float32)
            x = x.detach().requires_grad_(True)
            with autocast(device, dtype):
                logits = model.lm_head(t.ln_f(_blocks(t.h[cut:], x)))
            logits = logits.float()[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
            loss.backward()
            # before the step: rank 0's backward overlaps it
            dist.send(grad8.encode(x.grad) if int8 else wire.out(x.grad, wire.grad), dst=0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        out.put((1, [float(v) for v in losses]))
    dist.barrier()
    dist.destroy_process_group()


def run(conf: dict[str, Any], source: ModelSource, link: Any = None) -> tuple[list[float], list[float]]:
    """(step seconds on rank 0, losses) of every step, warm-up included. ``conf``: device,
    server_device, dtype, cut, batch, seq, steps, warmup, wire (fp32, bf16, int8); ``link``: rank 1 runs
    across it."""
    master = link.client_host if link is not None else "127.0.0.1"
    with socket.socket() as sock:
        sock.bind((master, 0))
        port = sock.getsockname()[1]
    conf = {**conf, "master": master, "server_netns": link.server_ns_path if link is not None else None,
            "ifnames": (link.client_iface, link.server_iface) if link is not None else None}
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, conf, source.to_dict(), out), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < len(procs):
            try:
                rank, payload = out.get(timeout=5)
                results[rank] = payload
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError(f"a hand-built rank failed: exit codes {[p.exitcode for p in procs]}") from None
    finally:
        for p in procs:
            p.join(60)
    return results[0], results[1]
