"""Muon as it is usually run: `torch.optim.Muon` for the hidden 2-D matrices, AdamW for the
embeddings, the output head, norms and biases, chained into one optimizer.

`muon_with_adamw(model, ...)` builds that chain for a plain loop, `hf_zero.initialize`,
`ZeroAccelerator.prepare` or `ZeroTrainer`; `hidden_matrix_names(model)` says which parameters
it gives Muon. `MuonWithAdamW` is the same as an optimizer factory for `transformers.Trainer`'s
`optimizer_cls_and_kwargs` (the plain Trainer's as well as `ZeroTrainer`'s).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.chained_optimizer import ChainedOptimizer


def hidden_matrix_names(model: nn.Module) -> list[str]:
    """The trainable 2-D weights Muon should take: all of them but embeddings (every `nn.Embedding`)
    and the output head (`model.get_output_embeddings()`, tied or not)."""
    excluded = {
        id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()
    }
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        excluded |= {id(p) for p in head.parameters()}
    return [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and param.dim() == 2 and id(param) not in excluded
    ]


def muon_with_adamw(
    model: nn.Module,
    lr: float = 0.02,
    momentum: float = 0.95,
    weight_decay: float = 0.1,
    adamw_lr: float = 3e-4,
    adamw_betas: tuple[float, float] = (0.9, 0.999),
    adamw_eps: float = 1e-8,
    adamw_weight_decay: float = 0.0,
    **muon_kwargs,
) -> ChainedOptimizer:
    """`torch.optim.Muon` (with `lr`, `momentum`, `weight_decay` and any other Muon setting in
    `muon_kwargs`, such as `nesterov`, `ns_steps` or `adjust_lr_fn`) over `hidden_matrix_names(model)`,
    and `torch.optim.AdamW` with the `adamw_*` settings over every other trainable parameter, as one
    `ChainedOptimizer`. Build it before `hf_zero.initialize` (or pass the two as a list)."""
    muon_class = getattr(torch.optim, "Muon", None)
    if muon_class is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.optim.Muon (torch >= 2.9 has); upgrade torch"
        )
    hidden = set(hidden_matrix_names(model))
    if not hidden:
        raise ValueError("the model has no trainable 2-D hidden weights for Muon; use AdamW alone")
    matrices = [p for n, p in model.named_parameters() if n in hidden]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and n not in hidden]
    optimizers = [muon_class(matrices, lr=lr, momentum=momentum, weight_decay=weight_decay, **muon_kwargs)]
    if rest:
        optimizers.append(
            torch.optim.AdamW(
                rest, lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay
            )
        )
    return ChainedOptimizer(optimizers)


class MuonWithAdamW:
    """`optimizer_cls_and_kwargs=(hf_zero.MuonWithAdamW, {"lr": 0.02, "adamw_lr": 3e-4, ...})` for a
    `transformers.Trainer`: the Trainer calls the factory with its model and these settings (those
    of `muon_with_adamw`)."""

    def __call__(self, model: nn.Module, **settings) -> ChainedOptimizer:
        return muon_with_adamw(model, **settings)
