"""What an optimizer of the package declares about itself (:class:`OptimizerSpec`): the
step engine (cm_fused/engine.py) reads this record and the class's ``__init__`` keywords,
and calls nothing else of an optimizer.

A new optimizer is a :class:`~cm_fused.engine.CriticalOptimizer` subclass with an
``__init__`` (its keywords are its hyperparameters) and a ``spec``; docs/design.md says
what else a new variant needs (its kernels' branch, its SPEC section, its test rows).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, NamedTuple

from torch import Tensor

from .contract import Variant

if TYPE_CHECKING:
    from .planning import GroupPlan


class Roles(NamedTuple):
    """The state key of each per-tensor role of the step (None where unused); the
    engine allocates each as zeros shaped like the param (``steps``: a 0-dim fp32)."""
    momenta: str | None
    second_moments: str | None
    extras: str | None
    steps: str | None


class Scalars(NamedTuple):
    """The step's per-group scalars, as the kernels name them (docs/SPEC.md)."""
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    dampening: float
    key_decay: float
    critical_test: float


class SharedDecision:
    """The decision of a step whose sums run over every group (SGDAM's one beta): the
    engine runs REDUCE for every group, then :meth:`between`, then UPDATE for every
    group. One instance per optimizer, made by ``OptimizerSpec.shared_decision``; it is
    rebuilt when the optimizer is unpickled (what it holds lives for one step)."""

    def begin(self, plans: list[GroupPlan]) -> None:
        """Before REDUCE: refuse groups that cannot share one decision; reset the sums."""
        raise NotImplementedError

    def memory(self, device) -> list[Tensor]:
        """``StepArgs.memory`` of every group: the sums REDUCE adds into."""
        raise NotImplementedError

    def between(self) -> None:
        """Between the phases: complete the sums over the processes (sharded params)."""


def _always(group: dict, states: list[dict]) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    variant: Variant
    # Which state entry plays which role of the step, for a group.
    roles: Callable[[dict], Roles]
    # The group's scalars.
    scalars: Callable[[dict], Scalars]
    # kappa == 0: torch's own functional step, ``(group, params, grads, states, lr,
    # **impl)`` with impl torch's flags (fused, foreach, capturable, grad_scale, ...);
    # None for an optimizer without kappa.
    torch_step: Callable[..., None] | None
    # Every state entry the optimizer may keep besides the critical buffer's (torch's
    # names): a checkpoint with others was written by another optimizer.
    state_keys: tuple[str, ...]
    # Whether torch's fused kernel can take a kappa == 0 step of the group (None: torch
    # has no fused kernel for it).
    torch_fused: Callable[[dict, list[dict]], bool] | None = _always
    # The entries of a fresh state besides the roles' and the buffer's.
    new_state: Callable[[Tensor, dict], dict[str, Tensor]] | None = None
    # StepArgs.memory from the group's states (AdamAM's per-tensor scalars).
    memory: Callable[[list[dict]], list[Tensor]] | None = None
    # Refuses a group change the optimizer cannot follow: (state, group) -> None.
    check_state: Callable[[dict, dict], None] | None = None
    # Hyperparameters every param group must share, and why.
    shared: tuple[str, ...] = ()
    shared_why: str = ""
    # The step's decision reads sums over every group: makes its SharedDecision.
    shared_decision: Callable[[], SharedDecision] | None = None
