"""The server's segment spread over several devices (``SplitService(devices=...)``, placement.py).

On a CPU the plan is checked for GPUs that are not there (the planner works on sizes only) and the
service runs with ``devices=["cpu", "cpu"]``; on a host with two GPUs the segment spread over both
matches the one-GPU server in fp32: training with each tail mode, a checkpoint resumed, generation.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_split import SplitSpec, SplitStrategy
from lightning_split.examples.modules import CausalLM
from lightning_split.server.placement import as_devices, plan_blocks
from lightning_split.split.build import ModelSource, build_model
from lightning_split.split.connect import open_split
from lightning_split.split.surgery import cut_model
from tests.split_cases import GPT2, LLAMA
from tests.test_strategy import LossRecorder, _gpt2_batches

TWO_GPUS = [torch.device("cuda:0"), torch.device("cuda:1")]


def _segment(source: ModelSource, spec: SplitSpec):  # noqa: ANN202
    model = build_model(source)
    return cut_model(model, spec.resolve(model)).segment


def test_plan_spreads_blocks_in_order_and_evenly():
    deep = ModelSource(LLAMA.target, {**LLAMA.config, "num_hidden_layers": 10}, seed=4)
    placement = plan_blocks(_segment(deep, SplitSpec(cut=1, end=9)), TWO_GPUS)  # 8 blocks, U-shape: no tail
    assert list(placement) == list(range(8))
    assert [d.index for d in placement.values()] == [0] * 4 + [1] * 4


def test_plan_counts_a_large_lm_head_on_the_last_device():
    """A two-part segment's tail (here an LM head as big as 4 blocks) leaves the last device fewer blocks."""
    config = {**LLAMA.config, "num_hidden_layers": 12, "vocab_size": 2304}
    segment = _segment(ModelSource(LLAMA.target, config, seed=4), SplitSpec(cut=1, shape="two_part"))  # 11 blocks
    head, block = segment.tail[-1].weight.numel(), sum(p.numel() for p in segment.blocks[0].parameters())
    assert 3 * block < head < 5 * block
    devices = [d.index for d in plan_blocks(segment, TWO_GPUS).values()]
    assert devices == sorted(devices) and devices.count(0) > devices.count(1) >= 1


def test_plan_on_one_device_and_device_names():
    segment = _segment(GPT2, SplitSpec(cut=1, end=3))
    assert set(plan_blocks(segment, [torch.device("cuda:3")]).values()) == {torch.device("cuda:3")}
    assert as_devices([0, "cuda:1", "cpu"]) == [torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cpu")]
    with pytest.raises(ValueError, match="at least one device"):
        as_devices([])


def test_place_by_hand_fills_ranges():
    """``{1: meta}``: block 0 stays, blocks 1.. and the tail follow the key (meta: no storage needed)."""
    segment = _segment(LLAMA, SplitSpec(cut=1, shape="two_part"))  # blocks 1..3 of the model
    segment.place({1: "meta"})
    assert [next(b.parameters()).device.type for b in segment.blocks] == ["cpu", "meta", "meta"]
    assert all(p.device.type == "meta" for p in segment.tail.parameters())


def test_service_spread_over_devices_matches_local(split_server):
    """The whole path through ``devices=[...]`` (two CPU 'devices': the moves are no-ops, the plan,
    build and placement code runs): loss and client gradients equal the local model's."""
    spec = SplitSpec(cut=1, shape="two_part")
    address, tls_for = split_server(LLAMA, spec, devices=["cpu", "cpu"])
    remote = open_split(address, "alice", tls_for("alice"), source=LLAMA, spec=spec)
    try:
        local = build_model(LLAMA)
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        out_r, out_l = remote.model(input_ids=ids, labels=ids).loss, local(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(out_r, out_l, rtol=1e-5, atol=1e-6)
    finally:
        remote.close()
    with pytest.raises(ValueError, match="not both"):
        split_server(LLAMA, spec, devices=[0, 1], device_map={0: "cpu"})


def test_replicas_share_out_sessions_and_each_batches_its_own(split_server):
    """``placement="replicate"``: four concurrent generating sessions go two to each copy of the
    segment, each copy batches its own sessions' decode steps, every session gets its local tokens;
    a closed session's place goes to the next one."""
    from tests.test_batching import _in_threads

    spec = SplitSpec(cut=1, end=3)
    address, tls_for = split_server(LLAMA, spec, devices=["cpu", "cpu"], placement="replicate", fast_decode=True,
                                    batch_window_ms=200)
    service = split_server.servers[-1].handler
    copies = [r.segment for r in service.replicas.all]
    assert len(copies) == 2 and copies[0] is not copies[1] and copies[0] is service.segment
    local = build_model(LLAMA).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (1, 4 + 2 * i), generator=g) for i in range(4)]
    remotes = [open_split(address, "alice", tls_for("alice"), source=LLAMA, spec=spec) for _ in range(4)]
    try:
        assert sorted(id(split_server.segment(r).module) for r in remotes) == sorted([id(c) for c in copies] * 2)
        kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
        got = _in_threads(lambda i: remotes[i].model.eval().generate(prompts[i], **kw), 4)
        for i in range(4):
            assert torch.equal(got[i], local.generate(prompts[i], **kw)), f"client {i}"
        for replica in service.replicas.all:
            assert replica.sessions == 2 and max(replica.batcher.stats.sizes) > 1, dict(replica.batcher.stats.sizes)
    finally:
        remotes[0].close()
    assert sorted(r.sessions for r in service.replicas.all) == [1, 2]
    more = open_split(address, "alice", tls_for("alice"), source=LLAMA, spec=spec)
    assert [r.sessions for r in service.replicas.all] == [2, 2]
    for r in (*remotes[1:], more):
        r.close()
    assert [r.sessions for r in service.replicas.all] == [0, 0]
    with pytest.raises(ValueError, match="placement"):
        split_server(LLAMA, spec, devices=["cpu", "cpu"], placement="mirror")


def test_a_spread_segment_batches_decode_steps(split_server):
    """Three sessions decoding together on a segment spread over two devices ("cpu" twice here)
    run as batches and each gets its local tokens (each layer's pool rows beside it)."""
    from tests.test_batching import _concurrent_generation

    _concurrent_generation(split_server, "llama", "u_shape", devices=["cpu", "cpu"])


# -- two GPUs -----------------------------------------------------------------------------------------

two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two GPUs")
TAILS = {"frozen": "frozen", "trainable": "trainable",
         "lora": {"mode": "lora", "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}}}


def _fit(address: str, tls, tail, folder, steps: int, ckpt_path: str | None = None) -> list[float]:  # noqa: ANN001
    strategy = SplitStrategy(address=address, node_id="alice", tls=tls, device="cuda:0", tail=tail)
    rec = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(max_steps=steps, accelerator="gpu", devices=1, strategy=strategy, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec, checkpoints])
    try:
        L.seed_everything(0, verbose=False)
        trainer.fit(CausalLM(lr=3e-3, optimizer="Adam"), _gpt2_batches(), ckpt_path=ckpt_path)
    finally:
        strategy.close()
    return rec.losses


@two_gpus
@pytest.mark.gpu
@pytest.mark.parametrize("tail", list(TAILS))
@pytest.mark.parametrize("shape", ["u_shape", "two_part"])
def test_two_gpu_segment_trains_like_one_gpu(shape, tail, split_server, tmp_path, exact_matmuls):
    """fp32, rtol 1e-5: 4 steps, then a new session resumed from the step-2 checkpoint, per tail mode."""
    spec = SplitSpec(cut=1, end=3 if shape == "u_shape" else None, shape=shape)
    runs = {}
    for name, kw in {"one": {"device": "cuda:0"}, "two": {"devices": [0, 1]}}.items():
        address, tls_for = split_server(GPT2, spec, **kw)
        if name == "two":
            blocks = split_server.servers[-1].handler.segment.blocks
            assert {next(b.parameters()).device.index for b in blocks} == {0, 1}
        losses = _fit(address, tls_for("alice"), TAILS[tail], tmp_path / name, steps=4)
        resumed = _fit(address, tls_for("alice"), TAILS[tail], tmp_path / f"{name}-resumed", steps=4,
                       ckpt_path=str(tmp_path / name / "epoch=0-step=2.ckpt"))
        runs[name] = torch.tensor(losses + resumed)
    torch.testing.assert_close(runs["two"], runs["one"], rtol=1e-5, atol=1e-6)


@two_gpus
@pytest.mark.gpu
@pytest.mark.parametrize("placement", ["spread", "replicate"])
@pytest.mark.parametrize("fast_decode", [False, True], ids=["eager", "fast-decode"])
def test_two_gpu_segment_generates_like_one_gpu(fast_decode, placement, split_server, exact_matmuls):
    """Greedy tokens and forward logits of the segment on two GPUs equal the one-GPU server's
    (replicated: the second session's copy is on the second GPU)."""
    spec = SplitSpec(cut=1, end=3)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1)).cuda()
    results = {}
    for name, kw in {"one": {"device": "cuda:0"}, "two": {"devices": [0, 1], "placement": placement}}.items():
        if name == "two" and placement == "replicate":  # a first session takes the copy on cuda:0
            address, tls_for = split_server(LLAMA, spec, fast_decode=fast_decode, **kw)
            first = open_split(address, "alice", tls_for("alice"), source=LLAMA, spec=spec, device="cuda")
        else:
            address, tls_for = split_server(LLAMA, spec, fast_decode=fast_decode, **kw)
        remote = open_split(address, "alice", tls_for("alice"), source=LLAMA, spec=spec, device="cuda")
        if name == "two" and placement == "replicate":
            assert next(split_server.segment(remote).module.parameters()).device == torch.device("cuda:1")
            first.close()
        try:
            model = remote.model.eval()
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            tokens = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
            results[name] = (logits, tokens)
        finally:
            remote.close()
    torch.testing.assert_close(results["two"][0], results["one"][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(results["two"][1], results["one"][1])


@two_gpus
@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["u_shape", "two_part"])
def test_two_gpu_spread_segment_batches_decode_steps_exactly(shape, split_server, exact_matmuls):
    """Three concurrent sessions on a segment spread over two GPUs: batched (eagerly: a graph runs
    on one device), each session's tokens equal to its local run in fp32."""
    from tests.test_batching import _concurrent_generation

    _concurrent_generation(split_server, "llama", shape, device="cuda", devices=[0, 1])
