"""A group's step decided before anything changes (:class:`GroupPlan`): its params with
gradients, their checks, device, backend and sharding; and the cache of those checks that
lets a settled group skip them (:class:`Planner`)."""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from . import backend_choice, distributed, validation
from .backend_choice import BackendChoice
from .contract import StepArgs
from .spec import OptimizerSpec, Roles
from .state_store import StateStore


def attrs(name: str, tensors: list[Tensor]) -> list:
    """``[t.<name> for t in tensors]``, at C speed in eager mode (the per-tensor host time
    of a step is the floor of a GPU step); the plain loop where torch.compile traces (it
    cannot trace operator.attrgetter)."""
    if torch.compiler.is_compiling():
        return [getattr(t, name) for t in tensors]
    return list(map(operator.attrgetter(name), tensors))


@dataclass
class GroupPlan:
    """What one group's step will do, decided before anything is changed."""
    group: dict
    params: list[Tensor]
    device: torch.device | None
    backend: str
    module: ModuleType | None
    roles: Roles | None = None  # the spec's roles(group), once per group and step
    grads: list[Tensor] | None = None  # the params' gradients, as checked
    states: list[dict] | None = None
    # Nothing the state checks and allocation depend on changed since they last ran for
    # this group (the same params, dtypes, hyperparameters, and no state change since):
    # every state is complete, and allocation is skipped.
    settled: bool = False
    # DTensor parameters (FSDP2): None if there are none, else which rows of the reduce
    # pass's sums are summed over which processes ([] if none is sharded).
    exchange: distributed.Exchange | None = None
    args: StepArgs | None = None  # built by the step's first call, for both phases
    write_back: Any = None  # copies stepped dense params back into strided ones
    fp32: bool = False  # every param stepped is float32


@dataclass
class _Checked:
    """What a group's state checks and backend choice last passed for (they are skipped
    while ``key`` is unchanged), and what they found."""
    key: tuple
    exchange: distributed.Exchange | None
    shapes: list  # the params' shapes
    device: torch.device
    backend: str
    module: ModuleType
    fp32: bool  # every param is float32


class Planner:
    """Plans each group's step for one optimizer, and remembers, per group, what its
    checks last passed for."""

    def __init__(self, name: str, spec: OptimizerSpec, hyperparameters: dict,
                 store: StateStore, backends: BackendChoice) -> None:
        self.name, self.spec, self.hyperparameters = name, spec, hyperparameters
        self.store, self.backends = store, backends
        self._checked: dict = {}

    def check_shared(self, groups: list[dict]) -> None:
        """The hyperparameters every group must share (OptimizerSpec.shared, and
        max_grad_norm) agree."""
        names = (*self.spec.shared, "max_grad_norm")
        shared = {tuple(g.get(n) for n in names) for g in groups}
        if len(shared) > 1:
            why = self.spec.shared_why + ("; " if self.spec.shared_why else "")
            raise ValueError(f"{self.name}: every param group must have the same "
                             f"{' and '.join(names)} ({why}max_grad_norm: one norm over "
                             f"every group), got {sorted(shared, key=repr)}")

    def plan(self, group: dict, state: dict, asked: str) -> GroupPlan:
        """``asked``: the backend the optimizer was asked for."""
        validation.validate(group, self.hyperparameters)
        params = group["params"]
        grads = attrs("grad", params)
        if _any_none(grads):
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
            if not params:
                return GroupPlan(group, [], None, "reference", None)
        dtypes = attrs("dtype", params)
        if group.get("stochastic_rounding"):
            validation.check_rounding(self.name, group, dtypes)
        # The state checks and the backend choice depend on the params, their dtypes and
        # device, the hyperparameters and the state: skipped while none of these changed
        # since they last passed.
        last = None
        if not torch.compiler.is_compiling():  # (traced once: nothing to save)
            # (the state dict's identity and size too: users reset an optimizer by
            # clearing or replacing opt.state)
            checked = (self.store.version, id(state), len(state), asked,
                       list(map(id, params)), dtypes,
                       [(k, v) for k, v in group.items() if k not in ("params", "lr")])
            last = self._checked.get(id(group))
            if last is not None and last.key != checked:
                last = None
        if not self._check_grads(params, grads, dtypes, last.shapes if last else None):
            last = None  # (a param's shape changed since: its state is checked again)
        roles = self.spec.roles(group)
        # (settled: the params are where they were when checked, unless moved, and then
        # their gradients, made or moved with them, are elsewhere too)
        devices = set(attrs("device", grads))
        if last is None or devices != {last.device}:
            devices |= set(attrs("device", params))
        if len(devices) > 1:
            raise RuntimeError(f"all parameters of a group and their gradients must be on one "
                               f"device, got {sorted(map(str, devices))}")
        device = devices.pop()
        if last is not None and last.device == device:
            if last.exchange is not None:
                distributed.check_gradients(self.name, params, grads)
            return GroupPlan(group, params, device, last.backend, last.module, roles, grads,
                             settled=True, exchange=last.exchange, fp32=last.fp32)
        self.store.check(state, group, params, roles)
        # (again here: a wrapper may put partitions into the groups after construction)
        distributed.refuse_flattened(self.name, params)
        exchange = distributed.exchange_for(self.name, params, grads)
        if exchange is not None and group.get("stochastic_rounding"):
            distributed.refuse_rounding(self.name, params)
        # The dtypes of the whole group, not only of this step's tensors: one choice per
        # group, whichever of its tensors have gradients.
        backend, module = self.backends.resolve(
            asked, device, frozenset(p.dtype for p in group["params"]), group.get("fused"),
            self.spec.variant if group.get("state_dtype") == torch.int8 else None)
        backend_choice.check_top_c(group, backend, module)
        fp32 = all(d is torch.float32 for d in dtypes)
        if not torch.compiler.is_compiling():
            self._checked[id(group)] = _Checked(checked, exchange, attrs("shape", params),
                                                device, backend, module, fp32)
        return GroupPlan(group, params, device, backend, module, roles, grads,
                         exchange=exchange, fp32=fp32)

    def _check_grads(self, params: list[Tensor], grads: list[Tensor], dtypes: list,
                     shapes: list | None = None) -> bool:
        """``shapes``: the params' shapes when last checked, if nothing changed since (a
        mismatch is checked again against their shapes now). Returns whether the
        gradients have those shapes."""
        if any(attrs("is_sparse", grads)):
            raise RuntimeError(f"{self.name} does not support sparse gradients")
        grad_dtypes = attrs("dtype", grads)
        # (settled, and the same dtypes: they passed this when last checked)
        same = grad_dtypes == dtypes
        if not (same and shapes is not None) and any(
                d.is_complex for d in (set(dtypes) if same else {*dtypes, *grad_dtypes})):
            raise RuntimeError(f"{self.name} does not support complex parameters or gradients")
        grad_shapes = attrs("shape", grads)
        if not same or (grad_shapes != shapes and grad_shapes != attrs("shape", params)):
            p, g = next((p, g) for p, g in zip(params, grads)
                        if g.shape != p.shape or g.dtype != p.dtype)
            raise RuntimeError(f"gradient {tuple(g.shape)} {g.dtype} does not match parameter "
                               f"{tuple(p.shape)} {p.dtype}")
        return grad_shapes == shapes


def _any_none(values: list) -> bool:
    if torch.compiler.is_compiling():
        return any(v is None for v in values)
    return any(map(operator.is_, values, itertools.repeat(None)))
