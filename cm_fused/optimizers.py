"""The optimizers users construct: each is a variant of the one step engine (engine.py).

An optimizer here says only what makes it itself: its keywords (those of its torch
counterpart and of the authors' class) and its :class:`~cm_fused.spec.OptimizerSpec`
(its variant, which state entry plays which role of the step, the scalars it passes,
torch's own code for ``kappa == 0``, the state it keeps). docs/SPEC.md has the math of
each.

Positional arguments go as far as the torch counterpart and the authors' class agree;
the rest are keyword-only, so that a call written for either can never silently bind a
value to the wrong name.
"""
from __future__ import annotations

import functools

from torch.optim.adam import adam as _torch_adam
from torch.optim.rmsprop import rmsprop as _torch_rmsprop
from torch.optim.sgd import sgd as _torch_sgd

import torch
from torch import Tensor

from . import distributed
from .contract import Variant
from .diagnostics import BufferDiagnostics
from .engine import CriticalOptimizer
from .spec import OptimizerSpec, Roles, Scalars, SharedDecision


def _steps_on_device(states) -> bool:
    """torch's non-fused code must run capturable when the step counters live on an
    accelerator (ours do, so that no step reads them on the host)."""
    return bool(states) and states[0]["step"].device.type not in ("cpu", "meta")


# ---------------------------------------------------------------- Adam (AdamCM, AdamCG)

def _adam_roles(group):
    return Roles(momenta="exp_avg", second_moments="exp_avg_sq",
                 extras="max_exp_avg_sq" if group["amsgrad"] else None, steps="step")


def _adam_scalars(group):
    beta1, beta2 = group["betas"]
    return Scalars(beta1=beta1, beta2=beta2, eps=group["eps"],
                   weight_decay=group["weight_decay"], dampening=0.0,
                   key_decay=group["decay"], critical_test=group["critical_test"])


def _torch_adam_step(group, params, grads, states, lr, *, decoupled=False, **impl):
    """torch's Adam code (``decoupled``: AdamW's weight decay)."""
    beta1, beta2 = group["betas"]
    amsgrad = group["amsgrad"]
    if not impl.get("fused"):
        impl["capturable"] = _steps_on_device(states)
    _torch_adam(
        params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
        [s["step"] for s in states], amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=lr,
        weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        decoupled_weight_decay=decoupled or group.get("decoupled_weight_decay", False),
        **impl)


_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class AdamCM(BufferDiagnostics, CriticalOptimizer):
    """Adam with Critical Momenta (Malviya et al., TMLR 2024); ``kappa=0`` is exactly
    ``torch.optim.AdamW``.

    Keeps, per tensor, up to ``topC`` past momenta chosen by gradient-norm priority
    (keys fade by ``decay`` every step) and steps with ``m + mean(buffer)``. Weight decay
    is decoupled (AdamW). Keyword names are those of ``torch.optim.AdamW`` and of the
    authors' ``Adam_CM``; docs/SPEC.md has the exact update and its quirks.
    """

    spec = OptimizerSpec(Variant.ADAM_CM, _adam_roles, _adam_scalars,
                         functools.partial(_torch_adam_step, decoupled=True), _ADAM_STATE)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, weight_decay=0.0,
                 amsgrad=False, topC=5, decay=0.7, kappa=1.0, synced=True, critical_test=0.0,
                 buffer_dtype=None, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, max_grad_norm=None,
                 stochastic_rounding=False, rounding_seed=0, state_dtype=None,
                 min_8bit_size=4096,
                 backend="auto"):
        super().__init__(params, locals(), backend)


class AdamCG(BufferDiagnostics, CriticalOptimizer):
    """Adam with Critical Gradients (McRae et al. 2022; the authors' ``Adam_C``);
    ``kappa=0`` is exactly ``torch.optim.Adam``.

    Keeps, per tensor, up to ``topC`` past raw gradients chosen by norm priority and
    feeds ``g + mean(buffer)`` to Adam. Weight decay is coupled L2 (Adam, not AdamW).
    """

    spec = OptimizerSpec(Variant.ADAM_CG, _adam_roles, _adam_scalars, _torch_adam_step,
                         _ADAM_STATE)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, weight_decay=0.0,
                 amsgrad=False, topC=10, decay=0.7, kappa=1.0, synced=True, critical_test=0.0,
                 buffer_dtype=None, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 max_grad_norm=None, stochastic_rounding=False,
                 rounding_seed=0, state_dtype=None, min_8bit_size=4096,
                 backend="auto"):
        super().__init__(params, locals(), backend)


# ---------------------------------------------------------------- SGD (SGDCG)

def _sgd_roles(group):
    buffered = group["kappa"] > 0  # at kappa == 0, torch's SGD keeps its own state
    return Roles(momenta="momentum_buffer" if buffered and group["momentum"] != 0 else None,
                 second_moments=None, extras=None, steps="step" if buffered else None)


def _sgd_scalars(group):
    return Scalars(beta1=group["momentum"], beta2=0.0, eps=0.0,
                   weight_decay=group["weight_decay"], dampening=group["dampening"],
                   key_decay=group["decay"] if group["decay"] != 0 else 1.0,
                   critical_test=group["critical_test"])


def _sgd_fused_ok(group, states):
    # torch's fused SGD treats a first momentum step as all-or-nothing and creates the
    # buffers uninitialised, so a step skipped by found_inf would leave garbage, and a
    # tensor's first step beside others' later ones fails: the for-loop code takes any
    # step where a buffer is still to be created (its first step copies d, as fused).
    return group["momentum"] == 0 or all("momentum_buffer" in s for s in states)


def _sgd_check_state(state, group):
    if group["kappa"] > 0 and group["momentum"] != 0 and "momentum_buffer" not in state:
        raise RuntimeError("SGDCG: momentum cannot be turned on after a parameter's first "
                           "step (with kappa > 0 the first momentum step, which copies "
                           "d, is the parameter's first step)")


def _torch_sgd_step(group, params, grads, states, lr, **impl):
    momentum = group["momentum"]
    bufs = [s.get("momentum_buffer") for s in states]
    _torch_sgd(params, grads, bufs, weight_decay=group["weight_decay"], momentum=momentum,
               lr=lr, dampening=group["dampening"], nesterov=group["nesterov"],
               maximize=group["maximize"], **impl)
    if momentum != 0:  # torch creates the buffers on a tensor's first step
        for s, buf in zip(states, bufs):
            s["momentum_buffer"] = buf


class SGDCG(BufferDiagnostics, CriticalOptimizer):
    """SGD (with optional momentum) with Critical Gradients (the authors' ``SGD_C``);
    ``kappa=0`` is exactly ``torch.optim.SGD``.

    Keeps, per tensor, up to ``topC`` past ``g + weight_decay·p`` chosen by gradient-norm
    priority and steps with ``d + mean(buffer)``. ``decay=0`` means keys never decay here
    (the authors' quirk), unlike the other optimizers, where it zeroes them each step.
    """

    spec = OptimizerSpec(Variant.SGD_CG, _sgd_roles, _sgd_scalars, _torch_sgd_step,
                         ("step", "momentum_buffer"), torch_fused=_sgd_fused_ok,
                         check_state=_sgd_check_state)

    def __init__(self, params, lr=1e-3, *, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 topC=10, decay=0.7, kappa=1.0, synced=True, critical_test=0.0,
                 buffer_dtype=None, nesterov=False, maximize=False, foreach=None,
                 differentiable=False, fused=None, max_grad_norm=None,
                 stochastic_rounding=False, rounding_seed=0, state_dtype=None,
                 min_8bit_size=4096,
                 backend="auto"):
        super().__init__(params, locals(), backend)


# ---------------------------------------------------------------- RMSprop (RMSpropCG)

def _rmsprop_roles(group):
    return Roles(momenta="momentum_buffer" if group["momentum"] > 0 else None,
                 second_moments="square_avg",
                 extras="grad_avg" if group["centered"] else None, steps="step")


def _rmsprop_scalars(group):
    return Scalars(beta1=group["momentum"], beta2=group["alpha"], eps=group["eps"],
                   weight_decay=group["weight_decay"], dampening=0.0,
                   key_decay=group["decay"], critical_test=0.0)


def _torch_rmsprop_step(group, params, grads, states, lr, **impl):
    roles = _rmsprop_roles(group)
    gather = lambda key: [s[key] for s in states] if key else []  # noqa: E731
    _torch_rmsprop(params, grads, gather("square_avg"), gather(roles.extras),
                   gather(roles.momenta), gather("step"), maximize=group["maximize"],
                   capturable=_steps_on_device(states), lr=lr, alpha=group["alpha"],
                   eps=group["eps"], weight_decay=group["weight_decay"],
                   momentum=group["momentum"], centered=group["centered"], **impl)


class RMSpropCG(BufferDiagnostics, CriticalOptimizer):
    """RMSprop with Critical Gradients (the authors' ``RMSprop_C``); ``kappa=0`` is exactly
    ``torch.optim.RMSprop``.

    Keeps, per tensor, up to ``topC`` past raw gradients chosen by norm priority and
    feeds RMSprop the buffer's mean alone (the current gradient enters only through the
    buffer: the authors' quirk). There is no ``critical_test``: replacement is always by
    priority.
    """

    spec = OptimizerSpec(Variant.RMSPROP_CG, _rmsprop_roles, _rmsprop_scalars,
                         _torch_rmsprop_step, ("step", "square_avg", "momentum_buffer",
                                               "grad_avg"),
                         torch_fused=None)  # torch's RMSprop has foreach, no fused kernel

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, *, topC=10, decay=0.7, kappa=1.0, synced=True,
                 buffer_dtype=None, capturable=False, foreach=None, maximize=False,
                 differentiable=False, max_grad_norm=None, stochastic_rounding=False,
                 rounding_seed=0, state_dtype=None, min_8bit_size=4096,
                 backend="auto"):
        super().__init__(params, locals(), backend)


# ---------------------------------------------------------------- Adaptive memory

class _AdaptiveMemory(CriticalOptimizer):
    """Adaptive Memory momentum (Topollai & Choromanska, AISTATS 2026): beta is chosen
    every step from a two-plane model of the loss (docs/SPEC.md). No buffer, no kappa;
    the last beta is :meth:`last_beta`."""

    def last_beta(self) -> dict[str, Tensor]:
        """The beta of the last step, as device tensors (no host sync): ``mean``,
        ``min`` and ``max`` over the tensors (AdamAM: each tensor's most recent beta;
        SGDAM: the one beta of the optimizer). Empty before the first step."""
        betas = self._betas()
        if betas is None:
            return {}
        return {"mean": betas.mean(), "min": betas.min(), "max": betas.max()}

    def _betas(self) -> Tensor | None:
        raise NotImplementedError


def _adam_am_roles(group):
    return Roles(momenta="d", second_moments="v", extras=None, steps="step")


def _adam_am_scalars(group):
    beta1, beta2 = group["betas"]
    return Scalars(beta1=beta1, beta2=beta2, eps=group["eps"],
                   weight_decay=group["weight_decay"], dampening=0.0, key_decay=1.0,
                   critical_test=0.0)


def _adam_am_new_state(p, group):
    # (prod of the past betas, previous lr, last beta)
    return {"memory": torch.tensor([1.0, 0.0, 0.0], device=p.device)}


class AdamAM(_AdaptiveMemory):
    """AdamW with Adaptive Memory momentum (AM-AdamW, Topollai & Choromanska 2026): one
    momentum coefficient beta per tensor and step, in [0, beta1max], from a two-plane
    model of the loss with proximal weight ``lam``; ``betas = (beta1max, beta2)``.
    Weight decay is decoupled (AdamW). With ``lam = 0`` and beta pinned at beta1max it
    is AdamW with beta1 = beta1max. docs/SPEC.md has the exact update.
    """

    spec = OptimizerSpec(Variant.ADAM_AM, _adam_am_roles, _adam_am_scalars, None,
                         ("step", "d", "v", "memory"),
                         new_state=_adam_am_new_state,
                         memory=lambda states: [s["memory"] for s in states])

    def __init__(self, params, lr=1e-3, betas=(0.89, 0.999), eps=1e-8, *, weight_decay=0.0,
                 lam=0.1, maximize=False, fused=None, max_grad_norm=None,
                 stochastic_rounding=False, rounding_seed=0, state_dtype=None,
                 min_8bit_size=4096,
                 backend="auto"):
        super().__init__(params, locals(), backend)

    def _betas(self):
        betas = [st["memory"][2] for st in self.state.values() if "memory" in st]
        return torch.stack(betas) if betas else None


def _sgd_am_roles(group):
    return Roles(momenta="d", second_moments=None, extras=None, steps="step")


def _sgd_am_scalars(group):
    return Scalars(beta1=group["beta_max"], beta2=0.0, eps=0.0,
                   weight_decay=group["weight_decay"], dampening=0.0, key_decay=1.0,
                   critical_test=0.0)


class _OneBeta(SharedDecision):
    """SGDAM's one beta: REDUCE adds every tensor's D and N into one fp32 [D, N, beta] on
    the device, summed over the processes for sharded params; UPDATE decides from it."""

    def __init__(self) -> None:
        self.totals: Tensor | None = None
        self._shards: distributed.Exchange | None = None  # this step's, set by begin

    def memory(self, device) -> list[Tensor]:
        if self.totals is None or self.totals.device != device:
            self.totals = torch.zeros(3, device=device)  # D, N, last beta
        return [self.totals]

    def begin(self, plans):
        devices = {plan.device for plan in plans}
        if len(devices) > 1:
            raise RuntimeError(f"SGDAM: all parameters must be on one device (one beta for "
                               f"the whole optimizer), got {sorted(map(str, devices))}")
        self._shards = None
        if any(plan.exchange for plan in plans):
            # D and N are summed over every tensor, then over the processes: that takes
            # every tensor sharded the same way (a replicated one would count once per
            # process).
            ways = {plan.exchange[0][:2] if plan.exchange and len(plan.exchange) == 1
                    and plan.exchange[0][2] is None else None for plan in plans}
            if len(ways) != 1 or None in ways:
                raise NotImplementedError(
                    "SGDAM: with sharded parameters, every parameter must be sharded over "
                    "the same mesh dimensions (one beta from sums over every process)")
            self._shards = [(*ways.pop(), None)]
        self.memory(plans[0].device)[0][:2].zero_()

    def between(self):
        if self._shards:
            distributed.sum_over_shards(self.totals[:2], self._shards)


class SGDAM(_AdaptiveMemory):
    """SGD with Adaptive Memory momentum (AM-MSGD, Topollai & Choromanska 2026): one
    momentum coefficient beta for the whole optimizer per step, in [0, beta_max], from
    sums over every tensor of every group. Weight decay is coupled (L2). All groups share
    ``lam`` and ``beta_max``, and one device. docs/SPEC.md has the exact update.
    """

    spec = OptimizerSpec(Variant.SGD_AM, _sgd_am_roles, _sgd_am_scalars, None,
                         ("step", "d"),
                         shared=("lam", "beta_max"),
                         shared_why="one beta for the whole optimizer",
                         shared_decision=_OneBeta)

    def __init__(self, params, lr=0.1, *, beta_max=0.9, lam=0.1, weight_decay=0.0,
                 maximize=False, fused=None, max_grad_norm=None, stochastic_rounding=False,
                 rounding_seed=0, state_dtype=None, min_8bit_size=4096,
                 backend="auto"):
        super().__init__(params, locals(), backend)

    def _betas(self):
        totals = self.shared_decision.totals
        return None if totals is None else totals[2:]


Adam_CM = AdamCM  # the authors' class names, so switching is a one-line change
Adam_C = AdamCG
SGD_C = SGDCG
RMSprop_C = RMSpropCG
