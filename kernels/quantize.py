"""Block-wise symmetric int8 quantization for ZeRO++: quantized weight all-gathers and quantized
gradient reduction.

`quantize_int8(x, block)` splits each row of a 2-D tensor into blocks of `block` consecutive
elements (the last block of a row may be short) and keeps, per block, one fp32 scale
`absmax / 127` and the int8 values `clamp(round(x / scale), -127, 127)`, rounded half to even. An
all-zero block has scale 0 and values 0; a block holding inf or NaN gets a NaN scale (and values 0),
so what is dequantized from it is NaN and the overflow checks downstream see it.

`dequantize_int8(q, scales, block, out)` writes into `out` the sum over K quantized copies (the K
ranks' pieces of a reduce-scatter, or K = 1 for an all-gather): `Σ_k q[k] * scales[k]`, each product
rounded to fp32 and added in order k = 0..K-1 (no fused multiply-add), then cast to `out`'s dtype
rounded to nearest even.

Both divisions (the scale, and x by the scale) are IEEE divisions rounded to nearest (`div_rn`, not
the approximate division Triton emits for `/`), and rounding to an integer adds and subtracts
1.5 * 2**23, which rounds half to even exactly for |x / scale| <= 127 (as torch.round): the Triton
kernels give the references' results bit for bit. tests/test_kernel_quantize.py checks that under the
interpreter, and on a GPU with `--device cuda`, where the PTX divides with div.rn.f32 and, launched
without fp fusion, multiplies and adds with mul.rn / add.rn.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from .copy16 import out_mode

MAX_BLOCK = 4096  # the largest quantization block: one block fits one Triton tile
TILE = 4096  # elements per program: whole quantization blocks, up to this many
QMAX = 127
_FLOAT_MAX = 3.4028234663852886e38
_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _check_block(name: str, block: object, limit: bool) -> None:
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"{name}: block must be an int, got {type(block).__name__}")
    if block < 1:
        raise ValueError(f"{name}: block must be at least 1, got {block}")
    if limit and block > MAX_BLOCK:
        raise ValueError(f"{name}: block must be at most {MAX_BLOCK} (one Triton tile), got {block}")


def _check_quantize(x: torch.Tensor, block: int, limit: bool = True) -> None:
    name = "quantize_int8"
    _check_block(name, block, limit)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D [rows, n], got shape {tuple(x.shape)}")
    if x.dtype not in _IN_DTYPES:
        raise TypeError(f"{name}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: x must be contiguous")


def _as_3d(q: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor, limit: bool = True):
    """Check dequantize_int8's arguments; return q and scales as [K, rows, n] and [K, rows, nb]."""
    name = "dequantize_int8"
    _check_block(name, block, limit)
    for label, tensor in (("q", q), ("scales", scales), ("out", out)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a tensor, got {type(tensor).__name__}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name}: {label} must be contiguous")
        if tensor.device != out.device:
            raise ValueError(
                f"{name}: q, scales and out must be on one device ({label} is on {tensor.device})"
            )
    if q.dtype != torch.int8:
        raise TypeError(f"{name}: q must be int8, got {q.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"{name}: scales must be float32, got {scales.dtype}")
    if out.dtype not in _OUT_DTYPES:
        raise TypeError(f"{name}: out must be float32, bfloat16, float16 or float64, got {out.dtype}")
    if out.dim() != 2:
        raise ValueError(f"{name}: out must be 2-D [rows, n], got shape {tuple(out.shape)}")
    if q.dim() not in (2, 3) or scales.dim() not in (2, 3):
        raise ValueError(
            f"{name}: q must be [K, rows, n] or [rows, n] and scales [K, rows, nb] or [rows, nb], "
            f"got {tuple(q.shape)} and {tuple(scales.shape)}"
        )
    q3 = q if q.dim() == 3 else q.unsqueeze(0)
    scales3 = scales if scales.dim() == 3 else scales.unsqueeze(0)
    rows, n = out.shape
    expected_scales = (q3.shape[0], rows, _blocks(n, block))
    if tuple(q3.shape[1:]) != (rows, n) or tuple(scales3.shape) != expected_scales:
        raise ValueError(
            f"{name}: for out {tuple(out.shape)} and block {block}, q must be [K, {rows}, {n}] and scales "
            f"[K, {rows}, {expected_scales[2]}]; got q {tuple(q.shape)} and scales {tuple(scales.shape)}"
        )
    return q3, scales3


# ---- PyTorch references ----------------------------------------------------------------------------


def quantize_int8_reference(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8` in PyTorch operations, for any block size >= 1."""
    _check_quantize(x, block, limit=False)
    rows, n = x.shape
    nb = _blocks(n, block)
    padded = torch.zeros(rows, nb * block, dtype=torch.float32, device=x.device)
    padded[:, :n] = x
    values = padded.view(rows, nb, block)
    magnitude = values.abs()
    absmax = magnitude.amax(dim=2)
    finite = (magnitude <= _FLOAT_MAX).all(dim=2)  # NaN fails the comparison, inf exceeds it
    # Divided by a tensor: CUDA divides by a Python number as a multiplication by its reciprocal.
    scales = torch.where(
        finite, absmax / torch.full_like(absmax, QMAX), torch.full_like(absmax, float("nan"))
    )
    usable = scales > 0  # not an all-zero block, nor one whose scale underflows, nor a NaN scale
    divisor = torch.where(usable, scales, torch.ones_like(scales))
    rounded = torch.round(values / divisor.unsqueeze(2)).clamp_(-QMAX, QMAX)  # half to even
    q = torch.where(usable.unsqueeze(2), rounded, torch.zeros_like(rounded)).to(torch.int8)
    return q.view(rows, nb * block)[:, :n].contiguous(), scales


def dequantize_int8_reference(
    q: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor
) -> torch.Tensor:
    """`dequantize_int8` in PyTorch operations, for any block size >= 1."""
    q3, scales3 = _as_3d(q, scales, block, out, limit=False)
    n = out.shape[1]
    total = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for k in range(q3.shape[0]):
        per_element = scales3[k].repeat_interleave(block, dim=1)[:, :n]
        total += q3[k].float() * per_element  # the product rounded to fp32, then the sum
    return out.copy_(total)  # rounded to nearest even


# ---- Triton ----------------------------------------------------------------------------------------


def _plan(n: int, block: int) -> tuple[int, int, int, int]:
    """(padded block QB, blocks per tile NB, tiles per row, warps): each program takes NB whole
    quantization blocks of one row, each padded to a power of two QB."""
    qb = triton.next_power_of_2(block)
    nb_tile = min(max(1, TILE // qb), triton.next_power_of_2(_blocks(n, block)))
    tiles = triton.cdiv(_blocks(n, block), nb_tile)
    warps = max(1, min(8, nb_tile * qb // 512))
    return qb, nb_tile, tiles, warps


if triton is not None:
    from .copy16 import store_copy

    @triton.jit
    def _tile(program, n, nb, tiles, QBLOCK: tl.constexpr, QB: tl.constexpr, NB: tl.constexpr):
        """Where this program's NB quantization blocks start in the flat tensor (elements, and scales:
        64-bit), their elements' offsets from there [NB, QB] (32-bit) with the mask of the real
        ones, and the mask of the real blocks [NB]."""
        row = (program // tiles).to(tl.int64)
        first = (program % tiles) * NB  # the tile's first block in its row
        start = row * n + first.to(tl.int64) * QBLOCK
        # Elements of the row from the tile on, at most the tile's: 32-bit from here.
        left = tl.minimum(n - first.to(tl.int64) * QBLOCK, NB * QBLOCK).to(tl.int32)
        blocks = tl.arange(0, NB)
        lanes = tl.arange(0, QB)
        local = blocks[:, None] * QBLOCK + lanes[None, :]
        mask = local < left
        if QB != QBLOCK:  # a block size that is not a power of two: the padding lanes are masked
            mask = mask & (lanes[None, :] < QBLOCK)
        return start, row * nb + first, local, mask, blocks < nb - first

    @triton.jit
    def _quantize_kernel(
        x_ptr, q_ptr, scale_ptr, n, nb, tiles, QBLOCK: tl.constexpr, QB: tl.constexpr, NB: tl.constexpr
    ):
        start, scale_start, local, mask, block_mask = _tile(tl.program_id(0), n, nb, tiles, QBLOCK, QB, NB)
        x = tl.load(x_ptr + start + local, mask=mask, other=0.0).to(tl.float32)
        magnitude = tl.abs(x)
        absmax = tl.max(magnitude, axis=1)
        # NaN fails every comparison, and infinity exceeds the largest float: both mark the block.
        bad = tl.max(tl.where(magnitude <= 3.4028234663852886e38, 0, 1), axis=1)
        scale = tl.where(bad == 0, tl.math.div_rn(absmax, 127.0), float("nan"))
        usable = scale > 0  # not an all-zero block, nor one whose scale underflows, nor a NaN scale
        divisor = tl.where(usable, scale, 1.0)
        y = tl.math.div_rn(x, divisor[:, None])
        y = tl.minimum(tl.maximum(y, -127.0), 127.0)
        y = (y + 12582912.0) - 12582912.0  # + 1.5 * 2**23: rounds half to even, as torch.round
        q = tl.where(usable[:, None], y, 0.0).to(tl.int8)
        tl.store(q_ptr + start + local, q, mask=mask)
        tl.store(scale_ptr + scale_start + tl.arange(0, NB), scale, mask=block_mask)

    @triton.jit
    def _dequantize_kernel(
        q_ptr,
        scale_ptr,
        out_ptr,
        n,
        nb,
        tiles,
        parts,
        q_stride,
        scale_stride,
        QBLOCK: tl.constexpr,
        QB: tl.constexpr,
        NB: tl.constexpr,
        OUT_MODE: tl.constexpr,
    ):
        start, scale_start, local, mask, block_mask = _tile(tl.program_id(0), n, nb, tiles, QBLOCK, QB, NB)
        q_ptrs = q_ptr + start + local
        scale_ptrs = scale_ptr + scale_start + tl.arange(0, NB)
        total = tl.zeros([NB, QB], dtype=tl.float32)
        for _ in range(0, parts):
            q = tl.load(q_ptrs, mask=mask, other=0).to(tl.float32)
            scale = tl.load(scale_ptrs, mask=block_mask, other=0.0)
            total += q * scale[:, None]  # launched without fp fusion: the product is rounded first
            q_ptrs += q_stride
            scale_ptrs += scale_stride
        store_copy(out_ptr + start, local, total, mask, OUT_MODE)


def quantize_int8_triton(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_int8` in one Triton launch (block sizes 1..MAX_BLOCK)."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use quantize_int8_reference")
    _check_quantize(x, block)
    rows, n = x.shape
    nb = _blocks(n, block)
    q = torch.empty(rows, n, dtype=torch.int8, device=x.device)
    scales = torch.empty(rows, nb, dtype=torch.float32, device=x.device)
    if q.numel():
        qb, nb_tile, tiles, warps = _plan(n, block)
        _quantize_kernel[(rows * tiles,)](
            x, q, scales, n, nb, tiles, QBLOCK=block, QB=qb, NB=nb_tile, num_warps=warps
        )
    return q, scales


def dequantize_int8_triton(
    q: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor
) -> torch.Tensor:
    """`dequantize_int8` in one Triton launch (block sizes 1..MAX_BLOCK)."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use dequantize_int8_reference")
    q3, scales3 = _as_3d(q, scales, block, out)
    rows, n = out.shape
    if out.numel():
        qb, nb_tile, tiles, warps = _plan(n, block)
        _dequantize_kernel[(rows * tiles,)](
            q3, scales3, out, n, scales3.shape[2], tiles, q3.shape[0], rows * n, scales3[0].numel(),
            QBLOCK=block, QB=qb, NB=nb_tile, OUT_MODE=out_mode(out),
            num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out


# ---- launchers -------------------------------------------------------------------------------------


def quantize_int8(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: contiguous 2-D [rows, n], dtype fp32/bf16/fp16. Returns (q, scales): q int8 [rows, n],
    scales fp32 [rows, ceil(n / block)]. Blocks are `block` consecutive elements within a row (the
    last block of a row may be short; 1 <= block <= MAX_BLOCK). scale = absmax(block) / 127
    (computed in fp32); q = clamp(round(x / scale), -127, 127), rounded half to even; an all-zero
    block has scale 0 and q 0. A block holding a non-finite value (inf/nan) gets a NaN scale (and
    q 0), so its dequantized values are NaN and overflow checks downstream see it.

    Triton on CUDA, the PyTorch reference elsewhere; both give the same bits."""
    _check_quantize(x, block)
    if triton is not None and x.is_cuda:
        return quantize_int8_triton(x, block)
    return quantize_int8_reference(x, block)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, block: int, out: torch.Tensor) -> torch.Tensor:
    """q int8 [K, rows, n] (or [rows, n], meaning K = 1), scales fp32 [K, rows, ceil(n/block)]
    (or [rows, nb]); out: contiguous [rows, n] of fp32/bf16/fp16/fp64. Writes
    out = sum over k of q[k] * scales[k] (per block), each product rounded to fp32 and summed in
    fp32 in order k = 0..K-1, cast to out.dtype rounded to nearest even. Returns out.

    Triton on CUDA, the PyTorch reference elsewhere; both give the same bits."""
    _as_3d(q, scales, block, out)
    if triton is not None and out.is_cuda:
        return dequantize_int8_triton(q, scales, block, out)
    return dequantize_int8_reference(q, scales, block, out)
