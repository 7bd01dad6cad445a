"""What every experiment of the suite shares: the optimizers as a user builds them (the
public classes, default backend) and the sharpness measure."""
from __future__ import annotations

from typing import Callable

import torch

import cm_fused

# The paper's comparison: Adam, and Adam with critical gradients, SAM, critical momenta,
# and SAM with critical momenta. Buffer settings are each class's defaults (AdamCM:
# topC 5; AdamCG: topC 10; decay 0.7) unless an experiment sets them.
NAMES = ("Adam", "Adam+CG", "Adam+SAM", "Adam+CM", "Adam+SAM+CM")


def make_optimizer(name: str, params, lr: float, rho: float = 0.05, **buffer) -> \
        torch.optim.Optimizer:
    """``buffer``: topC, decay, ... for the critical-buffer optimizers."""
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "Adam+CG":
        return cm_fused.AdamCG(params, lr=lr, **buffer)
    if name == "Adam+CM":
        return cm_fused.AdamCM(params, lr=lr, **buffer)
    if name == "Adam+CM int8":  # 8-bit slots: the same run at a third of the buffer's bytes
        return cm_fused.AdamCM(params, lr=lr, buffer_dtype=torch.int8, **buffer)
    if name == "Adam+CM 8-bit":  # all state 8-bit (docs/SPEC.md "8-bit moments"), every size
        return cm_fused.AdamCM(params, lr=lr, buffer_dtype=torch.int8, state_dtype=torch.int8,
                               min_8bit_size=0, **buffer)
    if name == "Adam+SAM":
        return cm_fused.SAM(params, torch.optim.Adam, rho=rho, lr=lr)
    if name == "Adam+SAM+CM":
        return cm_fused.SAM(params, cm_fused.AdamCM, rho=rho, lr=lr, **buffer)
    raise ValueError(f"unknown optimizer {name!r} (one of "
                     f"{(*NAMES, 'Adam+CM int8', 'Adam+CM 8-bit')})")


def train_step(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> float:
    """One step as a user writes it (SAM: the closure form); returns the loss before it."""
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    if isinstance(opt, cm_fused.SAM):
        opt.step(lambda: loss_fn().backward())
    else:
        opt.step()
    return loss.item()


def top_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor],
                   iters: int = 20, seed: int = 0) -> float:
    """The largest Hessian eigenvalue of ``loss_fn`` at ``params``, by power iteration on
    Hessian-vector products (double backward): the sharpness of the solution."""
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    lam = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        v = [x / norm for x in v]
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v)
        lam = sum((h * x).sum() for h, x in zip(hv, v)).item()
        v = [h.detach() for h in hv]
    return lam
