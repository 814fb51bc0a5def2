"""The reference: one process training on the whole global batch, no hf_zero involved.

Each step runs the global batch's micro-batch blocks one by one (each loss divided by the number
of blocks), which is what the sharded ranks compute together. fp32 trains the model as it is.
bf16 mirrors mixed-precision training by hand: the model computes in bf16 (parameters of modules
the model keeps in fp32 excepted), block gradients add up in fp32 master copies, the optimizer
updates the masters, which are rounded back into the model after each step. `delayed` mirrors
`offload_overlap="delayed"`: the model gets the masters' values before each update instead of
after, so each step computes with the weights of one update earlier.
"""

from __future__ import annotations

import torch

from ..core.params import keep_in_fp32_parameter_ids
from .cases import Case, build_optimizer, values_to_load
from .engine_matrix import FULL_GRAD_PARAMS
from .tiny_models import build_model, make_samples, slice_samples


def run_unsharded(case: Case, world_size: int, delayed: bool = False) -> dict:
    """Losses, gradient norms, early gradients and final fp32 weights of the unsharded run of `case`."""
    model = build_model(case.model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    mixed = case.precision == "bf16" or delayed
    if mixed:
        keep_fp32 = keep_in_fp32_parameter_ids(model, torch.bfloat16)
        masters = [(name, p.detach().clone().float().requires_grad_()) for name, p in named]
        for param in model.parameters():  # buffers stay as they are, as under hf_zero
            if id(param) not in keep_fp32 and case.precision == "bf16":
                param.data = param.data.to(torch.bfloat16)
    else:
        masters = named
    optimizer = build_optimizer(case.optimizer, masters, model)
    batch = case.global_batch(world_size)
    blocks = world_size * case.accumulation
    samples = make_samples(case.model, case.steps * batch)
    losses, norms, full_grads = [], [], []
    for step in range(case.steps):
        if case.scenario == "load_state_dict" and step == 1:
            values = values_to_load(case)
            with torch.no_grad():
                for (name, param), (_, master) in zip(named, masters, strict=True):
                    if name in values:
                        param.copy_(values[name])
                        master.copy_(values[name])
        step_loss = 0.0
        for block in range(blocks):
            loss = model(
                **slice_samples(samples, step * batch + block * case.micro_batch, case.micro_batch)
            ).loss
            (loss / blocks).backward()
            step_loss += loss.item() / blocks
            if mixed:
                for (_, param), (_, master) in zip(named, masters, strict=True):
                    if param.grad is not None:
                        grad = param.grad.float()
                        master.grad = grad if master.grad is None else master.grad + grad
                    param.grad = None
        losses.append(step_loss)
        full_grads.append(
            {
                n: (m.grad if m.grad is not None else torch.zeros_like(m)).detach().clone()
                for n, m in masters[:FULL_GRAD_PARAMS]
            }
        )
        if case.clipping > 0:
            norm = torch.nn.utils.clip_grad_norm_([m for _, m in masters], case.clipping)
            norms.append(norm.item())
        if delayed:  # the model takes the values before this update, not after it
            with torch.no_grad():
                for (_, param), (_, master) in zip(named, masters, strict=True):
                    param.copy_(master)
        optimizer.step()
        optimizer.zero_grad()
        if mixed and not delayed:
            with torch.no_grad():
                for (_, param), (_, master) in zip(named, masters, strict=True):
                    param.copy_(master)
    master_values = {id(p): m.detach() for (_, p), (_, m) in zip(named, masters, strict=True)}
    weights = {
        key: master_values.get(id(value), value).detach().float().clone()
        for key, value in model.state_dict(keep_vars=True).items()
        if value.is_floating_point()
    }
    return {"losses": losses, "norms": norms, "weights": weights, "full_grads": full_grads}
