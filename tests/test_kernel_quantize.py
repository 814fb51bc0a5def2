"""The block-wise int8 quantization kernels (ZeRO++) against their PyTorch references, bit for bit:
on the GPU with `--device cuda`, else on CPU through Triton's interpreter (TRITON_INTERPRET=1,
conftest.py). Sizes are small: the interpreter runs each program in NumPy."""

from __future__ import annotations

import importlib

import pytest
import torch

from hf_zero.kernels import (
    dequantize_int8,
    dequantize_int8_reference,
    dequantize_int8_triton,
    quantize_int8,
    quantize_int8_reference,
    quantize_int8_triton,
)

# The module itself (`hf_zero.kernels` exports its functions, not the module).
quantize_module = importlib.import_module("hf_zero.kernels.quantize")

pytestmark = pytest.mark.usefixtures("needs_triton")

# (rows, n, block): one element; n a multiple of block; a short last block; a block size that is not
# a power of two; tiny blocks; one block filling the whole tile.
SHAPES = [(1, 1, 1), (3, 256, 64), (2, 300, 128), (3, 100, 24), (2, 37, 4), (1, 4100, 4096)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _values(rows: int, n: int, dtype: torch.dtype, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Magnitudes spread over blocks, so each block has its own scale.
    spread = torch.exp(torch.randn(rows, n, generator=generator))
    return (torch.randn(rows, n, generator=generator) * spread).to(dtype).to(device)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.isnan(), b.isnan())
        and torch.equal(
            a.nan_to_num(0.0, 0.0, 0.0) if a.is_floating_point() else a,
            b.nan_to_num(0.0, 0.0, 0.0) if b.is_floating_point() else b,
        )
    )


def _quantized(x: torch.Tensor, block: int):
    got, want = quantize_int8_triton(x, block), quantize_int8_reference(x, block)
    assert _same(got[0], want[0]) and _same(got[1], want[1])
    return want


@pytest.mark.parametrize("rows, n, block", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference(rows, n, block, dtype, device):
    x = _values(rows, n, dtype, seed=n + block, device=device)
    q, scales = _quantized(x, block)
    nb = -(-n // block)
    assert q.dtype == torch.int8 and q.shape == (rows, n)
    assert scales.dtype == torch.float32 and scales.shape == (rows, nb)
    assert int(q.abs().max()) == 127  # each block's largest magnitude maps to ±127
    padded = torch.nn.functional.pad(x.float(), (0, nb * block - n)).view(rows, nb, block)
    absmax = padded.abs().amax(dim=2)
    assert torch.equal(scales, absmax / torch.full_like(absmax, 127))  # a true division, also on CUDA
    q_launcher, scales_launcher = quantize_int8(x, block)
    assert torch.equal(q_launcher, q) and torch.equal(scales_launcher, scales)


@pytest.mark.parametrize("rows, n, block", SHAPES[1:5])
@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_dequantize_matches_reference(rows, n, block, parts, out_dtype, device):
    pieces = [
        quantize_int8_reference(_values(rows, n, torch.float32, seed=k, device=device), block)
        for k in range(parts)
    ]
    q = torch.stack([p[0] for p in pieces])
    scales = torch.stack([p[1] for p in pieces])
    want = dequantize_int8_reference(q, scales, block, torch.empty(rows, n, dtype=out_dtype, device=device))
    got = dequantize_int8_triton(q, scales, block, torch.full((rows, n), 7.0, dtype=out_dtype, device=device))
    assert _same(got, want)
    # The sum in fp32, product by product, in order k = 0..K-1, then one cast.
    total = torch.zeros(rows, n, device=device)
    for k in range(parts):
        total += q[k].float() * scales[k].repeat_interleave(block, dim=1)[:, :n]
    assert torch.equal(want, total.to(out_dtype))
    out = torch.empty(rows, n, dtype=out_dtype, device=device)
    assert dequantize_int8(q, scales, block, out) is out and _same(out, want)
    if parts == 1:  # [rows, n] and [rows, nb] mean K = 1
        assert _same(dequantize_int8_triton(q[0], scales[0], block, torch.empty_like(out)), want)


def test_every_tile_of_a_long_row_is_quantized(monkeypatch, device):
    # A small tile stands in for TILE (4096): several programs per row, and a short last tile.
    monkeypatch.setattr(quantize_module, "TILE", 128)
    x = _values(3, 1000, torch.bfloat16, seed=5, device=device)
    q, scales = _quantized(x, 32)
    for out_dtype in (torch.float32, torch.bfloat16):
        want = dequantize_int8_reference(q, scales, 32, torch.empty(3, 1000, dtype=out_dtype, device=device))
        got = dequantize_int8_triton(q, scales, 32, torch.empty(3, 1000, dtype=out_dtype, device=device))
        assert _same(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n, block", [(2, 300, 128), (3, 100, 24), (1, 4100, 4096)])
def test_round_trip_error_is_at_most_half_a_step(rows, n, block, dtype, device):
    x = _values(rows, n, dtype, seed=11, device=device)
    q, scales = _quantized(x, block)
    back = dequantize_int8_triton(q, scales, block, torch.empty(rows, n, device=device))
    step = scales.double().repeat_interleave(block, dim=1)[:, :n]
    error = (x.double() - back.double()).abs()
    # Half a step, and the fp32 roundings of x / scale and q * scale (|q| <= 127).
    assert bool((error <= step * (0.5 + 2**-16)).all())
    assert float((error / step).max()) > 0.45  # the bound is tight: a measured error comes near it


def test_rounding_is_half_to_even(device):
    # absmax 127 gives scale 1, so x / scale is x itself.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]], device=device)
    q, scales = _quantized(x, 8)
    assert scales.tolist() == [[1.0]]
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


def test_all_zero_and_underflowing_blocks_quantize_to_zero(device):
    x = _values(2, 40, torch.float32, seed=3, device=device)
    x[0, 8:16] = 0
    x[1, :8] = -0.0
    x[1, 16:24] = 4e-44  # a subnormal absmax whose scale (/ 127) underflows to 0
    x[1, 32:40] = 0
    x[1, 32] = 1e-38  # a subnormal scale, still > 0
    x[1, 33] = -3e-39
    q, scales = _quantized(x, 8)
    for row, block in ((0, 1), (1, 0), (1, 2)):
        assert scales[row, block].item() == 0
        assert not q[row, 8 * block : 8 * block + 8].any()
    assert 0 < scales[1, 4].item() < 1e-38 and q[1, 32].item() == 127 and q[1, 33].item() == -38
    back = dequantize_int8_triton(q, scales, 8, torch.empty(2, 40, device=device))
    assert not back[0, 8:16].any() and not back[1, :8].any()
    assert torch.isfinite(back).all()


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_non_finite_value_makes_its_block_nan_and_only_it(bad, dtype, device):
    rows, n, block = 2, 100, 32
    clean = _values(rows, n, dtype, seed=7, device=device)
    x = clean.clone()
    x[1, 40] = float(bad)  # block 1 of row 1
    x[0, 99] = float(bad)  # the short last block of row 0
    q, scales = _quantized(x, block)
    q_clean, scales_clean = quantize_int8_reference(clean, block)
    hit = torch.zeros(rows, 4, dtype=torch.bool, device=device)
    hit[1, 1] = hit[0, 3] = True
    assert torch.equal(scales.isnan(), hit)
    assert torch.equal(scales[~hit], scales_clean[~hit])
    hit_elements = hit.repeat_interleave(block, dim=1)[:, :n]
    assert not q[hit_elements].any()
    assert torch.equal(q[~hit_elements], q_clean[~hit_elements])
    # Dequantized, alone or summed with a clean part, the block is NaN and nothing else is.
    for parts in ((q, scales), (torch.stack([q_clean, q]), torch.stack([scales_clean, scales]))):
        for out_dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(rows, n, dtype=out_dtype, device=device)
            back = dequantize_int8_triton(*parts, block, out)
            assert _same(back, dequantize_int8_reference(*parts, block, torch.empty_like(out)))
            assert torch.equal(back.isnan(), hit_elements)


def test_empty_inputs(device):
    for rows, n in ((0, 10), (3, 0)):
        x = torch.empty(rows, n, device=device)
        for q, scales in (quantize_int8_triton(x, 4), quantize_int8_reference(x, 4), quantize_int8(x, 4)):
            assert q.shape == (rows, n) and scales.shape == (rows, -(-n // 4))
        out = torch.empty(rows, n, dtype=torch.bfloat16, device=device)
        assert dequantize_int8_triton(q, scales, 4, out) is out


def _quantizers():
    return [quantize_int8, quantize_int8_triton, quantize_int8_reference]


def _dequantizers():
    return [dequantize_int8, dequantize_int8_triton, dequantize_int8_reference]


@pytest.mark.parametrize(
    "x, block, error, match",
    [
        (
            lambda d: torch.zeros(4, 8, dtype=torch.float64, device=d),
            4,
            TypeError,
            "float32, bfloat16 or float16",
        ),
        (
            lambda d: torch.zeros(4, 8, dtype=torch.int32, device=d),
            4,
            TypeError,
            "float32, bfloat16 or float16",
        ),
        (lambda d: torch.zeros(8, 4, device=d).t(), 4, ValueError, "contiguous"),
        (lambda d: torch.zeros(8, device=d), 4, ValueError, "2-D"),
        (lambda d: torch.zeros(2, 2, 2, device=d), 4, ValueError, "2-D"),
        (lambda d: torch.zeros(4, 8, device=d), 0, ValueError, "at least 1"),
        (lambda d: torch.zeros(4, 8, device=d), -3, ValueError, "at least 1"),
        (lambda d: torch.zeros(4, 8, device=d), 4.0, TypeError, "must be an int"),
        (lambda d: [[1.0]], 4, TypeError, "must be a tensor"),
    ],
)
def test_quantize_refuses_bad_inputs(x, block, error, match, device):
    for quantize in _quantizers():
        with pytest.raises(error, match=match):
            quantize(x(device), block)


def test_launchers_refuse_blocks_larger_than_a_tile(device):
    x = torch.zeros(1, 8, device=device)
    for quantize in _quantizers()[:2]:
        with pytest.raises(ValueError, match="at most 4096"):
            quantize(x, 4097)
    q, scales = quantize_int8_reference(x, 8192)  # the reference takes any block
    assert scales.shape == (1, 1)
    for dequantize in _dequantizers()[:2]:
        with pytest.raises(ValueError, match="at most 4096"):
            dequantize(q, scales, 8192, torch.empty(1, 8, device=device))


def _dequantize_case(device, **changes):
    args = {
        "q": torch.zeros(2, 3, 10, dtype=torch.int8, device=device),
        "scales": torch.zeros(2, 3, 3, device=device),
        "block": 4,
        "out": torch.empty(3, 10, device=device),
    }
    return {**args, **{k: v(device) if callable(v) else v for k, v in changes.items()}}


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"q": lambda d: torch.zeros(2, 3, 10, device=d)}, TypeError, "q must be int8"),
        (
            {"scales": lambda d: torch.zeros(2, 3, 3, dtype=torch.float16, device=d)},
            TypeError,
            "scales must be float32",
        ),
        (
            {"out": lambda d: torch.empty(3, 10, dtype=torch.int32, device=d)},
            TypeError,
            "out must be float32",
        ),
        ({"out": lambda d: torch.empty(10, 3, device=d).t()}, ValueError, "out must be contiguous"),
        (
            {"q": lambda d: torch.zeros(2, 10, 3, dtype=torch.int8, device=d).transpose(1, 2)},
            ValueError,
            "contiguous",
        ),
        ({"scales": lambda d: torch.zeros(2, 3, 4, device=d)}, ValueError, "scales"),  # 4 blocks, not 3
        ({"scales": lambda d: torch.zeros(3, 3, 3, device=d)}, ValueError, "K"),  # K differs
        ({"q": lambda d: torch.zeros(2, 4, 10, dtype=torch.int8, device=d)}, ValueError, "rows|K"),
        ({"q": lambda d: torch.zeros(2, 3, 11, dtype=torch.int8, device=d)}, ValueError, "q must be"),
        ({"q": lambda d: torch.zeros(30, dtype=torch.int8, device=d)}, ValueError, "\\[K, rows, n\\]"),
        ({"out": lambda d: torch.empty(30, device=d)}, ValueError, "2-D"),
        ({"block": 0}, ValueError, "at least 1"),
        ({"block": 3}, ValueError, "scales"),  # 4 blocks of 3 in a row of 10
    ],
)
def test_dequantize_refuses_bad_inputs(changes, error, match, device):
    for dequantize in _dequantizers():
        with pytest.raises(error, match=match):
            dequantize(**_dequantize_case(device, **changes))
