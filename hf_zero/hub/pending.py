"""Parameters whose values are still in safetensors files: what `hf_zero.from_pretrained` hands
the engine at stage 3, so that each rank reads only the elements it keeps.

Such a parameter sits on the meta device (a shape and a dtype, no storage) and is described by
its *pieces*: runs of elements of file tensors which, end to end, make its flattened value (one
piece for an ordinary weight; several when the model stacks what the file keeps apart, such as
the experts of a mixture-of-experts layer). `PendingWeights.read(param, begin, length)` reads
just those bytes (`RangeReader` counts them) and converts them to the parameter's dtype, the way
`transformers` would have loaded it.

Until the engine takes the model over, using it would compute with weights that are not there,
so `attach` installs guards: running the model, or moving or casting it (`.to`, `.cuda`, `.half`,
which all go through `Module._apply`), raises an error saying what to do instead.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.params import assign
from .weights import TensorEntry

_ATTR = "_hf_zero_pending"


class RangeReader:
    """Reads runs of elements of safetensors tensors with positioned reads, counting the bytes read."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self._files: dict[Path, io.FileIO] = {}

    def read(self, entry: TensorEntry, begin: int, length: int) -> torch.Tensor:
        """Elements `begin .. begin + length` of `entry` (flattened), in the file's dtype, on the CPU."""
        if length == 0:
            return torch.empty(0, dtype=entry.dtype)
        file = self._files.get(entry.file)
        if file is None:
            file = self._files[entry.file] = io.FileIO(entry.file, "r")  # unbuffered: reads what is asked
        buffer = bytearray(length * entry.dtype.itemsize)
        view = memoryview(buffer)
        file.seek(entry.start + begin * entry.dtype.itemsize)
        done = 0
        while done < len(buffer):  # a read may return fewer bytes than asked for
            count = file.readinto(view[done:])
            if not count:
                raise OSError(
                    f"{entry.file} ended while reading tensor {entry.key!r}: the file was truncated"
                )
            done += count
        self.bytes_read += len(buffer)
        # safetensors data is little-endian, as are the CPUs torch runs on.
        return torch.frombuffer(buffer, dtype=entry.dtype)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


@dataclass(frozen=True)
class Piece:
    """A run of elements of one file tensor: `length` elements from element `begin` of `entry`."""

    entry: TensorEntry
    begin: int
    length: int


@dataclass(frozen=True)
class PendingParameter:
    """A parameter still on disk: its name, the dtype it loads in, and the pieces of its value in order."""

    name: str
    dtype: torch.dtype
    pieces: tuple[Piece, ...]


class PendingWeights:
    """The parameters of one model that are still in files, keyed by parameter identity."""

    def __init__(self) -> None:
        self.reader = RangeReader()
        # id -> (the parameter itself, held so that its id stays its own; what it loads from)
        self._params: dict[int, tuple[torch.Tensor, PendingParameter]] = {}
        self._guards: list = []

    def add(self, param: nn.Parameter, pending: PendingParameter) -> None:
        total = sum(piece.length for piece in pending.pieces)
        if total != param.numel():
            raise ValueError(f"{pending.name}: the file holds {total} elements for {param.numel()}")
        self._params[id(param)] = (param, pending)

    def __contains__(self, param: torch.Tensor) -> bool:
        return id(param) in self._params and self._params[id(param)][0] is param

    def __len__(self) -> int:
        return len(self._params)

    def read(self, param: torch.Tensor, begin: int, length: int) -> torch.Tensor:
        """Elements `begin .. begin + length` of the flattened value of `param`, in its load dtype."""
        _, pending = self._params[id(param)]
        return read_pieces(self.reader, pending.pieces, pending.dtype, begin, length)

    def materialise_all(self, model: nn.Module) -> None:
        """Read every pending parameter of `model` whole, into CPU memory."""
        for param in model.parameters():
            if param in self:
                assign(param, self.read(param, 0, param.numel()).view(param.shape))

    def values_of(self, params: list[torch.Tensor]) -> Callable[[int, int, int], torch.Tensor]:
        """`read(slot, begin, length)` over `params`: elements of the flattened parameter `params[slot]`,
        from its files if it is pending, else from its `.data`."""

        def read(slot: int, begin: int, length: int) -> torch.Tensor:
            param = params[slot]
            if param in self:
                return self.read(param, begin, length)
            return param.detach().reshape(-1)[begin : begin + length]

        return read

    # ---- the model they belong to -------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Record these weights on `model` and guard it until the engine takes them (`take`)."""
        model.__dict__[_ATTR] = self
        self._guards.append(model.register_forward_pre_hook(_refuse_forward))
        model.__dict__["_apply"] = _refuse_apply

    @staticmethod
    def of(model: nn.Module) -> PendingWeights | None:
        """The pending weights of `model`, if it has any (also when it wraps the loaded model, as a
        PEFT model made from it does)."""
        holder = _holder(model)
        return None if holder is None else holder.__dict__[_ATTR]

    @staticmethod
    def take(model: nn.Module) -> PendingWeights | None:
        """Remove the pending weights (and their guards) from `model` and return them: the engine
        calls this before it places, casts and shards the model."""
        holder = _holder(model)
        pending = None if holder is None else holder.__dict__.pop(_ATTR)
        if pending is not None:
            holder.__dict__.pop("_apply", None)
            for handle in pending._guards:
                handle.remove()
            pending._guards.clear()
        return pending

    def close(self) -> None:
        self.reader.close()
        self._params.clear()


def _holder(model: nn.Module) -> nn.Module | None:
    """The module (`model` or one inside it) that `from_pretrained` attached pending weights to."""
    return next((m for m in model.modules() if _ATTR in m.__dict__), None)


def read_pieces(
    reader: RangeReader, pieces: tuple[Piece, ...], dtype: torch.dtype, begin: int, length: int
) -> torch.Tensor:
    """Elements `begin .. begin + length` of the value that `pieces` make end to end, in `dtype`."""
    parts, start = [], 0
    for piece in pieces:
        lo, hi = max(begin, start), min(begin + length, start + piece.length)
        if lo < hi:
            parts.append(reader.read(piece.entry, piece.begin + lo - start, hi - lo).to(dtype))
        start += piece.length
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


_NOT_YET = (
    "this model was loaded by hf_zero.from_pretrained for ZeRO stage 3, so its weights are still in the "
    "safetensors files: each rank reads only its own shard of them when the model is sharded."
)


def _refuse_forward(module: nn.Module, args: Any) -> None:
    raise RuntimeError(
        f"{_NOT_YET} Shard it first (hf_zero.initialize(model, optimizer, config), ZeroTrainer, or "
        "ZeroAccelerator.prepare(model, optimizer)), then run it"
    )


def _refuse_apply(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        f"{_NOT_YET} It cannot be moved or cast (model.to, .cuda, .half, ...) before then: hand it to "
        "hf_zero.initialize, ZeroTrainer or ZeroAccelerator as it is, and the engine puts it on each rank's "
        "device; choose the dtype with from_pretrained(..., dtype=...) and ZeroConfig.precision"
    )


def initialise_new_adapters(model: nn.Module, pending: PendingWeights) -> None:
    """Give values to the LoRA weights of a PEFT model made from a stage-3 `from_pretrained` model.

    `get_peft_model` creates each adapter on the device of the layer it wraps, here the meta device,
    and so the adapter has no values; this initialises them on the host as PEFT would have
    (`init_lora_weights` True or "gaussian": A random, B zero; False: as `nn.Linear` does). The
    engine then starts every rank from the first rank's values. Initialisations that need the base
    weights (PiSSA, OLoRA, LoftQ, EVA, DoRA's magnitudes) are refused with what to do instead.
    """
    configs = getattr(model, "peft_config", None)
    if not configs:
        return
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:
        return
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        empty = [
            (name, p)
            for name, p in module.named_parameters()
            if p.is_meta and p not in pending and not name.startswith("base_layer.")
        ]
        if not empty:
            continue
        adapters = [a for a in configs if any(f".{a}." in f".{name}." for name, _ in empty)]
        for adapter in adapters:
            init = configs[adapter].init_lora_weights
            if init not in (True, False, "gaussian") or module.use_dora.get(adapter, False):
                raise NotImplementedError(
                    f"LoRA adapter {adapter!r} asks for init_lora_weights={init!r}"
                    f"{' with DoRA' if module.use_dora.get(adapter, False) else ''}, which needs the base "
                    "weights, but at stage 3 hf_zero.from_pretrained leaves them on disk until the model "
                    "is sharded. Use init_lora_weights=True or 'gaussian' without DoRA, or load the base "
                    "model with transformers' from_pretrained before get_peft_model"
                )
        for _, param in empty:
            assign(param, torch.empty(param.shape, dtype=param.dtype, device="cpu"))
        for adapter in adapters:
            init = configs[adapter].init_lora_weights
            if init is False:
                for part in (module.lora_A, module.lora_B):
                    if adapter in part:
                        part[adapter].reset_parameters()
            else:
                module.reset_lora_parameters(adapter, init)
