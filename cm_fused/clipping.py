"""The fused gradient clip (``max_grad_norm``): ``clip_grad_norm_`` folded into the step.

The step's kernels already divide every gradient by GradScaler's scale as they read it;
clipping by ``c = min(1, max_norm / (norm + 1e-6))`` is dividing by ``scale / c``
instead, so the clipped gradient is never written: what the clip adds to a step is one
read of the gradients to sum their squares (and, for sharded parameters, one all-reduce
of those sums per param group). The norm is global: over every group of the optimizer
and, for DTensor parameters, every shard, of the unscaled gradients, as
``clip_grad_norm_`` after ``GradScaler.unscale_`` computes it.

A non-finite norm skips the step (it changes nothing, as GradScaler's found_inf does):
``clip_grad_norm_`` would scale the gradients by 0 or NaN and step with them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import distributed
from .planning import GroupPlan

EPS = 1e-6  # clip_grad_norm_'s: c = max_norm / (norm + 1e-6)


def global_norm(plans: list[GroupPlan], grad_scale: Tensor | None) -> Tensor:
    """The L2 norm of every gradient the step reads, unscaled: fp32, 0-dim, on the first
    group's device (no host sync)."""
    device = plans[0].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for plan in plans:
        grads = distributed.local(plan.grads) if plan.exchange is not None else plan.grads
        sums = _square_sums(plan, grads).unsqueeze(1)
        if plan.exchange:  # sharded tensors: their squares summed over the processes
            distributed.sum_over_shards(sums, plan.exchange)
        total += sums.sum().to(device)
    norm = total.sqrt()
    if grad_scale is not None:
        norm = norm / _scalar(grad_scale, device).double()
    return norm.float()


def _square_sums(plan: GroupPlan, grads: list[Tensor]) -> Tensor:
    """Each gradient's sum of squares, fp64: the backend's own pass where it has one (the
    C++ backend's, at the step's bandwidth), else torch's norms."""
    own = getattr(plan.module, "square_sums", None)
    if own is not None:
        return own(grads)
    # (fp32: torch's fp64 norm of fp32 tensors is ~70x slower on CPU; the price is a
    # limit, docs/SPEC.md: a scaled gradient norm past ~1.8e19 reads as inf)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    return torch.stack(norms).double().square()


def clipped(plans: list[GroupPlan], max_norm: float, grad_scale: Tensor | None,
            found_inf: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(norm, grad_scale, found_inf) for a step that clips: the kernels divide by the
    returned scale (GradScaler's, over the clip coefficient) and skip the step where the
    returned found_inf is nonzero (GradScaler's, or a non-finite norm)."""
    norm = global_norm(plans, grad_scale)
    coef = (max_norm / (norm + EPS)).clamp(max=1.0)
    scale = 1.0 / coef if grad_scale is None else _scalar(grad_scale, norm.device) / coef
    skip = ~norm.isfinite()
    if found_inf is not None:
        skip |= _scalar(found_inf, norm.device) != 0
    # (1.0, not a sum: torch's fused kernels, which kappa=0 runs, skip on found_inf == 1
    # only, and their Adam then counts its step back by found_inf)
    return norm, scale, skip.float()


def _scalar(t: Tensor, device) -> Tensor:
    """GradScaler's one-element tensors as 0-dim fp32, as the step's own."""
    return t.to(device, torch.float32).reshape(())
