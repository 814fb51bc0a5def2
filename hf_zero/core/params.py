"""Which parameters the engine manages and in which dtype: the checks that keep sharding exact,
the names an unsharded optimizer's positional state refers to, and the modules a model keeps in
fp32."""

from __future__ import annotations

import re

import torch
from torch import nn


def device_of(module: nn.Module) -> torch.device | None:
    for param in module.parameters():
        return param.device
    return None


def keep_in_fp32_parameter_ids(module: nn.Module, compute_dtype: torch.dtype) -> set[int]:
    """Parameters that compute in fp32 under `compute_dtype`, as `from_pretrained` keeps them: those
    of the model's `_keep_in_fp32_modules_strict` (bf16 and fp16) and `_keep_in_fp32_modules` (fp16)."""
    matcher = keep_in_fp32_matcher(module, compute_dtype)
    if matcher is None:
        return set()
    return {id(param) for name, param in module.named_parameters() if matcher.search(name)}


def keep_in_fp32_matcher(module: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    """A pattern matching the names of the parameters and buffers the model keeps in fp32 when it
    is loaded in `dtype` (None when there are none)."""
    if dtype == torch.float32:
        return None
    patterns = list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        patterns += list(getattr(module, "_keep_in_fp32_modules", None) or [])
    if not patterns:
        return None
    alternatives = "|".join(re.escape(p).replace(r"\*", r"[^.]*") for p in sorted(patterns))
    return re.compile(rf"(?:^|\.)(?:{alternatives})(?:\.|$)")


def names_in_groups(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str | None]]:
    """The model name of every tensor in each param group, in order, as the user built them (frozen
    ones included): what the positional state of an unsharded optimizer refers to."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names.get(id(param)) for param in group["params"]] for group in optimizer.param_groups]


def trainable_parameters_by_group(
    module: nn.Module, optimizer: torch.optim.Optimizer
) -> list[list[tuple[str, nn.Parameter]]]:
    """(name, parameter) pairs of each param group, with the checks that keep sharding exact."""
    names = {id(p): n for n, p in module.named_parameters()}
    in_optimizer = set()
    grouped = []
    for index, group in enumerate(optimizer.param_groups):
        pairs = []
        for param in group["params"]:
            if id(param) not in names:
                raise ValueError(
                    f"param group {index} of the optimizer holds a tensor of shape {tuple(param.shape)} "
                    "that is not a parameter of the model; build the optimizer over model.parameters()"
                )
            in_optimizer.add(id(param))
            if param.requires_grad:
                pairs.append((names[id(param)], param))
        grouped.append(pairs)
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
    if missing:
        raise ValueError(
            f"parameters {missing[:5]} require grad but are in no param group of the optimizer; add them "
            "to the optimizer or set requires_grad=False"
        )
    return grouped


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model (its checkpoints hold an adapter, not a whole model)."""
    try:
        from peft import PeftMixedModel, PeftModel
    except ImportError:
        return False
    return isinstance(model, (PeftModel, PeftMixedModel))


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """`param.data = value`, also when `param` is on the meta device, whose tensors cannot take
    another device's data: the object and its attributes stay the same, so every module, tied
    weight and optimizer holding it sees the new value."""
    if param.is_meta and not value.is_meta:
        # Give the object an empty tensor of the right device first. Taking `value` itself in the
        # swap would also take its version counter, shared with the buffer it views, so autograd
        # would see in-place writes to that buffer (stage-3 gathers) as changes to the parameter.
        placeholder = torch.empty(0, dtype=value.dtype, device=value.device)
        if isinstance(param, nn.Parameter):
            placeholder = nn.Parameter(placeholder, requires_grad=param.requires_grad)
        placeholder.__dict__.update(param.__dict__)
        torch.utils.swap_tensors(param, placeholder)
    param.data = value
