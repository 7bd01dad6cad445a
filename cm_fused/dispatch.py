"""A planned group's step handed to its backend: the group's one StepArgs (or torch's own
code at kappa == 0), the tensor lists vouched between steps, dense copies for the fused
kernels, and the critical_test coins."""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from . import distributed, rounding, torch_step
from .contract import Phase, StepArgs, Tensors
from .pending import PendingInserts
from .planning import GroupPlan
from .spec import OptimizerSpec, SharedDecision
from .state_store import MOMENT_SCALES, StateStore, keeps_sum


def _same(old, new: list) -> bool:
    """Whether ``old`` (a list, or None) holds the very tensors of ``new``, in order."""
    return old is not None and len(old) == len(new) and all(map(operator.is_, old, new))


class GroupRunner:
    """Runs planned group steps for one optimizer. ``in_use``: the optimizer's
    ``backends_in_use``, updated here."""

    def __init__(self, spec: OptimizerSpec, store: StateStore, pending: PendingInserts,
                 shared: SharedDecision | None, in_use: dict, groups) -> None:
        self.spec, self.store, self.pending, self.shared = spec, store, pending, shared
        self.in_use = in_use
        self.groups = groups  # () -> the optimizer's param groups
        # Per group: each state entry's tensors as given to the last step (Tensors).
        self._lists: dict = {}

    def forget_lists(self) -> None:
        """The states were replaced (a checkpoint): the lists hold the old tensors."""
        self._lists.clear()

    def run(self, plan: GroupPlan, state: dict, grad_scale: Tensor | None,
            found_inf: Tensor | None, phase: Phase = Phase.ALL,
            reduced: Tensor | None = None) -> None:
        """The group's step, or one phase of it (the StepArgs built for the first phase
        serve the second)."""
        if plan.args is None:
            plan.args = self._step_args(plan, state, grad_scale, found_inf)
            if plan.args is None:  # kappa == 0: torch's step ran
                return
        args = plan.args
        args.phase, args.reduced = int(phase), reduced
        if args.critical_test > 0 and phase != Phase.REDUCE:
            args.rand = torch.rand(len(args.params), device=plan.device)
            if plan.exchange is not None:  # one decision on every process
                distributed.same_coins(args.rand, plan.params)
        plan.module.step(args)
        if phase != Phase.REDUCE and plan.write_back is not None:
            plan.write_back()

    def _step_args(self, plan: GroupPlan, state: dict, grad_scale: Tensor | None,
                   found_inf: Tensor | None) -> StepArgs | None:
        """The group's StepArgs (None after running torch's step, at kappa == 0)."""
        group, device, states = plan.group, plan.device, plan.states
        compiling = torch.compiler.is_compiling()
        if not compiling:  # (traced: CriticalOptimizer._init_group sets it)
            self.in_use[device.type] = plan.backend
        if grad_scale is not None:
            grad_scale = grad_scale.to(device, non_blocking=True)
        if found_inf is not None:
            found_inf = found_inf.to(device, non_blocking=True)
        lr = group["lr"]
        defer = self.pending.before_step(plan, state)
        if group.get("kappa") == 0:
            if isinstance(lr, Tensor):  # torch's code takes the tensor as it is
                lr = lr.to(device, non_blocking=True)
            torch_step.run(self.spec, self.store, plan, lr, grad_scale, found_inf)
            return None
        if isinstance(lr, Tensor):
            # Once here, so no backend copies it: every backend reads a 0-dim fp32 lr on
            # the device (a bf16 lr would round 1 - lr·wd to bf16 in the reference only;
            # a [1]-shaped one would broadcast 0-dim params).
            lr = lr.to(device, torch.float32, non_blocking=True).reshape(())
        # DTensors (FSDP2): the kernels step the local shards.
        tensors = distributed.local if plan.exchange is not None else _as_is
        params, grads = tensors(plan.params), tensors(plan.grads)
        if plan.backend != "reference":
            params, grads, plan.write_back = _contiguous(params, grads)
        roles = plan.roles
        # (not while tracing: a first entry would be a guard that fails on the next step)
        last = {} if compiling else self._lists.setdefault(id(group), {})

        def vouched(name: str, ts: list[Tensor]) -> list[Tensor]:
            if compiling:
                return ts
            # The same tensors as last step: the same Tensors (and serial), which the
            # Triton launcher keys its tables on (cm_fused.contract.Tensors).
            old = last.get(name)
            if _same(old, ts):
                return old
            last[name] = new = Tensors(ts)
            return new

        def gather(role: str, shaped=tensors) -> list[Tensor]:
            key = getattr(roles, role)
            return vouched(key, shaped([s[key] for s in states])) if key is not None else []

        buffered = self.spec.variant.buffered

        def buffer(key: str, shaped=tensors) -> list[Tensor]:
            return vouched(key, shaped([s[key] for s in states])) if buffered else []

        def scales(key: str, rows: int, found: list) -> list:
            # What the kernels step of sharded 8-bit state's scale tables, made once while
            # the tables are the same; nothing to change unless something is sharded.
            if plan.exchange is None:
                return found
            cached = last.get(("views", key))
            if cached is not None and _same(cached[0], found):
                return cached[1]
            out = distributed.scale_views(found, rows, params)
            if not compiling:
                last[("views", key)] = (found, out)
            return out

        quantized = group.get("buffer_dtype") == torch.int8
        summed = buffered and keeps_sum(group)
        if self.shared is not None:
            memory = self.shared.memory(device)
        else:
            memory = self.spec.memory(states) if self.spec.memory is not None else []
        return StepArgs(
            params=params, grads=grads, momenta=gather("momenta"),
            second_moments=gather("second_moments"), extras=gather("extras"),
            buffers=buffer("cm_buffer"),
            scales=vouched("cm_scales", scales("cm_scales", group["topC"], [
                s["cm_scales"] for s in states])) if quantized and buffered else [],
            moment_scales=self._moment_scales(group, states, last, device,
                                              lambda found: scales(MOMENT_SCALES, 2, found)),
            keys=buffer("cm_keys", _as_is),
            counts=buffer("cm_count", _as_is), inserts=buffer("cm_inserts", _as_is),
            sums=buffer("cm_sum") if summed else [], pending=buffer("cm_pending", _as_is) if defer else [],
            steps=gather("steps", _as_is), memory=vouched("memory", memory),
            variant=int(self.spec.variant), lr=0.0 if isinstance(lr, Tensor) else float(lr),
            lr_tensor=lr if isinstance(lr, Tensor) else None,
            **self.spec.scalars(group)._asdict(),
            lam=group.get("lam", 0.0), synced=group.get("synced", False),
            maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf,
            rand=None, rounding=self._rounding(plan, last), phase=int(Phase.ALL))

    @staticmethod
    def _moment_scales(group: dict, states: list[dict], last: dict,
                       device: torch.device, views) -> list[Tensor]:
        """StepArgs.moment_scales: empty unless the group has 8-bit moments; then each
        tensor's scales (``views``: as the kernels step them), or an empty tensor for one
        below min_8bit_size."""
        if group.get("state_dtype") != torch.int8:
            return []
        found = [s.get(MOMENT_SCALES) for s in states]
        if all(f is None for f in found):  # (no tensor of the group is that large)
            return []
        found = views(found)
        empty = last.get("__no_scales__")
        if empty is None:
            empty = last["__no_scales__"] = torch.empty(0, device=device)
        return [empty if f is None else f for f in found]

    def _rounding(self, plan: GroupPlan, last: dict) -> Tensor | None:
        """StepArgs.rounding of the group's step (None unless stochastic_rounding): each
        tensor's key from the seed and its index among the optimizer's parameters, and
        the offset of its local shard (kept while the tensors, their indices, the device
        and the seed are the same)."""
        if not plan.group.get("stochastic_rounding"):  # (an optimizer without the keyword)
            return None
        seed = plan.group["rounding_seed"]
        # (positions among every group's params: another group's change can move them)
        index = {id(p): i for i, p in enumerate(
            p for group in self.groups() for p in group["params"])}
        which = (seed, plan.device, [(id(p), index[id(p)]) for p in plan.params])
        cached = last.get("__rounding__")
        if cached is not None and cached[0] == which:
            return cached[1]
        rows = [(rounding.tensor_key(seed, i), distributed.element_offset(p))
                for p, (_, i) in zip(plan.params, which[2])]
        table = torch.tensor(rows, dtype=torch.int64).to(plan.device, non_blocking=True)
        last["__rounding__"] = (which, table)
        return table


def _as_is(tensors: list[Tensor]) -> list[Tensor]:
    return tensors


_is_contiguous = Tensor.is_contiguous


def _contiguous(params: list[Tensor], grads: list[Tensor]):
    """Fused kernels take dense tensors: step contiguous copies of strided params/grads.

    Returns the params and grads to step and a callable that copies stepped params back
    (None when every tensor was dense already).
    """
    if all(map(_is_contiguous, params)) and all(map(_is_contiguous, grads)):
        return params, grads, None  # (the usual case, at C speed)
    strided = [i for i, p in enumerate(params) if not p.is_contiguous()]
    dense = list(params)
    for i in strided:
        dense[i] = params[i].contiguous()

    def write_back():
        for i in strided:
            params[i].copy_(dense[i])

    return dense, [g.contiguous() for g in grads], write_back
