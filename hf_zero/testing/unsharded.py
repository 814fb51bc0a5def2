"""The reference: one process training on the whole global batch, no hf_zero involved.

fp32 trains the model as it is. bf16 mirrors mixed-precision training by hand: the model
computes in bf16, the optimizer updates fp32 master copies, which are rounded back into the
model after each step.
"""

from __future__ import annotations

import torch

from .cases import Case, build_optimizer
from .tiny_models import build_model, make_samples, slice_samples


def run_unsharded(case: Case, world_size: int) -> dict:
    """Losses, gradient norms and final fp32 weights of the unsharded run of `case`."""
    model = build_model(case.model)
    named = list(model.named_parameters())
    if case.precision == "bf16":
        masters = [(name, p.detach().clone().float().requires_grad_()) for name, p in named]
        for param in model.parameters():  # buffers stay fp32, as under hf_zero
            param.data = param.data.to(torch.bfloat16)
    else:
        masters = named
    optimizer = build_optimizer(case.optimizer, masters)
    batch = case.global_batch(world_size)
    samples = make_samples(case.model, case.steps * batch)
    losses, norms = [], []
    for step in range(case.steps):
        loss = model(**slice_samples(samples, step * batch, batch)).loss
        loss.backward()
        losses.append(loss.item())
        if masters is not named:
            for (_, param), (_, master) in zip(named, masters, strict=True):
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None
        if case.clipping > 0:
            norm = torch.nn.utils.clip_grad_norm_([m for _, m in masters], case.clipping)
            norms.append(norm.item())
        optimizer.step()
        optimizer.zero_grad()
        if masters is not named:
            with torch.no_grad():
                for (_, param), (_, master) in zip(named, masters, strict=True):
                    param.copy_(master)
    master_values = {id(p): m.detach() for (_, p), (_, m) in zip(named, masters, strict=True)}
    weights = {
        key: master_values.get(id(value), value).detach().float().clone()
        for key, value in model.state_dict(keep_vars=True).items()
        if value.is_floating_point()
    }
    return {"losses": losses, "norms": norms, "weights": weights}
