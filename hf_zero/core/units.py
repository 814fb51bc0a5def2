"""Units: the module subtrees whose parameters are laid out, gathered and released together.

A unit is an instance of one of the model's layer classes (`_no_split_modules`, which every
Hugging Face model names, e.g. `LlamaDecoderLayer`), or of the classes the config names; a model
that names none is cut into its top-level children (the members of a ModuleList or ModuleDict
child, which runs no forward of its own). With the model's own layer classes, its input embedding
(`get_input_embeddings()`, an `nn.Embedding`) is a unit too, unless tied to the head: it runs
first in forward and is not needed again until the end of backward, so it need not stay gathered
at the memory peak between. So is its untied output head (`get_output_embeddings()`, an
`nn.Linear`): it runs last in forward and first in backward, like a layer, rather than staying
gathered all along in the root. Not when the model's forward is Liger-Kernel's, whose fused loss
reads the head's weight without running the head. A unit's forward must run for its parameters to
be used: hooks on it gather them. Parameters outside every unit (final norm, tied embeddings and
head), and parameters that more than one unit uses (weights tied across units), form the root
unit. Units keep
registration order (`named_modules()`), which is the same on every rank whatever the data does:
the canonical order collectives follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

ROOT = "<root>"


@dataclass
class Unit:
    """One unit: its module (the model itself for the root unit) and the parameters it owns."""

    index: int
    name: str
    module: nn.Module
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def is_root(self) -> bool:
        return self.name == ROOT


def unit_class_names(model: nn.Module, requested: Sequence[str] | None) -> set[str]:
    """The layer classes that make units: those requested, else the model's `_no_split_modules`
    (looked up through wrappers such as a PEFT model)."""
    if requested:
        return set(requested)
    for candidate in (model, getattr(model, "get_base_model", lambda: None)()):
        names = getattr(candidate, "_no_split_modules", None) if candidate is not None else None
        if names:
            return set(names)
    return set()


def find_units(model: nn.Module, requested: Sequence[str] | None = None) -> list[Unit]:
    """The model's units in registration order, the root unit first.

    Raises `ValueError` when requested class names match no module of the model.
    """
    names = unit_class_names(model, requested)
    chosen: list[tuple[str, nn.Module]] = []
    if names:
        # (Tied to each other, the embedding and the head share their one weight: it goes to the root.)
        edges = (
            [] if requested else [m for m in (_input_embedding(model), _output_head(model)) if m is not None]
        )
        # named_modules() yields a module used in several places (a shared layer) once.
        for name, module in model.named_modules():
            chosen_module = type(module).__name__ in names or any(module is edge for edge in edges)
            if name and chosen_module and not _inside(name, chosen):
                chosen.append((name, module))
        if requested and not chosen:
            raise ValueError(
                f"ZeroConfig.unit_classes={list(requested)!r} matches no module of "
                f"{type(model).__name__}; name layer classes the model has, e.g. "
                f"{sorted({type(m).__name__ for m in model.modules()})[:8]}"
            )
    else:
        chosen = [
            (name, child)
            for name, child in _called_children(model, "")
            if any(True for _ in child.parameters())
        ]
    owners: dict[int, set[int]] = {}
    units = [Unit(0, ROOT, model)] + [Unit(i + 1, name, module) for i, (name, module) in enumerate(chosen)]
    for unit in units[1:]:
        for param in unit.module.parameters():
            owners.setdefault(id(param), set()).add(unit.index)
    # Modules outside every unit belong to the root: a weight they share with a unit (a head tied
    # to embeddings that sit in a unit) is used outside that unit too.
    for name, module in model.named_modules():
        if not any(name == prefix or name.startswith(prefix + ".") for prefix, _ in chosen):
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), set()).add(0)
    for param in model.parameters():  # registration order, tied parameters once
        owner = owners.get(id(param), set())
        units[next(iter(owner)) if len(owner) == 1 else 0].params.append(param)  # shared: root
    kept = [unit for unit in units if unit.params or unit.is_root]
    for position, unit in enumerate(kept):
        unit.index = position
    return kept


def _input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's input embedding module (Hugging Face's `get_input_embeddings()`), if it is a
    plain `nn.Embedding` (a tied one gives its weight to the root unit below, leaving its unit empty)."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        module = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None
    return module if isinstance(module, nn.Embedding) else None


def _output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head (`get_output_embeddings()`), if it is a plain `nn.Linear` that runs
    its own forward: not under Liger-Kernel's forward, which passes the head's weight to its fused
    loss without calling the head."""
    # Liger replaces the class's forward, or the instance's.
    forwards = (getattr(type(model), "forward", None), getattr(model, "forward", None))
    if any(getattr(forward, "__module__", "").startswith("liger_kernel") for forward in forwards):
        return None
    getter = getattr(model, "get_output_embeddings", None)
    try:
        module = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None
    return module if type(module) is nn.Linear else None


def _called_children(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """The top-level children, with containers (ModuleList, ModuleDict), which never run a forward
    of their own, replaced by their members."""
    found = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            found.extend(_called_children(child, full + "."))
        else:
            found.append((full, child))
    return found


def _inside(name: str, chosen: list[tuple[str, nn.Module]]) -> bool:
    """Whether module `name` lies inside an already chosen unit (units do not nest)."""
    return any(name.startswith(prefix + ".") for prefix, _ in chosen)
