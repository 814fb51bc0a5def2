"""The `hf-zero estimate` command: its options, and the run that reads the model, estimates every
stage and offload choice and prints the report."""

from __future__ import annotations

import argparse
import math
import re
import sys

from .formulas import DEFAULT_INTER_GBPS, DEFAULT_INTRA_GBPS, OPTIMIZERS, PRECISION_BYTES, estimate_all
from .report import format_report
from .shape import EstimateError, load_config, model_shape

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes of a size such as "80GB" (10^9), "80GiB" (2^30) or "512MB"; a bare number is in GB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size: use a number and a unit, e.g. 80GB, 80GiB or 24576MiB")
    number = float(match.group(1))
    return round(number * (_UNITS[unit] if unit else 10**9))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _bandwidth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a bandwidth: give Gbit/s as a positive number")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


class _Usage(Exception):
    """A bad command line, already reported."""


class _Parser(argparse.ArgumentParser):
    """argparse, reporting a bad command line in one line (with the fix) rather than usage plus error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise _Usage


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hf-zero estimate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Estimate, for every ZeRO stage (0-3) and offload choice, the memory per GPU and per node and\n"
            "the communication per optimizer step, and which combinations fit the GPU. Every parameter is\n"
            "trained with AdamW (two fp32 states per element), or with --optimizer muon the hidden\n"
            "matrices with Muon (one); only the config is read, no weights."
        ),
        epilog=(
            "Sizes: GB = 10^9 bytes, GiB = 2^30 (a bare number is GB); the tables print GiB or MiB.\n"
            "'tight': the estimate fits but takes over 90% of the GPU, which also needs room for the\n"
            "CUDA context, allocator fragmentation and kernels' temporary buffers.\n"
            "Communication counts ring collectives as the engine does (engine.last_step_comm_bytes);\n"
            "its time is bytes / the slower of the GPU's intra-node link and (on several nodes) the\n"
            "node's network, with no overlap with compute."
        ),
    )
    parser.add_argument(
        "model",
        metavar="MODEL_OR_CONFIG",
        help="a config.json, a model folder, or a Hub id already in the local Hugging Face cache",
    )
    parser.add_argument(
        "--gpus", type=_positive_int, default=1, metavar="N", help="GPUs per node (default 1)"
    )
    parser.add_argument(
        "--nodes",
        type=_positive_int,
        default=1,
        metavar="M",
        help="nodes (default 1); world size = gpus x nodes",
    )
    parser.add_argument(
        "--batch",
        type=_positive_int,
        default=1,
        metavar="B",
        help="micro-batch per GPU, in sequences (default 1)",
    )
    parser.add_argument(
        "--seq", type=_positive_int, default=2048, metavar="S", help="tokens per sequence (default 2048)"
    )
    parser.add_argument(
        "--grad-accum",
        type=_positive_int,
        default=1,
        metavar="K",
        help="micro-batches per optimizer step (default 1); more keep gradients in fp32, and stages 2-3 "
        "reduce once per micro-batch",
    )
    parser.add_argument(
        "--precision", choices=list(PRECISION_BYTES), default="bf16", help="compute precision (default bf16)"
    )
    parser.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        default="adamw",
        help="adamw (default), or muon: torch.optim.Muon for the hidden matrices and AdamW for the rest",
    )
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="activation checkpointing per layer (model.gradient_checkpointing_enable())",
    )
    parser.add_argument(
        "--gpu-memory",
        type=_size,
        default="80GB",
        metavar="SIZE",
        help="memory of one GPU, e.g. 80GB, 24GiB (default 80GB)",
    )
    parser.add_argument(
        "--intra-gbps",
        type=_bandwidth,
        default=DEFAULT_INTRA_GBPS,
        metavar="GBPS",
        help=f"each GPU's link to the others in its node, Gbit/s (default {DEFAULT_INTRA_GBPS:g}: "
        "NVLink-class, 300 GB/s; PCIe 4.0 x16 is about 200)",
    )
    parser.add_argument(
        "--inter-gbps",
        type=_bandwidth,
        default=DEFAULT_INTER_GBPS,
        metavar="GBPS",
        help=f"each node's network, all its NICs together, Gbit/s (default {DEFAULT_INTER_GBPS:g}; "
        "8 x 400 Gb/s InfiniBand is 3200)",
    )
    return parser


def estimate_command(argv: list[str]) -> int:
    """`hf-zero estimate`: print the memory and communication tables; 2 on bad input (one line on
    stderr saying what is wrong and what to do)."""
    parser = _parser()
    try:
        options = parser.parse_args(argv)
    except _Usage:
        return 2
    except SystemExit as exit:  # --help
        return int(exit.code or 0)
    try:
        shape = model_shape(load_config(options.model))
        estimates = estimate_all(
            shape,
            gpus=options.gpus,
            nodes=options.nodes,
            precision=options.precision,
            batch=options.batch,
            seq=options.seq,
            grad_accum=options.grad_accum,
            checkpointing=options.checkpointing,
            intra_gbps=options.intra_gbps,
            inter_gbps=options.inter_gbps,
            optimizer=options.optimizer,
        )
    except (EstimateError, ValueError) as error:
        print(f"hf-zero estimate: {error}", file=sys.stderr)
        return 2
    print(format_report(shape, estimates, options))
    return 0
