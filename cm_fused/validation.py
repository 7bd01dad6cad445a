"""Hyperparameter rules, one per name, shared by every optimizer of the package.

Each optimizer validates the hyperparameters it has (its ``__init__`` keywords) with the
rules below, at construction, in ``add_param_group`` and again at every step (a group
edited in between is refused before anything changes).
"""
from __future__ import annotations

from numbers import Real
from typing import Any, Callable

import torch
from torch import Tensor

from . import registry, rounding


def bad(name: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"Invalid {name}: {value!r} ({rule})")


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _lr(name, lr, group):
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise bad(name, lr, "a tensor lr must hold one floating-point value")
    elif not (_is_real(lr) and lr >= 0):
        raise bad(name, lr, "must be a number >= 0 or a 0-dim tensor")


def _nonnegative(name, x, group):
    if not (_is_real(x) and x >= 0):
        raise bad(name, x, "must be >= 0")


def _unit_interval(name, x, group):
    if not (_is_real(x) and 0 <= x <= 1):
        raise bad(name, x, "must be in [0, 1]")


def _real(name, x, group):
    if not (_is_real(x) and x == x):
        raise bad(name, x, "must be a number")


def _flag(name, x, group):
    if not isinstance(x, bool):
        raise bad(name, x, "must be a bool")


def _optional_flag(name, x, group):
    if x is not None and not isinstance(x, bool):
        raise bad(name, x, "must be None or a bool")
    if name == "fused" and x and group.get("foreach"):
        raise bad(name, x, "fused=True and foreach=True cannot be asked for together")


def _differentiable(name, x, group):
    if x is not False:
        raise bad(name, x, "differentiable=True is not supported: the steps are in-place "
                           "kernels outside autograd (torch.optim's own optimizers offer it)")


def _kappa_zero_only(what):
    def rule(name, x, group):
        _flag(name, x, group)
        if x and group["kappa"] > 0:
            raise bad(name, x, f"{what} is not defined with the critical buffer; {name}=True "
                               f"is torch's behaviour, available with kappa=0")
    return rule


def _nesterov(name, x, group):
    _flag(name, x, group)
    if x and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise bad(name, x, "Nesterov momentum requires a momentum and zero dampening")
    _kappa_zero_only("Nesterov momentum")(name, x, group)


def _betas(name, betas, group):
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise bad(name, betas, "must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if not (_is_real(b) and 0 <= b < 1):
            raise bad(f"beta{i + 1}", b, "must be in [0, 1)")


def _below_one(name, x, group):
    if not (_is_real(x) and 0 <= x < 1):
        raise bad(name, x, "must be in [0, 1)")


def _kappa(name, x, group):
    if not (_is_real(x) and x >= 0):
        raise bad(name, x, "must be >= 0; 0 turns the buffer off")


def _top_c(name, c, group):
    if group["kappa"] > 0 and not (isinstance(c, int) and not isinstance(c, bool) and c >= 1):
        raise bad(name, c, "must be an int >= 1 when kappa > 0")


def _probability(name, x, group):
    if not (_is_real(x) and 0 <= x <= 1):
        raise bad(name, x, "must be a probability in [0, 1]")


def _buffer_dtype(name, d, group):
    if d is not None and d not in registry.SLOT_DTYPES:
        raise bad(name, d, "must be None, torch.float32, torch.bfloat16, torch.float16 or "
                           "torch.int8 (8-bit slots, blockwise quantized)")


def _max_grad_norm(name, x, group):
    if x is not None and not (_is_real(x) and 0 < x < float("inf")):
        raise bad(name, x, "must be None (no clip) or a finite number > 0")


def _rounding_seed(name, x, group):
    if not (isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2 ** 32):
        raise bad(name, x, "must be an int in [0, 2**32)")


def _stochastic_rounding(name, x, group):
    _flag(name, x, group)
    if x and group.get("kappa") == 0:
        raise bad(name, x, "kappa=0 runs torch's own step, which rounds to nearest; "
                           "stochastic rounding needs kappa > 0")


def _state_dtype(name, d, group):
    if d is not None and d != torch.int8:
        raise bad(name, d, "must be None (the param's dtype) or torch.int8 (8-bit moments, "
                           "blockwise e4m3 codes)")
    if d is not None and group.get("kappa") == 0:
        raise bad(name, d, "kappa=0 runs torch's own step, which keeps full-precision "
                           "state; 8-bit moments need kappa > 0")
    if d is not None and group.get("centered"):
        raise bad(name, d, "centered RMSprop divides by sqrt(square_avg - grad_avg^2), and "
                           "8-bit codes round square_avg by up to 6%, which makes that "
                           "negative (NaN); use state_dtype=None with centered=True")


def _min_8bit_size(name, x, group):
    if not (isinstance(x, int) and not isinstance(x, bool) and x >= 0):
        raise bad(name, x, "must be an int >= 0 (tensors with fewer elements keep "
                           "full-precision moments)")


def check_rounding(name: str, group: dict, dtypes=None) -> None:
    """With stochastic_rounding, every param of the group is bf16 or fp16 (the step
    rounds its fp32 result to them; an fp32 param has nothing to round)."""
    if not group.get("stochastic_rounding"):
        return
    if dtypes is None:
        dtypes = [p.dtype for p in group["params"]]
    other = sorted({str(d) for d in dtypes if d not in rounding.DTYPES})
    if other:
        raise ValueError(f"{name}: stochastic_rounding=True rounds bf16 and fp16 "
                         f"parameters; this group has {', '.join(other)} parameters (put "
                         f"them in a group with stochastic_rounding=False)")


RULES: dict[str, Callable[[str, Any, dict], None]] = {
    "lr": _lr, "betas": _betas, "eps": _nonnegative, "weight_decay": _nonnegative,
    "amsgrad": _flag, "momentum": _nonnegative, "dampening": _real, "alpha": _unit_interval,
    "centered": _flag, "kappa": _kappa, "decay": _unit_interval, "topC": _top_c,
    "synced": _flag, "critical_test": _probability, "buffer_dtype": _buffer_dtype,
    # adaptive memory
    "lam": _nonnegative, "beta_max": _below_one,
    # torch.optim's implementation keywords
    "maximize": _flag, "foreach": _optional_flag, "fused": _optional_flag,
    "capturable": _flag, "differentiable": _differentiable, "nesterov": _nesterov,
    # inside the step: the global-norm clip, stochastic rounding of bf16/fp16 params
    "max_grad_norm": _max_grad_norm, "stochastic_rounding": _stochastic_rounding,
    "rounding_seed": _rounding_seed,
    # 8-bit moments, for tensors of at least min_8bit_size elements
    "state_dtype": _state_dtype, "min_8bit_size": _min_8bit_size,
    # AdamCG's weight decay is coupled, as the authors' (AdamCM is the decoupled one)
    "decoupled_weight_decay": _kappa_zero_only("decoupled weight decay in AdamCG (AdamCM "
                                               "is the decoupled one)"),
}


def validate(group: dict, names) -> None:
    """Raise ValueError naming the first invalid hyperparameter of a param group (in the
    order of ``names``; the rules that read other hyperparameters, after those)."""
    for name in sorted(names, key=lambda n: n in ("topC", "nesterov", "decoupled_weight_decay",
                                                  "stochastic_rounding", "state_dtype")):
        RULES[name](name, group[name], group)
