"""The CUDA path: client and server on the GPU; tensors go device -> host -> wire and back.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``. The
server runs in its own process, as in deployment (and as in the GPU benchmarks).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_split import SplitSpec, SplitStrategy
from lightning_split.examples.modules import CausalLM
from lightning_split.split.build import build_model
from lightning_split.split.connect import open_split
from tests.split_cases import GPT2, LLAMA
from tests.test_strategy import LossRecorder, _gpt2_batches

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def _exact(exact_matmuls):  # noqa: ANN001 - every test here compares with fp32 on the same GPU
    yield


@pytest.mark.parametrize("shape", ["u_shape", "two_part"])
def test_cuda_forward_backward_and_generation(shape, split_server_process):
    spec = SplitSpec(cut=1, end=3 if shape == "u_shape" else None, shape=shape)
    local = build_model(LLAMA, device="cuda").eval()
    address, tls_for = split_server_process(LLAMA, spec, device="cuda")
    remote = open_split(address, "alice", tls_for("alice"), source=LLAMA, spec=spec, device="cuda",
                        micro_batches=2)
    try:
        model = remote.model.eval()
        assert all(p.is_cuda for p in model.parameters())
        ids = torch.randint(0, 128, (4, 16), device="cuda")
        out_l = local(input_ids=ids, labels=ids)
        out_r = model(input_ids=ids, labels=ids)
        torch.testing.assert_close(out_r.loss, out_l.loss, rtol=1e-4, atol=1e-5)
        if shape == "u_shape":  # a two-part split with labels returns the loss alone
            assert out_r.logits.is_cuda
        out_l.loss.backward()
        out_r.loss.backward()
        for name, p in model.named_parameters():
            ref = dict(local.named_parameters())[name]
            if p.grad is not None and name != "model.embed_tokens.weight":
                torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-5, msg=name)
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:2, :6], **kw), local.generate(ids[:2, :6], **kw))
    finally:
        remote.close()


def test_cuda_trainer_matches_local(split_server_process):
    spec = SplitSpec(cut=1, end=3)
    local = CausalLM(lr=3e-3, optimizer="Adam")
    local.model = build_model(GPT2)
    rec_l = LossRecorder()
    L.Trainer(max_steps=4, accelerator="gpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, callbacks=[rec_l]).fit(local, _gpt2_batches())

    address, tls_for = split_server_process(GPT2, spec, device="cuda")
    strategy = SplitStrategy(address=address, node_id="alice", tls=tls_for("alice"), device="cuda:0", tail="trainable")
    rec_s = LossRecorder()
    L.Trainer(max_steps=4, accelerator="gpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, callbacks=[rec_s]).fit(CausalLM(lr=3e-3, optimizer="Adam"), _gpt2_batches())
    torch.testing.assert_close(torch.tensor(rec_s.losses), torch.tensor(rec_l.losses), rtol=1e-4, atol=1e-5)
    strategy.close()


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_deferred_device_copies_and_pinned_receive(device):
    """A CUDA tensor's device->host copy is only queued at encode time (the frames wait for it);
    the receiver's payload lands in pinned memory and reaches the GPU by an async copy. On a GPU
    other than the thread's current one, the wait is on that GPU's stream."""
    from lightning_split.wire import Message, MessageType, Reassembler, encode_message

    if torch.device(device).index >= torch.cuda.device_count():
        pytest.skip("needs a second GPU")
    x = torch.randn(2049, 4099, device=device)
    body = {"a": x, "b": x[:, ::2].bfloat16(), "n": 3}
    with torch.cuda.device(device):
        torch.cuda._sleep(50_000_000)  # the copies queue behind ~25 ms of spinning: still running when read
    encoded = encode_message(Message(type=MessageType.FORWARD, body=body), chunk_size=1 << 16, defer=True)
    x.add_(1.0)  # queued after the copies on the same stream: the wire still carries the old values
    receiver = Reassembler(checksum=False, pin_memory=True, device=device)
    got = None
    for frame in encoded.frames():
        got = receiver.add(frame) or got
    assert got is not None and got.body["n"] == 3
    torch.testing.assert_close(got.body["a"], x - 1.0)
    torch.testing.assert_close(got.body["b"], (x - 1.0)[:, ::2].bfloat16())
    assert got.body["a"].device == torch.device(device)


@pytest.mark.parametrize("server_device", ["cuda:0", "cuda:1"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_cuda_training_graphs_match_local(autocast, server_device, split_server):
    """Fused training micro-batches whose shape recurs replay one CUDA graph (forward, loss and
    backward): the losses and both sides' gradients equal the whole model's, over three calls;
    also with the server's segment on another GPU than the client's (not the thread's current one)."""
    if torch.device(server_device).index >= torch.cuda.device_count():
        pytest.skip("needs a second GPU")
    spec = SplitSpec(cut=1, shape="two_part")
    local = build_model(GPT2, device="cuda").train()
    local.lm_head.weight = torch.nn.Parameter(local.lm_head.weight.detach().clone())  # untied, like the split
    address, tls_for = split_server(GPT2, spec, device=server_device)
    remote = open_split(address, "alice", tls_for("alice"), source=GPT2, spec=spec, device="cuda",
                        tail={"mode": "trainable"}, micro_batches=2)
    g = torch.Generator().manual_seed(5)
    precision = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    # bf16: micro-batches of 2 rows may take other GEMM kernels than the whole batch of 4.
    tol = dict(rtol=2e-2, atol=1e-3) if autocast else dict(rtol=1e-4, atol=1e-5)
    try:
        model = remote.model.train()
        for _ in range(3):
            ids = torch.randint(0, 128, (4, 16), generator=g).cuda()
            with precision:
                loss_l = local(input_ids=ids, labels=ids).loss
                loss_r = model(input_ids=ids, labels=ids).loss
            loss_l.backward()
            loss_r.backward()
            torch.testing.assert_close(loss_r, loss_l, **tol)
        remote.runner.confirm()
        segment = split_server.segment(remote)
        assert segment.train_graphs.stats["captures"] == 1 and segment.train_graphs.stats["graph_steps"] == 5
        for name, p in model.named_parameters():
            if p.grad is not None and name != "transformer.wte.weight":  # tied: the server's copy is untied
                torch.testing.assert_close(p.grad, dict(local.named_parameters())[name].grad, msg=name, **tol)
        for i, block in enumerate(segment.module.blocks):
            for (n, p), (_, q) in zip(block.named_parameters(), local.transformer.h[spec.cut + i].named_parameters(),
                                      strict=True):
                torch.testing.assert_close(p.grad.cuda(), q.grad, msg=f"server block {i} {n}", **tol)
    finally:
        remote.close()
