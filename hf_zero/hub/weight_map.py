"""Which tensors of a pretrained folder fill which parameters and buffers of a model, read from the
safetensors headers alone.

File keys are matched as transformers' `from_pretrained` matches them: its weight renamings
(legacy names such as `LayerNorm.gamma`, and any `key_mapping` the caller gives), the model's
base-model prefix added or removed (a `BertModel` folder loaded into `BertForMaskedLM`, or the
other way round), and its weight converters where the model stacks what the file keeps apart (a
mixture-of-experts layer holds all its experts in one tensor; the file, one tensor per expert).
A stacked parameter is the file's tensors laid end to end, expert by expert, so it becomes a
list of pieces that each rank can read in part. A converter that rearranges elements in any other
way would need whole tensors on every rank, and is refused by name.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

from .pending import Piece
from .weights import TensorEntry


@dataclass
class WeightMap:
    """What the folder holds for the model.

    Attributes:
        sources: model key -> the pieces of file tensors that make its flattened value, in order
            (only keys whose shapes agree).
        file_keys: model key -> the file key(s) it comes from, for messages.
        mismatched: model key -> (file key(s), file shape, model shape) where the shapes disagree.
        unexpected: model-side name -> the file tensor that matches nothing in the model.
    """

    sources: dict[str, tuple[Piece, ...]] = field(default_factory=dict)
    file_keys: dict[str, str] = field(default_factory=dict)
    mismatched: dict[str, tuple[str, torch.Size, torch.Size]] = field(default_factory=dict)
    unexpected: dict[str, TensorEntry] = field(default_factory=dict)


def map_weights(
    model: nn.Module, entries: dict[str, TensorEntry], key_mapping: dict[str, str] | None = None
) -> WeightMap:
    """Match the file tensors `entries` (see `weights.read_headers`) to `model`'s state dict keys."""
    transforms = get_model_conversion_mapping(model, key_mapping, None)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    converter_of = {pattern: c for c in converters for pattern in c.source_patterns}
    expected = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") or None
    found = WeightMap()
    stacked: dict[str, tuple[WeightConverter, dict[str, list[TensorEntry]]]] = {}
    # Natural order (expert 2 before expert 10): the order in which converters stack tensors.
    for key in sorted(entries, key=dot_natural_key):
        entry = entries[key]
        name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:  # renamed away from a key the model has
            name, pattern = rename_source_key(key, [], [], prefix, expected)
        if name not in expected:
            found.unexpected[name] = entry
        elif pattern is not None:
            converter, collected = stacked.setdefault(name, (converter_of[pattern], defaultdict(list)))
            collected[pattern].append(entry)
        elif name in found.file_keys:
            raise ValueError(
                f"both {found.file_keys[name]!r} and {key!r} in the folder's weights fill "
                f"{type(model).__name__}.{name}; keep one of them"
            )
        else:
            _add(found, name, key, (Piece(entry, 0, entry.numel),), entry.shape, expected[name].shape)
    for name, (converter, collected) in stacked.items():
        pieces, shape = _stacked_pieces(name, converter, collected)
        keys = ", ".join(e.key for entries_of in collected.values() for e in entries_of[:1]) + ", ..."
        _add(found, name, keys, pieces, shape, expected[name].shape)
    return found


def _add(
    found: WeightMap,
    name: str,
    file_keys: str,
    pieces: tuple[Piece, ...],
    file_shape: torch.Size,
    model_shape: torch.Size,
) -> None:
    found.file_keys[name] = file_keys
    if tuple(file_shape) != tuple(model_shape):
        found.mismatched[name] = (file_keys, torch.Size(file_shape), torch.Size(model_shape))
    else:
        found.sources[name] = pieces


def _stacked_pieces(
    name: str, converter: WeightConverter, collected: dict[str, list[TensorEntry]]
) -> tuple[tuple[Piece, ...], torch.Size]:
    """The pieces (and resulting shape) of a parameter that stacks file tensors: per expert, each
    source pattern's tensor in turn.

    `MergeModulelist(dim=0)` stacks each pattern's tensors; `Concatenate(dim=1)` then joins the
    stacks along the tensors' own first dimension, which keeps every file tensor contiguous.
    """
    steps = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
    if steps not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]):
        raise NotImplementedError(
            f"{name}: transformers converts the file's {converter.source_patterns} into it with "
            f"{[type(op).__name__ for op in converter.operations]}, which hf_zero cannot read in slices yet; "
            "load this model with a ZeroConfig of stage 0-2 (every rank then reads it whole)"
        )
    stacks = [collected[pattern] for pattern in converter.source_patterns if pattern in collected]
    if len(steps) == 1 and len(stacks) != 1:
        raise NotImplementedError(
            f"{name}: a stacking converter with several source patterns {list(collected)}"
        )
    experts = len(stacks[0])
    rows = 0
    for stack in stacks:
        shapes = {tuple(entry.shape) for entry in stack}
        if (
            len(stack) != experts
            or len(shapes) != 1
            or tuple(stack[0].shape[1:]) != tuple(stacks[0][0].shape[1:])
        ):
            raise ValueError(
                f"the folder's tensors for {name} ({[e.key for e in stack][:4]}, ...) do not stack: they differ in "
                "number or shape; the folder is incomplete or was saved from another configuration"
            )
        rows += stack[0].shape[0] if stack[0].shape else 1
    first = stacks[0][0].shape
    shape = torch.Size([experts, *first]) if len(steps) == 1 else torch.Size([experts, rows, *first[1:]])
    pieces = tuple(Piece(stack[e], 0, stack[e].numel) for e in range(experts) for stack in stacks)
    return pieces, shape
