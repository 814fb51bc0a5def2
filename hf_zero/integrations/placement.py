"""Where `ZeroAccelerator.prepare` puts the model it shards: one pure decision, apart from Accelerate.

Plain Accelerate moves a prepared model to `accelerator.device` (unless `device_placement=False`),
and its data loaders put every batch there. The engine must compute on that same device: a model
left on the CPU beside CUDA batches fails in its first forward, and beside Accelerate's NCCL process
group in its first broadcast. `decide_placement` takes what is known at `prepare` (no CUDA calls,
so every case is tested on any machine) and returns the device the engine shards onto, a warning
to show, or raises naming the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

_LET_PREPARE_PLACE = (
    "build the model on the CPU and let accelerator.prepare place it (or move it with "
    "model.to(accelerator.device) before prepare)"
)


@dataclass(frozen=True)
class Placement:
    """The device the engine shards the model onto (the engine moves the model there, or reads
    weights still on disk straight onto it), and a warning for the main process to show, if any."""

    device: torch.device
    warning: str | None = None


def decide_placement(
    target: torch.device,
    model_devices: Iterable[torch.device],
    *,
    pending: bool = False,
    device_placement: bool = True,
    cuda_available: bool = False,
    cpu: bool = False,
    num_processes: int = 1,
) -> Placement:
    """Decide where the engine puts the model, as Accelerate would place it.

    Args:
        target: `accelerator.device`, a GPU with its index (`cuda:k` for local rank k) or the CPU.
        model_devices: the devices of the model's parameters and buffers (meta tensors are ignored:
            the engine refuses those without values by name).
        pending: the weights are still on disk (stage-3 `hf_zero.from_pretrained`); the engine
            reads each rank's shard straight onto `target`, so nothing needs moving first.
        device_placement: Accelerate's setting for this model; False leaves the model where it is
            (pass False too for a model already sharded, which cannot move).
        cuda_available: whether this process sees a GPU.
        cpu: whether the CPU was asked for (`cpu=True`, `accelerate launch --cpu`, `use_cpu=True`).
        num_processes: Accelerate's number of processes.

    Raises:
        ValueError: for a device hf_zero does not compute on, a model on a GPU other than
            `target`, or a model that must stay (`device_placement=False`) where it cannot train.
    """
    if target.type not in ("cpu", "cuda"):
        raise ValueError(
            f"Accelerate chose {target} for this process, but hf_zero computes on CUDA GPUs or the CPU; "
            "pass cpu=True to ZeroAccelerator (`accelerate launch --cpu`) to train on the CPU"
        )
    warning = None
    if target.type == "cpu" and cuda_available and not cpu:
        warning = (
            "CUDA is available but Accelerate chose the CPU for this process (ACCELERATE_TORCH_DEVICE or "
            "the launch config), so hf_zero trains on the CPU; pass cpu=True to ZeroAccelerator if that is "
            "meant, or launch with one process per GPU to train on GPUs"
        )
    if pending:
        return Placement(target, warning)
    devices = sorted({device for device in model_devices if device.type != "meta"}, key=str)
    strays = [device for device in devices if device != target]
    if not strays:
        return Placement(target, warning)
    others = [str(device) for device in strays if device.type != "cpu"]
    if others and target.type != "cpu":
        # Each process computes on a GPU of its own; weights on another one would be another
        # process's memory (N ranks' full copies on one GPU) and mismatch the batches.
        raise ValueError(
            f"the model has tensors on {', '.join(others)}, but this process trains on {target} "
            f"(accelerator.device; each process has a GPU of its own): {_LET_PREPARE_PLACE}"
        )
    if device_placement:
        return Placement(target, warning)
    if len(devices) > 1:
        reason = "its tensors are on several devices and hf_zero computes on one"
    elif devices[0].type != "cpu":
        reason = f"Accelerate's device is {target}"
    elif num_processes > 1:
        reason = (
            f"Accelerate's {num_processes} processes communicate over NCCL on their GPUs ({target} here), "
            "which carries no CPU tensors"
        )
    else:
        return Placement(
            devices[0],
            "CUDA is available but the model stays on the CPU (device_placement=False, or it was sharded "
            f"there before prepare), so hf_zero trains on the CPU while Accelerate's device is {target}; "
            f"leave device_placement on (the default) to train on {target}, or pass cpu=True to "
            "ZeroAccelerator",
        )
    where = ", ".join(str(device) for device in devices)
    raise ValueError(
        f"the model is on {where} and device_placement=False (or an earlier hf_zero.initialize) keeps it "
        f"there, but {reason}: leave device_placement on (the default), or {_LET_PREPARE_PLACE}"
    )
