"""kappa == 0: torch's own code for the group's step (what each optimizer is at kappa=0),
fused or foreach where torch has them, with GradScaler's inputs, and undone on the
device where found_inf is set and torch's path does not take it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .reference import unscaled

if TYPE_CHECKING:
    from .planning import GroupPlan
    from .spec import OptimizerSpec
    from .state_store import StateStore


def run(spec: OptimizerSpec, store: StateStore, plan: GroupPlan, lr, grad_scale,
        found_inf) -> None:
    """kappa == 0: torch's own code (``spec.torch_step``), fused (or foreach) unless the
    reference is asked for; torch paths without GradScaler inputs get unscaled gradients
    and are undone on the device where found_inf is set."""
    group, params, grads, states = plan.group, plan.params, plan.grads, plan.states
    if not torch.compiler.is_compiling():  # (traced: CriticalOptimizer._init_group does)
        store.changed()  # torch's code may add state (SGD's momentum buffer)
    # torch's implementation: as the group's foreach/fused flags ask, else fused (or
    # foreach) on the fused backends and the for-loop on the reference. Under
    # torch.compile the for-loop: torch marks its fused kernels not traceable, and its
    # foreach code does not trace on CPU.
    compiling = torch.compiler.is_compiling()
    fast = plan.backend != "reference" and not compiling
    foreach = group.get("foreach")
    if (group.get("fused") or (fast and foreach is None)) and not compiling \
            and spec.torch_fused is not None and spec.torch_fused(group, states):
        spec.torch_step(group, params, grads, states, lr, fused=True,
                        grad_scale=grad_scale, found_inf=found_inf)
        return
    impl = dict(foreach=(fast if foreach is None else foreach) and not compiling)
    if grad_scale is not None:
        grads = [unscaled(g, grad_scale).to(g.dtype) for g in grads]
    if found_inf is None:
        spec.torch_step(group, params, grads, states, lr, **impl)
        return
    restore = _restore_if_found_inf(found_inf, [*params, *(
        t for s in states for t in s.values() if isinstance(t, Tensor))])
    before = [set(s) for s in states]
    spec.torch_step(group, params, grads, states, lr, **impl)
    restore()
    created = [(s, set(s) - keys) for s, keys in zip(states, before) if set(s) - keys]
    # State torch created in this step (SGD's momentum buffer, on a tensor's first
    # momentum step) cannot be undone on the device: whether it stays takes a host
    # sync, once per tensor, on that first step only.
    if created and found_inf.item() != 0:
        for s, keys in created:
            for key in keys:
                del s[key]


def _restore_if_found_inf(found_inf: Tensor, tensors: list[Tensor]):
    """Snapshot ``tensors``; the returned callable puts them back where found_inf is set.

    torch's for-loop (and foreach) steps take no found_inf, so such a kappa=0 step is done
    and then undone on the device, without a host sync (it costs one copy of the params
    and their state while it runs).
    """
    skip = found_inf != 0
    saved = [t.clone() for t in tensors]

    def restore():
        for t, old in zip(tensors, saved):
            t.copy_(torch.where(skip, old, t))

    return restore
