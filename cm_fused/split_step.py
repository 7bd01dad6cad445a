"""Steps run in two phases (contract.Phase), where sums must be complete before anything
is decided: a group of sharded tensors (its sums completed over the processes), and an
optimizer whose one decision reads sums over every group (SGDAM)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import distributed
from .contract import Phase
from .dispatch import GroupRunner
from .planning import GroupPlan
from .spec import SharedDecision


def needs_split(shared: SharedDecision | None, active: list[GroupPlan]) -> bool:
    """Whether the step splits across groups: a shared decision over several groups, or
    over sharded tensors (one group of plain tensors steps in one call)."""
    return shared is not None and (len(active) > 1 or any(p.exchange for p in active))


def across_groups(runner: GroupRunner, shared: SharedDecision, active: list[GroupPlan],
                  state: dict, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """REDUCE for every group (each adds into the shared sums), the sums completed over
    the processes, then UPDATE for every group."""
    for plan in active:
        runner.run(plan, state, grad_scale, found_inf, Phase.REDUCE)
    shared.between()
    for plan in active:
        runner.run(plan, state, grad_scale, found_inf, Phase.UPDATE)


def one_group(runner: GroupRunner, plan: GroupPlan, state: dict, grad_scale: Tensor | None,
              found_inf: Tensor | None) -> None:
    """A group's step: in one call, or for sharded tensors (cm_fused/distributed.py) in
    two, their sums completed over the processes before any decision."""
    if not (plan.exchange and plan.group.get("kappa") != 0):
        runner.run(plan, state, grad_scale, found_inf)
        return
    reduced = torch.zeros(len(plan.params), runner.spec.variant.sums_per_tensor,
                          dtype=torch.float64, device=plan.device)
    runner.run(plan, state, grad_scale, found_inf, Phase.REDUCE, reduced)
    distributed.sum_over_shards(reduced, plan.exchange)
    runner.run(plan, state, grad_scale, found_inf, Phase.UPDATE, reduced)
