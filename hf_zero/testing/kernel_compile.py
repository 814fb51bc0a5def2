"""Compile hf_zero's Triton kernels for real GPUs on a machine without one, and read what they do
with memory.

Triton lowers a kernel to PTX and assembles it with the `ptxas` it ships, for any target, with no
GPU present: `triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget(...))`.
This module does that for every variant the engine launches (each combination of the
compile-time flags and the dtypes that shape memory traffic), with the 16-byte divisibility the
JIT sees on real calls (flat shards are padded to 64 elements, `layout.ALIGN`, and torch's
allocations are 16-byte aligned), then

- counts the global loads and stores in the PTX by width: 128-bit vector accesses against scalar
  ones, apart from the few one-value reads per launch (the unscale factor, the skip flag) and the
  per-program ones (a reduction's partial sums, the quantization scales);
- runs `ptxas -v` on the PTX for the registers each thread uses and the bytes it spills.

    python -m hf_zero.testing.kernel_compile [--arch 80 90] [--all]    # one JSON line per variant

Run it without TRITON_INTERPRET: under the interpreter `triton.jit` returns functions that only
interpret. tests/test_kernel_compile.py runs it and checks every line.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

TARGETS = {80: "sm_80", 90: "sm_90a"}
_DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# The copy the optimizer kernels write: none, bf16 rounded by hand, a native 16-bit cast.
_OUT_MODES = {"none": 0, "bf16": 1, "fp16": 2}


@dataclass(frozen=True)
class Variant:
    """One specialisation of a kernel: its name, the dtypes of its pointers and its constexprs."""

    kernel: str
    grad_dtype: str
    out: str
    constexprs: dict = field(hash=False)
    # Loads of one value per launch (scale, skip flag): scalar by nature.
    per_launch_loads: int = 0
    # Stores of one value per program (a reduction's partial sums, quantization scales): scalar by nature.
    per_program_stores: int = 0
    # Loads of one value per program and loop pass (the quantization scales of dequantization).
    per_program_loads: int = 0
    num_warps: int = 8
    # Off where a kernel must round each product before adding it, as its reference does.
    fp_fusion: bool = True

    @property
    def label(self) -> str:
        flags = ",".join(f"{k}={int(v)}" for k, v in self.constexprs.items() if k != "BLOCK")
        return f"{self.kernel}[grad={self.grad_dtype},out={self.out},{flags}]"


@dataclass
class Report:
    """What one variant compiled to on one target."""

    variant: str
    target: str
    registers: int
    spill_bytes: int
    vector_loads: int
    scalar_loads: int
    vector_stores: int
    scalar_stores: int
    unexpected_scalar_loads: int
    unexpected_scalar_stores: int


def _kernel_modules():
    # By module path: `hf_zero.kernels` exports functions under the names of their modules.
    return tuple(
        importlib.import_module(f"hf_zero.kernels.{name}")
        for name in ("adamw", "grad_stats", "sgd", "quantize")
    )


def _flag_settings(full: bool, extra: int) -> list[tuple]:
    """(grad dtype, copy, skip flag, gradient reset, unscale factor, extra index) per variant.

    `full`: every combination. Otherwise every combination of the first three (what decides the
    widths of the accesses and the skip branch), with the reset, the unscale factor and the
    `extra` choices taken from the index's bits, so each value of each flag still meets both
    values of the skip flag."""
    if full:
        return list(
            itertools.product(_DTYPES, _OUT_MODES, (False, True), (False, True), (False, True), range(extra))
        )
    return [
        (grad, out, skip, bool(i // 2 % 2), bool(i // 4 % 2), i // 2 % extra)
        for i, (grad, out, skip) in enumerate(itertools.product(_DTYPES, _OUT_MODES, (False, True)))
    ]


def variants(full: bool = False) -> list[Variant]:
    """The variants of each kernel to compile: with `full`, every combination the engine can launch
    (grad dtype × 16-bit copy × skip flag × gradient reset × unscale factor, and for SGD × momentum
    state: 291); otherwise a covering set of 39 in which every value of every flag is compiled. The
    flags that only change arithmetic (Adam's decoupled decay, SGD's Nesterov) alternate. Then the
    quantization kernels' variants (`quantize_variants`: 18 with `full`, else 6)."""
    adamw, grad_stats, sgd, _ = _kernel_modules()
    found: list[Variant] = []
    for i, (grad, out, skip, zero_grad, scale, _) in enumerate(_flag_settings(full, 1)):
        constexprs = {"DECOUPLED": i // 8 % 2 == 0, "HAS_SCALE": scale, "HAS_SKIP": skip,
                      "OUT_MODE": _OUT_MODES[out], "ZERO_GRAD": zero_grad, "BLOCK": adamw.BLOCK_SIZE}  # fmt: skip
        found.append(Variant("adam", grad, out, constexprs, per_launch_loads=int(scale) + int(skip)))
    # Momentum: none, the first step (the buffer is only written), later steps (read and written).
    momentum_states = [(False, False), (True, True), (True, False)]
    for i, (grad, out, skip, zero_grad, scale, state) in enumerate(_flag_settings(full, 3)):
        has_momentum, first = momentum_states[state]
        constexprs = {"HAS_MOMENTUM": has_momentum, "FIRST": first, "NESTEROV": has_momentum and i // 8 % 2 == 0,
                      "HAS_SCALE": scale, "HAS_SKIP": skip, "OUT_MODE": _OUT_MODES[out],
                      "ZERO_GRAD": zero_grad, "BLOCK": sgd.BLOCK_SIZE}  # fmt: skip
        found.append(Variant("sgd", grad, out, constexprs, per_launch_loads=int(scale) + int(skip)))
    for grad in _DTYPES:
        found.append(
            Variant("grad_stats", grad, "none", {"BLOCK": grad_stats.BLOCK_SIZE}, per_program_stores=2)
        )
    return found + quantize_variants(full)


# Quantization block sizes compiled: many blocks per tile, few, and one block filling the tile.
QUANT_BLOCKS = (64, 512, 4096)


def quantize_variants(full: bool = False) -> list[Variant]:
    """Quantization per input dtype and dequantization per output dtype, with the tile plan the
    launchers take for long rows: with `full` at every block size of QUANT_BLOCKS, otherwise at
    each in turn (6 variants)."""
    quantize = _kernel_modules()[3]
    found = []
    for kernel, dtypes in (("quantize", _DTYPES), ("dequantize", ("fp32", "bf16", "fp16"))):
        pairs = enumerate(dtypes) if not full else itertools.product(range(len(QUANT_BLOCKS)), dtypes)
        for i, dtype in pairs:
            block = QUANT_BLOCKS[i % len(QUANT_BLOCKS)]
            qb, nb_tile, _, warps = quantize._plan(1 << 20, block)
            constexprs = {"QBLOCK": block, "QB": qb, "NB": nb_tile}
            if kernel == "quantize":
                found.append(
                    Variant(kernel, dtype, "int8", constexprs, per_program_stores=1, num_warps=warps)
                )
            else:
                constexprs["OUT_MODE"] = 1 if dtype == "bf16" else 2
                # Without fp fusion, as the launcher: each product is rounded before it is added.
                options = {"per_program_loads": 1, "num_warps": warps, "fp_fusion": False}
                found.append(Variant(kernel, "int8", dtype, constexprs, **options))
    return found


def _signature(variant: Variant) -> tuple[object, dict[str, str], set[int]]:
    """The kernel object, its argument types, and which arguments the JIT would see as 16-byte
    divisible (pointers, and the element count of padded shards)."""
    adamw, grad_stats, sgd, quantize = _kernel_modules()
    if variant.kernel == "quantize":
        # x, q, scales; n, blocks per row, tiles per row. Rows padded to 16 elements.
        kernel, pointers, scalars = (
            quantize._quantize_kernel,
            ["*" + variant.grad_dtype, "*i8", "*fp32"],
            ["i32"] * 3,
        )
        divisible = {0, 1, 2, 3}
    elif variant.kernel == "dequantize":
        # q, scales, out; n, blocks per row, tiles per row, K, q's and scales' strides along K.
        kernel, pointers, scalars = (
            quantize._dequantize_kernel,
            ["*i8", "*fp32", "*" + variant.out],
            ["i32"] * 6,
        )
        divisible = {0, 1, 2, 3, 7}
    if variant.kernel in ("quantize", "dequantize"):
        types = pointers + scalars
        signature = {
            name: types[i] if i < len(types) else "constexpr" for i, name in enumerate(kernel.arg_names)
        }
        return kernel, signature, divisible
    grad = "*" + _DTYPES[variant.grad_dtype]
    # Without a copy the kernel is handed the fp32 parameter in the copy's place.
    out = "*" + ("fp32" if variant.out == "none" else _DTYPES[variant.out])
    if variant.kernel == "adam":
        kernel = adamw._adam_kernel
        pointers = ["*fp32", grad, "*fp32", "*fp32", out, "*fp32", "*fp32"]
        scalars = ["i32"] + ["fp32"] * 7
    elif variant.kernel == "sgd":
        kernel = sgd._sgd_kernel
        pointers = ["*fp32", grad, "*fp32", out, "*fp32", "*fp32"]
        scalars = ["i32"] + ["fp32"] * 4
    else:
        kernel = grad_stats._grad_stats_kernel
        pointers = [grad, "*fp32"]
        scalars = ["i32", "i32"]
    types = pointers + scalars
    names = kernel.arg_names
    signature = {name: types[i] if i < len(types) else "constexpr" for i, name in enumerate(names)}
    # Pointers and the element count: divisible by 16 on every call the engine makes.
    divisible = set(range(len(pointers) + 1))
    return kernel, signature, divisible


def _ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers per thread, spill bytes) from `ptxas -v`, with the ptxas Triton uses for the target."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={TARGETS[capability]}", source,
             "-o", os.path.join(folder, "kernel.cubin")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    log = result.stdout + result.stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{log}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def count_accesses(ptx: str) -> dict[str, int]:
    """Global loads and stores in `ptx`, split into 128-bit ones and narrower ones."""
    counts = {"vector_loads": 0, "scalar_loads": 0, "vector_stores": 0, "scalar_stores": 0}
    for op, lanes, bits in _ACCESS.findall(ptx):
        width = int(lanes or 1) * int(bits)
        kind = "loads" if op == "ld" else "stores"
        counts[("vector_" if width == 128 else "scalar_") + kind] += 1
    return counts


def compile_variant(variant: Variant, capability: int) -> Report:
    """Compile `variant` for `capability` (80 or 90) and report its memory accesses and registers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel, signature, divisible = _signature(variant)
    source = ASTSource(
        kernel, signature, dict(variant.constexprs), {(i,): [["tt.divisibility", 16]] for i in divisible}
    )
    target = GPUTarget("cuda", capability, 32)
    options = make_backend(target).parse_options(
        {"num_warps": variant.num_warps, "enable_fp_fusion": variant.fp_fusion}
    )
    compiled = triton.compile(source, target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    registers, spill_bytes = _ptxas_usage(ptx, capability)
    counts = count_accesses(ptx)
    return Report(
        variant=variant.label,
        target=TARGETS[capability],
        registers=registers,
        spill_bytes=spill_bytes,
        **counts,
        unexpected_scalar_loads=max(
            0, counts["scalar_loads"] - variant.per_launch_loads - variant.per_program_loads
        ),
        unexpected_scalar_stores=max(0, counts["scalar_stores"] - variant.per_program_stores),
    )


def main(argv: list[str] | None = None) -> None:
    """Compile every variant for the given targets and print one JSON report per line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    parser.add_argument("--all", action="store_true", help="every combination of flags, not the covering set")
    options = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    for capability in options.arch:
        for variant in variants(full=options.all):
            print(json.dumps(asdict(compile_variant(variant, capability))), flush=True)


if __name__ == "__main__":
    main()
