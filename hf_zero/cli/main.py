"""The `hf-zero` command.

hf-zero train RECIPE.yaml [--nproc N] [--max-restarts K] [--nnodes M --node-rank R --master-addr A]
              [section.key=value ...]
hf-zero estimate MODEL_OR_CONFIG [--gpus N] [--nodes M] [--batch B --seq S] [--gpu-memory 80GB]
hf-zero merge CKPT_DIR OUT_DIR [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]
hf-zero merge --verify CKPT_DIR
hf-zero env [--nvme-path DIR] [--strict]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys

USAGE = """usage: hf-zero [--version] COMMAND ...

commands:
  train RECIPE.yaml [--nproc N] [--max-restarts K] [--nnodes M --node-rank R --master-addr A]
        [section.key=value ...]
        train a recipe with ZeroTrainer on N processes (NCCL on GPUs, gloo on CPU); with K, a
        failed process restarts them all, resuming from the newest complete checkpoint; on M
        machines, run it on each (their output folder must be shared)
  estimate MODEL_OR_CONFIG [--gpus N] [--nodes M] [--batch B --seq S] [--gpu-memory 80GB]
        memory per GPU and host for each ZeRO stage and offload choice, and the communication
        per step (a config.json, a model folder or a cached Hub id; no weights are read)
  merge CKPT_DIR OUT_DIR [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]
        write an hf_zero checkpoint as a save_pretrained folder (one CPU process)
  merge --verify CKPT_DIR
        check a checkpoint's manifest and checksums and print a summary
  env [--nvme-path DIR] [--strict]
        print the versions and devices hf_zero sees, host and locked memory, NVMe free space; a
        warning for each package outside the versions CI tested (--strict: then exit 1)
"""


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-zero train", description="Train a recipe with ZeroTrainer.")
    parser.add_argument("recipe", nargs="?", help="path to a recipe YAML file (see recipes/)")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes to launch (default: one per GPU, or 1 without GPUs)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart every process up to K times when one fails (torchrun's restarts); a restarted run "
        "resumes from the newest complete checkpoint in its output folder (training.save_strategy must save)",
    )
    parser.add_argument(
        "--nnodes", type=int, default=1, help="machines taking part (run the command on each)"
    )
    parser.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0 .. nnodes-1")
    parser.add_argument("--master-addr", default=None, help="address of node 0, which every node can reach")
    parser.add_argument("--master-port", type=int, default=29500, help="a free port on node 0")
    parser.add_argument("overrides", nargs="*", help="recipe overrides such as training.max_steps=50")
    return parser


def _launch_arguments(options: argparse.Namespace, nproc: int) -> list[str]:
    """torchrun's arguments for `hf-zero train`: this machine alone (standalone rendezvous), or one
    node of several meeting at node 0's address."""
    if options.nnodes == 1:
        where = ["--standalone", "--nnodes", "1"]
    else:
        where = [
            "--nnodes", str(options.nnodes), "--node-rank", str(options.node_rank),
            "--master-addr", options.master_addr, "--master-port", str(options.master_port),
        ]  # fmt: skip
    return [
        *where, "--nproc_per_node", str(nproc), "--max-restarts", str(options.max_restarts),
        "-m", "hf_zero.cli", "train", options.recipe, *options.overrides,
    ]  # fmt: skip


def _launch(options: argparse.Namespace, nproc: int) -> int:
    """Start the workers with torchrun's agent, run in this process: it is what `python -m
    torch.distributed.run` would run, without a second interpreter importing torch again (about
    2 CPU-seconds) before the workers start. The agent starts, watches and restarts the workers
    (`python -m hf_zero.cli train ...`, which run the recipe), and handles SIGINT and SIGTERM by
    stopping them. A failure ends as torchrun's own process ends: the error's traceback, exit 1."""
    import traceback

    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        torchrun(_launch_arguments(options, nproc))
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def train(argv: list[str]) -> int:
    """Validate the recipe, then run it here or under torchrun on `--nproc` processes."""
    parser = _train_parser()
    options = parser.parse_intermixed_args(argv)
    if options.recipe is None:
        parser.error("RECIPE is required: the recipe YAML file to train, e.g. recipes/gpt2-clm-pretrain.yaml")
    if options.nproc is not None and options.nproc < 1:
        parser.error(f"--nproc must be at least 1, got {options.nproc}")
    if options.max_restarts < 0:
        parser.error(f"--max-restarts must be 0 or more, got {options.max_restarts}")
    if options.nnodes < 1 or not 0 <= options.node_rank < options.nnodes:
        parser.error(
            f"--node-rank must be from 0 to --nnodes - 1 ({options.nnodes - 1}), got {options.node_rank}"
        )
    if options.nnodes > 1 and not options.master_addr:
        parser.error(
            "--nnodes above 1 needs --master-addr: the address of node 0, which every node can reach"
        )
    from .recipes import Recipe, check_run, run_recipe

    try:
        recipe = Recipe.load(options.recipe, options.overrides)
    except (ValueError, OSError) as error:
        print(f"hf-zero train: {error}", file=sys.stderr)
        return 2
    import torch

    nproc = options.nproc if options.nproc is not None else max(torch.cuda.device_count(), 1)
    if "WORLD_SIZE" not in os.environ:  # the launching process checks once, not every rank
        try:
            check_run(recipe)
        except (ValueError, ImportError, RuntimeError, OSError) as error:
            print(f"hf-zero train: {error}", file=sys.stderr)
            return 2
    if (nproc > 1 or options.max_restarts or options.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        return _launch(options, nproc)
    result = run_recipe(recipe)
    if int(os.environ.get("RANK", "0")) == 0:
        if result.eval_metrics:  # the final evaluation, printed here once
            shown = ", ".join(
                f"{key.removeprefix('eval_')} {value:.4g}" for key, value in result.eval_metrics.items()
            )
            print(f"hf-zero train: final eval at step {result.eval_step}: {shown}")
        train_loss = result.train_metrics.get("train_loss")
        loss = f"; mean training loss {train_loss:.4g}" if train_loss is not None else ""
        print(
            f"hf-zero train: done, training took {result.runtime_s:.0f} s{loss}; {', '.join(result.written)} "
            f"written to {result.output_dir}"
        )
    _end_launched_worker()
    return 0


def _end_launched_worker() -> None:
    """Leave the process group once a rank started by torchrun has done and written its work, as a
    well-behaved script does; the rank then exits through the interpreter's ordinary teardown
    (hf_zero ends its engines' threads and process groups before it, see `hf_zero.engine.teardown`)."""
    if "WORLD_SIZE" not in os.environ:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def merge(argv: list[str]) -> int:
    """Merge a checkpoint into a `save_pretrained` folder, or (`--verify`) check it."""
    parser = argparse.ArgumentParser(
        prog="hf-zero merge", description="Write an hf_zero checkpoint as a save_pretrained folder."
    )
    parser.add_argument("checkpoint", help="checkpoint folder (or a Trainer checkpoint-N folder holding one)")
    parser.add_argument("output", nargs="?", help="folder to write (new or empty)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast the weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest weight file (default 5GB)")
    parser.add_argument("--verify", action="store_true", help="only check the checkpoint and summarise it")
    options = parser.parse_args(argv)
    from .merge import merge_checkpoint, verify_checkpoint

    try:
        if options.verify:
            summary = verify_checkpoint(options.checkpoint)
            print("hf-zero merge --verify: checkpoint is complete and every checksum matches")
            for key, value in summary.items():
                print(f"  {key:21s} {value}")
            return 0
        if options.output is None:
            parser.error("OUT_DIR is needed (or pass --verify)")
        result = merge_checkpoint(options.checkpoint, options.output, options.dtype, options.max_shard_size)
    except (ValueError, OSError) as error:
        print(f"hf-zero merge: {error}", file=sys.stderr)
        return 1
    print(
        f"hf-zero merge: wrote {len(result['files'])} weight file(s), {result['total_size'] / 2**20:.1f} MiB "
        f"in {result['dtype']}, to {result['output_dir']}"
    )
    return 0


def _bytes(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def host_memory_lines(nvme_path: str | None = None) -> list[str]:
    """What offload depends on: host memory, the page-locked memory limit (`ulimit -l`; pinned
    buffers count against it) and, when an NVMe folder is given, its free space."""
    import resource

    lines = []
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    available = os.sysconf("SC_AVPHYS_PAGES") * page_size
    lines.append(f"host memory  {_bytes(pages * page_size)} total, {_bytes(available)} free")
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    locked = "unlimited" if soft == resource.RLIM_INFINITY else _bytes(soft)
    lines.append(f"locked mem   {locked} (ulimit -l, the limit on page-locked memory)")
    if nvme_path is not None:
        if os.path.isdir(nvme_path):
            usage = shutil.disk_usage(nvme_path)
            writable = "writable" if os.access(nvme_path, os.W_OK) else "NOT writable"
            lines.append(
                f"nvme_path    {nvme_path}: {_bytes(usage.free)} free of {_bytes(usage.total)}, {writable}"
            )
        else:
            lines.append(f"nvme_path    {nvme_path}: not a folder")
    return lines


def env(argv: list[str]) -> int:
    """Print the software and devices relevant to hf_zero (`--nvme-path DIR`: its free space too),
    with a warning for each package outside the versions CI tested (`--strict`: then exit 1)."""
    parser = argparse.ArgumentParser(prog="hf-zero env")
    parser.add_argument("--nvme-path", default=None, help="an NVMe offload folder to report free space for")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a package lies outside the versions CI tested"
    )
    options = parser.parse_args(argv)
    import torch
    import torch.distributed as dist

    import hf_zero

    from .tested_versions import installed_versions, untested_warnings

    print(f"hf_zero      {hf_zero.__version__}")
    print(f"python       {platform.python_version()} ({platform.platform()})")
    versions = installed_versions()
    for package, version in versions.items():
        print(f"{package:12s} {version or 'not installed'}")
    warnings = untested_warnings(versions)
    for line in warnings:
        print(line)
    backends = [
        name for name in ("nccl", "gloo") if dist.is_available() and getattr(dist, f"is_{name}_available")()
    ]
    print(f"backends     {', '.join(backends) or 'none'}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(f"cuda:{index}       {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        print("cuda         not available: training runs on CPU with gloo")
    for line in host_memory_lines(options.nvme_path):
        print(line)
    return 1 if warnings and options.strict else 0


def estimate(argv: list[str]) -> int:
    """Print the memory and communication estimate for a model (see `hf_zero.cli.estimate`)."""
    from .estimate import estimate_command

    return estimate_command(argv)


COMMANDS = {"train": train, "estimate": estimate, "merge": merge, "env": env}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-zero` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        from ..version import __version__

        print(f"hf-zero {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"hf-zero: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return command(argv[1:])
