"""Sharpness-aware minimisation (Foret et al., ICLR 2021) around any optimizer.

SAM takes the base optimizer's step from the gradient at a perturbed point: first
``w ← w + ρ·g/‖g‖`` (``‖g‖`` over every parameter of every group), then the gradient is
computed again there, ``w`` is restored, and the base optimizer steps with that
gradient. Around AdamCM this is the paper's Adam+SAM+CM; around torch.optim.AdamW,
Adam+SAM. Nothing waits on the host.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .validation import bad

_EPS = 1e-12  # ‖g‖ + eps: a zero gradient perturbs nothing


class SAM(torch.optim.Optimizer):
    """``SAM(params, base_optimizer, rho=0.05, adaptive=False, **base_kwargs)``.

    ``base_optimizer`` is an optimizer class (``torch.optim.AdamW``, ``cm_fused.AdamCM``,
    ...) built on ``params`` (param groups too) with ``base_kwargs``, and SAM shares its
    param groups (a scheduler sees one list); ``rho`` (> 0) is the perturbation radius,
    ``adaptive=True`` ASAM's element-wise scaling by ``|w|`` (Kwon et al. 2021).

    Two-step use::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)     # w + e(w)
        loss_fn(model(x), y).backward()    # the gradient at w + e(w)
        opt.second_step(zero_grad=True)    # back to w, base step

    or ``opt.step(closure)`` with a closure that zeroes nothing, computes the loss and
    calls ``backward()`` (it is called once, at the perturbed point; the first gradient
    must already be there). ``state_dict()`` is the base optimizer's (the perturbation
    lives only between the two steps).
    """

    def __init__(self, params, base_optimizer: type, rho: float = 0.05,
                 adaptive: bool = False, **base_kwargs):
        _check_rho("rho", rho)
        if not isinstance(adaptive, bool):
            raise bad("adaptive", adaptive, "must be a bool")
        if not (isinstance(base_optimizer, type)
                and issubclass(base_optimizer, torch.optim.Optimizer)):
            got = (f"an instance of {type(base_optimizer).__name__}"
                   if isinstance(base_optimizer, torch.optim.Optimizer) else repr(base_optimizer))
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer class (its keywords "
                            f"go to SAM), got {got}")
        self.rho, self.adaptive = rho, adaptive
        self.base_optimizer = base_optimizer(params, **base_kwargs)
        # One list of groups for both: a scheduler or add_param_group acts on both.
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        self.param_groups = self.base_optimizer.param_groups
        self._perturbed = False
        self._ready = True

    def add_param_group(self, param_group: dict) -> None:
        if self.__dict__.get("_ready"):
            self.base_optimizer.add_param_group(param_group)
        else:  # during __init__: the base's own group dicts (torch's checks run again)
            super().add_param_group(param_group)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient to ``w + e(w)``."""
        if self._perturbed:
            raise RuntimeError("SAM.first_step called twice without second_step")
        _check_rho("rho", self.rho)
        scale = self.rho / (self._grad_norm() + _EPS)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                e = p.grad * scale.to(p.grad.dtype)
                if self.adaptive:
                    e = e * p.abs() ** 2
                # w itself, not e, to come back to: (w + e) - e is not always w in
                # floating point, and a non-finite gradient makes e NaN.
                self.state[p]["w"] = p.detach().clone()
                p.add_(e)
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and step the base optimizer with the current gradients."""
        if not self._perturbed:
            raise RuntimeError("SAM.second_step called without first_step")
        for group in self.param_groups:
            for p in group["params"]:
                w = self.state.get(p, {}).pop("w", None)
                if w is not None:
                    p.copy_(w)
        self._perturbed = False
        self.base_optimizer.step()
        # An LR scheduler counts SAM.step calls (torch wraps it): the two-step use is a
        # step too, else the scheduler warns that it stepped before the optimizer.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Tensor] | None = None):
        """Both steps; the closure computes the loss and its gradient at ``w + e(w)``."""
        if closure is None:
            raise RuntimeError("SAM.step needs a closure (or call first_step and "
                               "second_step yourself)")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def _grad_norm(self) -> Tensor:
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad * p.abs() if self.adaptive else p.grad
                    norms.append(torch.linalg.vector_norm(g.float()))
        if not norms:
            return torch.zeros(())
        devices = {n.device for n in norms}
        if len(devices) > 1:
            raise RuntimeError(f"SAM: all gradients must be on one device, got "
                               f"{sorted(map(str, devices))}")
        return torch.linalg.vector_norm(torch.stack(norms))

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        if self._perturbed:
            raise RuntimeError("SAM: cannot load a checkpoint between first_step and "
                               "second_step")
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # torch's load makes new ones

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def __getattr__(self, name):  # buffer_diagnostics, last_beta, ... of the base
        if name != "base_optimizer" and "base_optimizer" in self.__dict__:
            return getattr(self.__dict__["base_optimizer"], name)
        raise AttributeError(name)


def _check_rho(name: str, rho) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho > 0:
        raise bad(name, rho, "must be a number > 0")
