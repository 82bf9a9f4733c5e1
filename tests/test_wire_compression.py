"""Compression modes: configuration, lossy error bounds, blosc2 lossless stage, fallbacks."""

from __future__ import annotations

import pickle

import blosc2
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_split._proto import split_pb2 as pb
from lightning_split.wire import CompressionConfig, WireLimits, decode_body, encode_body

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def encode(t: torch.Tensor, cfg: CompressionConfig):
    meta, buffers = encode_body(t, cfg)
    region = bytearray(b"".join(bytes(b) for b in buffers))
    tm = pb.PayloadMeta.FromString(meta).value.tensor
    return tm, decode_body(meta, region, WireLimits(), allowed=cfg)


def signed_logspace(n: int, lo: float, hi: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    log_lo, log_hi = torch.log(torch.tensor(lo)).item(), torch.log(torch.tensor(hi)).item()
    mag = torch.exp(torch.empty(n).uniform_(log_lo, log_hi, generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return mag * sign


@pytest.fixture(autouse=True)
def _no_pickle(monkeypatch):
    """The wire layer must never unpickle or use blosc2's tensor (pickle-based) helpers."""

    def boom(*a, **k):  # pragma: no cover - would mean a violation
        raise AssertionError("pickle / blosc2 tensor helpers must not be used")

    for mod, name in [(pickle, "loads"), (pickle, "load"), (pickle, "dumps"), (blosc2, "unpack_tensor"),
                      (blosc2, "pack_tensor"), (torch, "load")]:
        monkeypatch.setattr(mod, name, boom)


# ----------------------------------------------------------------------------- config


def test_config_defaults_and_dict_roundtrip():
    c = CompressionConfig()
    assert (c.lossless, c.lossy, c.int8_block_size, c.min_bytes) == ("none", "none", 128, 4096)
    c2 = CompressionConfig(lossless="blosc2", lossy="int8", codec="ZSTD", level=3, filter="SHUFFLE",
                           nthreads=1, int8_block_size=64, min_bytes=0)
    assert CompressionConfig.from_dict(c2.to_dict()) == c2
    assert CompressionConfig.from_dict(None) == CompressionConfig()
    assert CompressionConfig.from_dict({"lossy": None, "codec": "zstd"}).codec == "ZSTD"


@pytest.mark.parametrize("kw", [{"lossless": "gzip"}, {"lossy": "fp4"}, {"codec": "SNAPPY"}, {"filter": "X"},
                                {"level": 10}, {"nthreads": 0}, {"int8_block_size": 0}, {"min_bytes": -1},
                                {"level": "1"}, {"nthreads": 1.5}, {"min_bytes": True}])
def test_config_validation(kw):
    with pytest.raises(ValueError):
        CompressionConfig(**kw)
    with pytest.raises(ValueError):
        CompressionConfig.from_dict({"unknown_key": 1})


# ----------------------------------------------------------------------------- lossy bounds


@pytest.mark.parametrize("src", [torch.float32, torch.float64])
def test_bf16_relative_error(src):
    x = signed_logspace(10000, 1e-30, 1e30).to(src)
    tm, out = encode(x, CompressionConfig(lossy="bf16"))
    assert tm.encoding == pb.CAST_BF16 and tm.nbytes == 2 * x.numel()
    assert out.dtype == src and out.shape == x.shape
    rel = ((out.double() - x.double()).abs() / x.double().abs()).max().item()
    assert rel <= 2.0**-8


@pytest.mark.parametrize("src", [torch.float32, torch.float64])
def test_fp16_relative_error_normal_range(src):
    x = signed_logspace(10000, 6.2e-5, 6.0e4).to(src)  # fp16 normal range
    tm, out = encode(x, CompressionConfig(lossy="fp16"))
    assert tm.encoding == pb.CAST_FP16 and tm.nbytes == 2 * x.numel()
    rel = ((out.double() - x.double()).abs() / x.double().abs()).max().item()
    assert rel <= 2.0**-11


def test_fp16_overflow_falls_back_to_raw():
    x = torch.randn(4096)
    x[7] = 1e6
    tm, out = encode(x, CompressionConfig(lossy="fp16"))
    assert tm.encoding == pb.RAW and torch.equal(out, x)
    y = torch.randn(4096)
    y[3] = float("inf")
    tm, out = encode(y, CompressionConfig(lossy="fp16"))
    assert tm.encoding == pb.RAW and torch.equal(out, y)


def test_16bit_tensors_are_not_recast():
    for dt, mode in [(torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.bfloat16, "fp16"),
                     (torch.float16, "bf16")]:
        x = torch.randn(4096).to(dt)
        tm, out = encode(x, CompressionConfig(lossy=mode))
        assert tm.encoding == pb.RAW and torch.equal(out, x)


def int8_bound(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per element bound: absmax of its block / 254 (half a quantisation step), plus fp32 slack."""
    flat = x.double().reshape(-1)
    n = flat.numel()
    pad = (-n) % block
    amax = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block).abs().amax(1)
    per = amax.repeat_interleave(block)[:n]
    return per / 254 * (1 + 1e-5) + 1e-30


@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("block,n", [(128, 10000), (7, 4099), (1, 2048), (4096, 5000), (100000, 3000)])
def test_int8_block_error_bound(src, block, n):
    x = (torch.randn(n) * torch.linspace(0.01, 100, n)).to(src)
    x[: min(block, n)] = 0  # an all-zero block: scale 0, decodes to exactly 0
    cfg = CompressionConfig(lossy="int8", int8_block_size=block, min_bytes=0)
    tm, out = encode(x, cfg)
    nblocks = -(-n // block)
    assert tm.encoding == pb.INT8_BLOCK and tm.block_size == block and tm.nbytes == 4 * nblocks + n
    assert out.dtype == src and out.shape == x.shape
    err = (out.double() - x.double()).abs()
    # bf16/fp16 outputs add their own rounding on top of the int8 step
    extra = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(src, 0.0) * x.double().abs() * 1.01
    assert bool((err <= int8_bound(x, block) + extra).all())
    assert bool((out[: min(block, n)] == 0).all())


def fp8_bound(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per element bound of FP8_BLOCK: e4m3's half ulp (2**-4 relative) in its normal range, half
    its subnormal step (2**-10 in units of the block's scale absmax / 448) below it, fp32 slack."""
    per = int8_bound(x, block) * 254 / (1 + 1e-5) / 448  # the block's scale
    return (2.0**-4 * x.double().abs().reshape(-1) + 2.0**-10 * per) * (1 + 1e-5) + 1e-30


@pytest.mark.parametrize("src", FLOATS)
@pytest.mark.parametrize("block,n", [(128, 10000), (7, 4099), (1, 2048), (100000, 3000)])
def test_fp8_block_error_bound(src, block, n):
    x = (torch.randn(n) * torch.logspace(-6, 3, n)).to(src)  # values across nine decades in a block
    x[: min(block, n)] = 0
    tm, out = encode(x, CompressionConfig(lossy="fp8", int8_block_size=block, min_bytes=0))
    assert tm.encoding == pb.FP8_BLOCK and tm.block_size == block and tm.nbytes == 4 * (-(-n // block)) + n
    assert out.dtype == src and out.shape == x.shape
    err = (out.double() - x.double()).abs()
    extra = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(src, 0.0) * x.double().abs() * 1.01
    extra += 2.0**-24 if src == torch.float16 else 0.0  # a float16 output's subnormal step (its values go to 1e-6)
    assert bool((err <= fp8_bound(x, block) + extra).all())
    assert bool((out[: min(block, n)] == 0).all())


def test_fp8_keeps_the_small_values_int8_loses_beside_an_outlier():
    x = torch.randn(128 * 64) * 1e-3
    x[::128] = 10.0  # one outlier per block
    small = torch.ones_like(x, dtype=torch.bool)
    small[::128] = False
    rel = {m: float((encode(x, CompressionConfig(lossy=m, min_bytes=0))[1] - x)[small].norm() / x[small].norm())
           for m in ("int8", "fp8")}
    assert rel["fp8"] < 0.07 and rel["int8"] > 0.5, rel


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_block_modes_non_finite_fall_back_to_raw(mode):
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4096)
        x[100] = bad
        tm, out = encode(x, CompressionConfig(lossy=mode))
        assert tm.encoding == pb.RAW
        assert torch.equal(out.isnan(), x.isnan()) and torch.equal(out[~x.isnan()], x[~x.isnan()])


def test_int8_shapes_preserved():
    x = torch.randn(3, 5, 7, 11)
    tm, out = encode(x, CompressionConfig(lossy="int8", int8_block_size=16, min_bytes=0))
    assert out.shape == x.shape and bool(((out - x).abs() <= int8_bound(x, 16).view_as(x).float()).all())


@pytest.mark.parametrize("dtype", INTS)
@pytest.mark.parametrize("mode", ["bf16", "fp16", "fp8", "int8"])
def test_lossy_never_touches_integer_or_bool(dtype, mode):
    x = torch.randint(0, 2, (5000,)).to(dtype)
    tm, out = encode(x, CompressionConfig(lossy=mode, min_bytes=0))
    assert tm.encoding == pb.RAW and torch.equal(out, x)


def test_min_bytes_skips_both_stages():
    cfg = CompressionConfig(lossless="blosc2", lossy="int8", min_bytes=4096)
    small = torch.zeros(1023)  # 4092 bytes
    tm, out = encode(small, cfg)
    assert tm.encoding == pb.RAW and not tm.blosc2 and torch.equal(out, small)
    big = torch.zeros(1024)
    tm, _ = encode(big, cfg)
    assert tm.encoding == pb.INT8_BLOCK and tm.blosc2


def test_empty_and_scalar_tensors_all_modes():
    for mode in ("none", "bf16", "fp16", "int8"):
        cfg = CompressionConfig(lossless="blosc2", lossy=mode, min_bytes=0)
        for x in (torch.empty(0), torch.empty(3, 0), torch.tensor(2.5)):
            _, out = encode(x, cfg)
            assert out.shape == x.shape and torch.equal(out, x)


# ----------------------------------------------------------------------------- blosc2


@pytest.mark.parametrize("codec", ["LZ4", "LZ4HC", "ZSTD", "ZLIB", "BLOSCLZ"])
@pytest.mark.parametrize("filt", ["NOFILTER", "SHUFFLE", "BITSHUFFLE"])
def test_blosc2_shrinks_compressible_and_roundtrips_exactly(codec, filt):
    x = torch.arange(65536, dtype=torch.int64) % 300
    cfg = CompressionConfig(lossless="blosc2", codec=codec, filter=filt, level=5)
    tm, out = encode(x, cfg)
    assert tm.blosc2 and tm.nbytes < x.nbytes / 4
    assert torch.equal(out, x)


@pytest.mark.parametrize("dtype", FLOATS + INTS)
def test_blosc2_every_dtype(dtype):
    x = (torch.arange(20000) % 7).to(dtype)
    tm, out = encode(x, CompressionConfig(lossless="blosc2"))
    assert tm.blosc2 and torch.equal(out, x)


def test_blosc2_skipped_when_it_does_not_help():
    x = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8)  # incompressible
    tm, out = encode(x, CompressionConfig(lossless="blosc2"))
    assert not tm.blosc2 and tm.nbytes == x.nbytes and torch.equal(out, x)


def test_blosc2_on_realistic_activations():
    torch.manual_seed(0)
    with torch.no_grad():
        act = torch.nn.functional.gelu(torch.nn.Linear(64, 256)(torch.randn(64, 64)))
    for lossy, bound in (("none", 0.0), ("bf16", 2.0**-8)):
        tm, out = encode(act, CompressionConfig(lossless="blosc2", lossy=lossy))
        raw = act.numel() * (2 if lossy == "bf16" else 4)
        assert tm.blosc2 and tm.nbytes < raw  # GELU outputs compress a little
        nz = act != 0
        assert ((out - act).abs()[nz] / act.abs()[nz]).max().item() <= bound


@pytest.mark.parametrize("mode", ["bf16", "fp16", "fp8", "int8"])
def test_lossy_plus_lossless(mode):
    x = torch.randn(128, 64)
    x[:64] = 0  # compressible half
    tm, out = encode(x, CompressionConfig(lossless="blosc2", lossy=mode, codec="ZSTD"))
    assert tm.blosc2
    assert tm.encoding == {"bf16": pb.CAST_BF16, "fp16": pb.CAST_FP16, "fp8": pb.FP8_BLOCK,
                           "int8": pb.INT8_BLOCK}[mode]
    tol = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp8": 2.0**-4 + 1e-6, "int8": 1 / 254 + 1e-6}[mode]
    scale = x.abs().amax() if mode == "int8" else x.abs()
    subnormal = x.abs().amax() / 448 * 2.0**-10 if mode == "fp8" else 0.0  # e4m3's half subnormal step, scaled
    assert bool(((out - x).abs() <= tol * scale + subnormal + 1e-30).all())


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), block=st.integers(1, 300),
       mode=st.sampled_from(["none", "bf16", "fp16", "fp8", "int8"]), lossless=st.booleans(),
       seed=st.integers(0, 1000), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_property_lossy_bounds(n, block, mode, lossless, seed, scale):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    cfg = CompressionConfig(lossless="blosc2" if lossless else "none", lossy=mode, int8_block_size=block,
                            min_bytes=0)
    _, out = encode(x, cfg)
    assert out.shape == x.shape and out.dtype == x.dtype
    err = (out.double() - x.double()).abs()
    if mode == "none":
        assert torch.equal(out, x)
    elif mode == "int8":
        assert bool((err <= int8_bound(x, block)).all())
    elif mode == "fp8":
        assert bool((err <= fp8_bound(x, block)).all())
    else:
        u = 2.0**-8 if mode == "bf16" else 2.0**-11
        # below fp16's normal range the absolute error is bounded by half a subnormal step
        assert bool((err <= u * x.double().abs() + (2.0**-25 if mode == "fp16" else 0)).all())
