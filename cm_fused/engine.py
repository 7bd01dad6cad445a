"""The step engine every optimizer of the package runs on: groups, validation, state,
backend choice, dispatch and GradScaler; checkpoints' checks and dtype rules are in
cm_fused/checkpoint.py.

An optimizer (cm_fused/optimizers.py) is a thin subclass of :class:`CriticalOptimizer`
that says four things about itself: its :class:`~cm_fused.contract.Variant`, its
hyperparameters (the keywords of its ``__init__``), which state tensor plays which role
of the step (:meth:`~CriticalOptimizer._roles`) and which scalars it passes
(:meth:`~CriticalOptimizer._scalars`), plus torch's own code for ``kappa == 0``
(:meth:`~CriticalOptimizer._torch_step`). Everything else is here, once.

Per step and group: validate → allocate state (for every group, before any changes) →
build one :class:`~cm_fused.contract.StepArgs` → the backend's ``step(args)``.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import operator
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import checkpoint, distributed, registry, torch_step, validation
from .contract import Phase, StepArgs, Tensors, Variant, sum_dtype
from .quantize import n_blocks
from .reference import flush_pending

log = logging.getLogger("cm_fused")


def _attrs(name: str, tensors: list[Tensor]) -> list:
    """``[t.<name> for t in tensors]``, at C speed in eager mode (the per-tensor host time
    of a step is the floor of a GPU step); the plain loop where torch.compile traces (it
    cannot trace operator.attrgetter)."""
    if torch.compiler.is_compiling():
        return [getattr(t, name) for t in tensors]
    return list(map(operator.attrgetter(name), tensors))

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


@dataclass
class GroupPlan:
    """What one group's step will do, decided before anything is changed."""
    group: dict
    params: list[Tensor]
    device: torch.device | None
    backend: str
    module: ModuleType | None
    roles: dict | None = None  # the optimizer's _roles(group), once per group and step
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


class CriticalOptimizer(torch.optim.Optimizer):
    """Base class of every optimizer of the package: critical momenta and gradients
    (variants with a buffer) and adaptive memory (``*_AM``: no buffer, no kappa).

    ``backend``: ``"auto"`` (fastest available for the tensors' device, falling back to
    ``"reference"`` with one warning), ``"reference"``, ``"cpu"`` or ``"triton"`` (these
    raise if they cannot run). ``self.backends_in_use`` maps device type to the backend
    that last ran there.
    """

    _step_supports_amp_scaling = True
    variant: ClassVar[Variant]
    # The hyperparameters and their defaults: the subclass's __init__ keywords.
    HYPERPARAMETERS: ClassVar[dict[str, Any]] = {}
    # torch's counterpart has a fused kernel (used at kappa == 0 by the fused backends);
    # it takes GradScaler's grad_scale and found_inf.
    TORCH_FUSED: ClassVar[bool] = True
    # Every state entry this optimizer may keep besides the buffer's (torch's names):
    # a checkpoint with others was written by another optimizer.
    STATE_KEYS: ClassVar[tuple[str, ...]] = ()
    # The step's decision reads sums over every group (SGDAM): the engine splits the step
    # into Phase.REDUCE over all groups, then Phase.UPDATE over all groups.
    SPLIT_ACROSS_GROUPS: ClassVar[bool] = False
    # Hyperparameters every param group must share, and why (SGDAM: one beta for the
    # whole optimizer, from lam and beta_max).
    SHARED_ACROSS_GROUPS: ClassVar[tuple[tuple[str, ...], str]] = ((), "")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        sig = inspect.signature(cls.__init__)
        cls.HYPERPARAMETERS = {name: p.default for name, p in sig.parameters.items()
                               if name not in ("self", "params", "backend")}

    def __init__(self, params, hyperparameters: dict, backend: str = "auto"):
        if backend != "auto" and backend not in registry.NAMES:
            raise ValueError(f"Invalid backend: {backend!r} (expected 'auto' or one of "
                             f"{registry.NAMES})")
        self.backend = backend
        self.backends_in_use: dict[str, str] = {}
        self._warned: set[str] = set()
        self._backend_cache: dict = {}
        # What _plan's state checks last passed for, per group; any state change bumps
        # the version and so runs them again.
        self._checked: dict = {}
        self._state_version = 0
        # Per group: each state entry's tensors as given to the last step (Tensors).
        self._lists: dict = {}
        # Groups whose state may hold inserts decided but not written yet (cm_pending),
        # by id: flush_buffers() writes them. _graph_groups: those whose deferring step a
        # CUDA graph captured or torch.compile traced (their replays leave inserts pending
        # unseen: always flushed).
        self._pending_groups: set = set()
        self._graph_groups: set = set()
        defaults = {name: hyperparameters[name] for name in self.HYPERPARAMETERS}
        if isinstance(defaults.get("betas"), list):
            defaults["betas"] = tuple(defaults["betas"])
        validation.validate(defaults, self.HYPERPARAMETERS)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        """Also for checkpoints and pickles of an older version: a hyperparameter added
        since gets its default (the behaviour of the version that did not have it)."""
        super().__setstate__(state)
        for group in [self.defaults, *self.param_groups]:
            for name, default in self.HYPERPARAMETERS.items():
                group.setdefault(name, default)
        for attr, default in (("backend", "auto"), ("backends_in_use", {}), ("_warned", set()),
                              ("_backend_cache", {}), ("_checked", {}), ("_state_version", 0),
                              ("_lists", {})):
            self.__dict__.setdefault(attr, default)
        # (a pickled state may hold pending inserts: every group is flushed when read)
        self._pending_groups = {id(g) for g in self.param_groups}
        self._graph_groups = set()

    def __getstate__(self) -> dict:
        # torch's keeps defaults, state and groups only; the backend asked for is part of
        # the optimizer too (the caches and warnings are not: they are rebuilt).
        return {**super().__getstate__(), "backend": self.backend}

    def add_param_group(self, param_group: dict) -> None:
        full = {**self.defaults, **param_group}
        validation.validate(full, self.HYPERPARAMETERS)
        lr = full["lr"]
        if isinstance(lr, Tensor) and not lr.item() >= 0:  # here only: a step never reads it
            raise validation.bad("lr", lr, "must be >= 0")
        self._check_backend_flags(full)
        super().add_param_group(param_group)
        try:
            distributed.refuse_flattened(type(self).__name__, self.param_groups[-1]["params"])
        except TypeError:
            self.param_groups.pop()
            raise
        # Choose the group's backend now (it may load or build the C++ extension, and
        # warns if 'auto' falls back), so that steps only look it up: torch.compile can
        # trace a lookup, not a build. A choice that fails raises at the first step, or
        # here with fused=True (as torch's fused optimizers refuse at construction).
        group = self.param_groups[-1]
        devices = {p.device for p in group["params"]}
        if len(devices) == 1:
            try:
                name, module = self._resolve(devices.pop(),
                                             frozenset(p.dtype for p in group["params"]),
                                             group.get("fused"))
            except RuntimeError:
                if group.get("fused"):
                    self.param_groups.pop()
                    raise
            else:
                try:
                    _check_top_c(group, name, module)
                except ValueError:
                    self.param_groups.pop()
                    raise

    def _check_backend_flags(self, group: dict) -> None:
        """torch's fused=True/False against an explicitly named backend."""
        fused = group.get("fused")
        if fused and self.backend == "reference":
            raise ValueError("fused=True asks for a fused backend, but backend='reference' "
                             "was named")
        if fused is False and self.backend not in ("auto", "reference"):
            raise ValueError(f"fused=False asks for the reference backend, but "
                             f"backend={self.backend!r} was named")

    # ------------------------------------------------------ what a subclass says

    def _roles(self, group: dict) -> dict[str, str | None]:
        """The state key of each per-tensor role of the step (momenta, second_moments,
        extras, steps), None where unused."""
        raise NotImplementedError

    def _scalars(self, group: dict) -> dict[str, float]:
        """beta1, beta2, eps, weight_decay, dampening, key_decay, critical_test."""
        raise NotImplementedError

    def _torch_step(self, group: dict, params: list[Tensor], grads: list[Tensor],
                    states: list[dict], lr, **impl) -> None:
        """kappa == 0: torch's own functional step, with ``impl`` (fused, foreach, ...)."""
        raise NotImplementedError

    def _check_state(self, state: dict, group: dict) -> None:
        """Refuse a group change this optimizer cannot follow (a hook; nothing by default)."""

    def _torch_fused_ok(self, group: dict, states: list[dict]) -> bool:
        """Whether torch's fused kernel can take this kappa == 0 step (a hook)."""
        return self.TORCH_FUSED

    # ------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_shared()
        if torch.compiler.is_compiling():  # (first: before the traced code reads the state)
            for group in self.param_groups:
                self._init_group(group)
        # Every check runs before the first change, so a step that raises changes nothing;
        # then all state is allocated (an out-of-memory stops before any group steps, and
        # takes back what it allocated).
        plans = [self._plan(group) for group in self.param_groups]
        active = [plan for plan in plans if plan.params]
        split = self.SPLIT_ACROSS_GROUPS and (len(active) > 1 or _sharded(active))
        if split:  # (it checks that the groups can share one decision)
            self._begin_split(active)
        added: list[tuple[dict, list[str]]] = []
        try:
            for plan in plans:
                states = list(map(self.state.__getitem__, plan.params)) if plan.settled else ()
                if not (states and all(states)):  # (a state emptied by hand: allocate)
                    states = [self._state_for(p, plan.group, plan.roles, added)
                              for p in plan.params]
                plan.states = states
        except BaseException:
            self._take_back(added)
            raise
        grad_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler
        found_inf = getattr(self, "found_inf", None)
        if split:
            # One decision from sums over every group (and process): all reduce, then
            # all update.
            for plan in active:
                self._run(plan, grad_scale, found_inf, Phase.REDUCE)
            self._sum_split_over_shards(active)
            for plan in active:
                self._run(plan, grad_scale, found_inf, Phase.UPDATE)
            return loss
        for plan in active:
            if not (plan.exchange and plan.group.get("kappa") != 0):
                self._run(plan, grad_scale, found_inf)
                continue
            # Sharded tensors: their sums are completed over the processes before any
            # decision (cm_fused/distributed.py).
            reduced = torch.zeros(len(plan.params), self.variant.sums_per_tensor,
                                  dtype=torch.float64, device=plan.device)
            self._run(plan, grad_scale, found_inf, Phase.REDUCE, reduced)
            distributed.sum_over_shards(reduced, plan.exchange)
            self._run(plan, grad_scale, found_inf, Phase.UPDATE, reduced)
        return loss

    def _check_shared(self) -> None:
        """The hyperparameters every group must share (SHARED_ACROSS_GROUPS) agree."""
        names, why = self.SHARED_ACROSS_GROUPS
        if names:
            shared = {tuple(g[n] for n in names) for g in self.param_groups}
            if len(shared) > 1:
                raise ValueError(f"{type(self).__name__}: every param group must have the "
                                 f"same {' and '.join(names)} ({why}), got {sorted(shared)}")

    def _begin_split(self, plans: list[GroupPlan]) -> None:
        """Before a step split into phases (SPLIT_ACROSS_GROUPS): check that the groups
        can share one decision, and reset the sums the REDUCE phase adds into (a hook)."""
        raise NotImplementedError

    def _sum_split_over_shards(self, plans: list[GroupPlan]) -> None:
        """Between the phases of a step split across groups: sum what REDUCE added up
        over the processes that hold shards of the tensors (a hook)."""
        raise NotImplementedError

    def _plan(self, group: dict) -> GroupPlan:
        validation.validate(group, self.HYPERPARAMETERS)
        params = group["params"]
        grads = _attrs("grad", params)
        if _any_none(grads):
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
            if not params:
                return GroupPlan(group, [], None, "reference", None)
        dtypes = _attrs("dtype", params)
        # The state checks and the backend choice depend on the params, their dtypes and
        # device, the hyperparameters and the state: skipped while none of these changed
        # since they last passed.
        last = None
        if not torch.compiler.is_compiling():  # (traced once: nothing to save)
            # (the state dict's identity and size too: users reset an optimizer by
            # clearing or replacing opt.state)
            checked = (self._state_version, id(self.state), len(self.state),
                       list(map(id, params)), dtypes,
                       [(k, v) for k, v in group.items() if k not in ("params", "lr")])
            last = self._checked.get(id(group))
            if last is not None and last.key != checked:
                last = None
        if not self._check_grads(params, grads, dtypes, last.shapes if last else None):
            last = None  # (a param's shape changed since: its state is checked again)
        roles = self._roles(group)
        # (settled: the params are where they were when checked, unless moved, and then
        # their gradients, made or moved with them, are elsewhere too)
        devices = set(_attrs("device", grads))
        if last is None or devices != {last.device}:
            devices |= set(_attrs("device", params))
        if len(devices) > 1:
            raise RuntimeError(f"all parameters of a group and their gradients must be on one "
                               f"device, got {sorted(map(str, devices))}")
        device = devices.pop()
        if last is not None and last.device == device:
            if last.exchange is not None:
                distributed.check_gradients(type(self).__name__, params, grads)
            return GroupPlan(group, params, device, last.backend, last.module, roles, grads,
                             settled=True, exchange=last.exchange, fp32=last.fp32)
        self._check_states(group, params, roles)
        # (again here: a wrapper may put partitions into the groups after construction)
        distributed.refuse_flattened(type(self).__name__, params)
        exchange = distributed.exchange_for(type(self).__name__, params, grads)
        # The dtypes of the whole group, not only of this step's tensors: one choice per
        # group, whichever of its tensors have gradients.
        backend, module = self._resolve(device, frozenset(p.dtype for p in group["params"]),
                                        group.get("fused"))
        _check_top_c(group, backend, module)
        fp32 = all(d is torch.float32 for d in dtypes)
        if not torch.compiler.is_compiling():
            self._checked[id(group)] = _Checked(checked, exchange, _attrs("shape", params),
                                                device, backend, module, fp32)
        return GroupPlan(group, params, device, backend, module, roles, grads,
                         exchange=exchange, fp32=fp32)

    def _check_grads(self, params: list[Tensor], grads: list[Tensor], dtypes: list,
                     shapes: list | None = None) -> bool:
        """``shapes``: the params' shapes when last checked, if nothing changed since (a
        mismatch is checked again against their shapes now). Returns whether the
        gradients have those shapes."""
        name = type(self).__name__
        if any(_attrs("is_sparse", grads)):
            raise RuntimeError(f"{name} does not support sparse gradients")
        grad_dtypes = _attrs("dtype", grads)
        # (settled, and the same dtypes: they passed this when last checked)
        same = grad_dtypes == dtypes
        if not (same and shapes is not None) and any(
                d.is_complex for d in (set(dtypes) if same else {*dtypes, *grad_dtypes})):
            raise RuntimeError(f"{name} does not support complex parameters or gradients")
        grad_shapes = _attrs("shape", grads)
        if not same or (grad_shapes != shapes
                                     and grad_shapes != _attrs("shape", params)):
            p, g = next((p, g) for p, g in zip(params, grads)
                        if g.shape != p.shape or g.dtype != p.dtype)
            raise RuntimeError(f"gradient {tuple(g.shape)} {g.dtype} does not match parameter "
                               f"{tuple(p.shape)} {p.dtype}")
        return grad_shapes == shapes

    def _check_states(self, group: dict, params: list[Tensor], roles: dict) -> None:
        moment = roles["second_moments"] or roles["momenta"]  # stored in the param's dtype
        for p in params:
            st = self.state.get(p)
            if st:
                m = st.get(moment) if moment else None
                if m is not None and m.dtype != p.dtype:
                    raise RuntimeError(f"this parameter is {p.dtype} but its optimizer state "
                                       f"is {m.dtype}: a parameter's dtype cannot change "
                                       f"after its first step")
                if m is not None and (m.shape != p.shape or m.device != p.device):
                    raise RuntimeError(
                        f"this parameter is {tuple(p.shape)} on {p.device} but its optimizer "
                        f"state is {tuple(m.shape)} on {m.device}: a parameter's shape and "
                        f"device cannot change after its first step (load_state_dict puts "
                        f"a checkpoint's state where its parameters are)")
                if self.variant.buffered:
                    self._check_buffer_state(st, p, group)
                self._check_state(st, group)

    def _check_buffer_state(self, st: dict, p: Tensor, group: dict) -> None:
        if group["kappa"] <= 0:
            return
        if "cm_buffer" not in st:
            raise RuntimeError("this parameter has stepped with kappa=0; turning the "
                               "critical buffer on afterwards is not supported")
        buf = st["cm_buffer"]
        if buf.shape[0] != group["topC"]:
            raise RuntimeError(f"the group's topC is {group['topC']} but this parameter's "
                               f"buffer holds {buf.shape[0]} slots; topC cannot change after "
                               f"the first step")
        want = group["buffer_dtype"] or p.dtype
        if buf.dtype != want:
            raise RuntimeError(f"the group's buffer_dtype resolves to {want} but this "
                               f"parameter's buffer is {buf.dtype}; it cannot change after "
                               f"the first step")
        if want == torch.int8:
            checkpoint.check_scales(st.get("cm_scales"), buf, p)

    def _resolve(self, device: torch.device, dtypes: frozenset,
                 fused: bool | None = None) -> tuple[str, ModuleType]:
        """The backend for tensors of this device and dtypes (and torch's ``fused`` flag:
        True requires a fused backend, False means the reference): decided once, then
        cached."""
        key = (self.backend, device, dtypes, fused)
        hit = self._backend_cache.get(key)
        if hit is None:
            hit = self._backend_cache[key] = self._choose(device, set(dtypes), fused)
            log.debug("cm_fused: %s steps %s parameters on %s", hit[0],
                      sorted(map(str, dtypes)), device)
        return hit

    def _choose(self, device: torch.device, dtypes: set,
                fused: bool | None) -> tuple[str, ModuleType]:
        name, must_run = self.backend, self.backend != "auto"
        if name == "auto":
            if fused is False:  # torch's "not the fused kernel"
                return "reference", registry.module("reference")
            name, must_run = registry.preferred(device), bool(fused)
        reason = registry.why_not(name, device, dtypes)
        if fused and name == "reference":
            reason = f"no fused backend runs on {device.type} tensors"
        if reason is None:
            return name, registry.module(name)
        if must_run:
            asked = "fused=True, but no fused backend can" if fused else \
                f"backend={name!r} cannot"
            raise RuntimeError(f"{asked} step {sorted(map(str, dtypes))} tensors on {device}: "
                               f"{reason}")
        message = f"cm_fused: backend 'auto' uses 'reference' on {device}: '{name}' {reason}"
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=5)
        reason = registry.why_not("reference", device, dtypes)
        if reason:
            raise RuntimeError(f"no backend can step these parameters: {reason}")
        return "reference", registry.module("reference")

    def _init_group(self, group: dict) -> None:
        """Allocate the state a step of ``group`` needs (of its params with gradients).

        Called only while torch.compile traces a step: dynamo runs a method of this name
        eagerly, as it does torch's own optimizers' (the state it allocates becomes an
        input of the graph), so the first step runs the same graph as every later one
        instead of compiling one of its own that allocates. Whatever the traced step
        would change in the optimizer's attributes is changed here, for the same reason
        (a guard on its value before the first step would fail on the second)."""
        plan = self._plan(group)
        if not plan.params:
            return
        self.backends_in_use[plan.device.type] = plan.backend
        if self._defers(plan):
            self._graph_groups.add(id(group))
        added: list[tuple[dict, list[str]]] = []
        try:
            for p in plan.params:
                self._state_for(p, group, plan.roles, added)
        except BaseException:
            self._take_back(added)
            raise

    def _take_back(self, added: list[tuple[dict, list[str]]]) -> None:
        for st, keys in added:
            for key in keys:
                del st[key]
        self._state_version += 1

    def _state_for(self, p: Tensor, group: dict, roles: dict, added: list) -> dict:
        """p's state, with every entry this step needs allocated (zeros); the keys added
        are recorded in ``added`` so that a failed allocation can be taken back."""
        st = self.state[p]
        fresh = not st
        new: dict[str, Tensor] = {}
        for role, key in roles.items():
            if key is not None and key not in st:
                if role != "steps":
                    new[key] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    continue
                # The step counter lives on the param's device (read there by every
                # kernel), but at kappa=0 on meta, where torch's optimizers have neither a
                # fused nor a capturable path, on the CPU as torch keeps it.
                meta0 = group.get("kappa") == 0 and p.device.type == "meta"
                new[key] = torch.zeros((), dtype=torch.float32,
                                       device="cpu" if meta0 else p.device)
        if fresh:
            new.update(self._new_state(p, group))
        elif "cm_buffer" in st:
            # A checkpoint of a version before the insert count (counted from here on) or
            # before deferred inserts.
            if "cm_inserts" not in st:
                new["cm_inserts"] = torch.zeros((), dtype=torch.int64, device=p.device)
            if self.variant == Variant.ADAM_CM and "cm_pending" not in st:
                new["cm_pending"] = _no_pending(p)
        if new:
            st.update(new)
            added.append((st, list(new)))
            self._state_version += 1
        return st

    def _new_state(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        """The entries of a fresh state besides the roles' (the critical buffer, when
        kappa > 0; a hook)."""
        if group["kappa"] <= 0:
            return {}
        slot = group["buffer_dtype"] or p.dtype
        C = group["topC"]
        extra = {}  # (int8 slots: their scales; AdamCM: the pending insert)
        if slot == torch.int8:
            if distributed.is_sharded_type(p):
                raise NotImplementedError(
                    f"{type(self).__name__}: buffer_dtype=torch.int8 with sharded (DTensor) "
                    f"parameters is not supported yet (a shard's quantization blocks would not "
                    f"be the whole tensor's); use a floating-point buffer_dtype")
            extra["cm_scales"] = torch.zeros(C, n_blocks(p.numel()), dtype=torch.float32,
                                             device=p.device)
        if self.variant == Variant.ADAM_CM:  # (see StepArgs.pending)
            extra["cm_pending"] = _no_pending(p)
        # (shaped like p: DTensors for DTensor params, cm_fused/distributed.py)
        return {**extra, "cm_buffer": distributed.slots_like(p, C, slot),
                "cm_keys": torch.zeros(C, dtype=torch.float32, device=p.device),
                "cm_count": torch.zeros((), dtype=torch.int64, device=p.device),
                "cm_inserts": torch.zeros((), dtype=torch.int64, device=p.device),
                "cm_sum": torch.zeros_like(p, dtype=sum_dtype(slot),
                                           memory_format=torch.contiguous_format)}

    def _memory(self, plan: GroupPlan) -> list[Tensor]:
        """StepArgs.memory of the group (the adaptive-memory scalars; a hook)."""
        return []

    def _run(self, plan: GroupPlan, grad_scale: Tensor | None, found_inf: Tensor | None,
             phase: Phase = Phase.ALL, reduced: Tensor | None = None) -> None:
        """The group's step, or one phase of it (the StepArgs built for the first phase
        serve the second)."""
        if plan.args is None:
            plan.args = self._step_args(plan, grad_scale, found_inf)
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

    def _step_args(self, plan: GroupPlan, grad_scale: Tensor | None,
                   found_inf: Tensor | None) -> StepArgs | None:
        """The group's StepArgs (None after running torch's step, at kappa == 0)."""
        group, params, device, states = plan.group, plan.params, plan.device, plan.states
        if not torch.compiler.is_compiling():  # (see _init_group)
            self.backends_in_use[device.type] = plan.backend
        if grad_scale is not None:
            grad_scale = grad_scale.to(device, non_blocking=True)
        if found_inf is not None:
            found_inf = found_inf.to(device, non_blocking=True)
        lr = group["lr"]
        grads = plan.grads
        defer = self._defers(plan)
        if defer:
            if not torch.compiler.is_compiling():  # (see _init_group)
                self._pending_groups.add(id(group))
                if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    self._graph_groups.add(id(group))
        elif self._may_pend(group):
            # (this step writes each insert as it decides it, or steps torch's code, which
            # changes the momentum a pending insert would write)
            self._flush(group)
        if group.get("kappa") == 0:
            if isinstance(lr, Tensor):  # torch's code takes the tensor as it is
                lr = lr.to(device, non_blocking=True)
            torch_step.run(self, plan, grads, lr, grad_scale, found_inf)
            return None
        if isinstance(lr, Tensor):
            # Once here, so no backend copies it: every backend reads a 0-dim fp32 lr on
            # the device (a bf16 lr would round 1 - lr·wd to bf16 in the reference only;
            # a [1]-shaped one would broadcast 0-dim params).
            lr = lr.to(device, torch.float32, non_blocking=True).reshape(())
        # DTensors (FSDP2): the kernels step the local shards.
        tensors = distributed.local if plan.exchange is not None else _as_is
        params, grads = tensors(params), tensors(grads)
        if plan.backend != "reference":
            params, grads, plan.write_back = _contiguous(params, grads)
        roles = plan.roles
        compiling = torch.compiler.is_compiling()
        # (not while tracing: a first entry would be a guard that fails on the next step)
        last = {} if compiling else self._lists.setdefault(id(plan.group), {})

        def vouched(name: str, ts: list[Tensor]) -> list[Tensor]:
            if compiling:
                return ts
            # The same tensors as last step: the same Tensors (and serial), which the
            # Triton launcher keys its tables on (cm_fused.contract.Tensors).
            old = last.get(name)
            if old is not None and len(old) == len(ts) and all(map(operator.is_, old, ts)):
                return old
            last[name] = new = Tensors(ts)
            return new

        def gather(role: str, shaped=tensors) -> list[Tensor]:
            key = roles[role]
            return vouched(key, shaped([s[key] for s in states])) if key is not None else []

        def buffer(key: str, shaped=tensors) -> list[Tensor]:
            return vouched(key, shaped([s[key] for s in states])) if self.variant.buffered \
                else []

        quantized = group.get("buffer_dtype") == torch.int8

        return StepArgs(
            params=params, grads=grads, momenta=gather("momenta"),
            second_moments=gather("second_moments"), extras=gather("extras"),
            buffers=buffer("cm_buffer"), scales=buffer("cm_scales") if quantized else [],
            keys=buffer("cm_keys", _as_is),
            counts=buffer("cm_count", _as_is), inserts=buffer("cm_inserts", _as_is),
            sums=buffer("cm_sum"), pending=buffer("cm_pending", _as_is) if defer else [],
            steps=gather("steps", _as_is), memory=vouched("memory", self._memory(plan)),
            variant=int(self.variant), lr=0.0 if isinstance(lr, Tensor) else float(lr),
            lr_tensor=lr if isinstance(lr, Tensor) else None, **self._scalars(group),
            lam=group.get("lam", 0.0), synced=group.get("synced", False),
            maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf,
            rand=None, phase=int(Phase.ALL))

    def _defers(self, plan: GroupPlan) -> bool:
        """Whether this step leaves its inserts pending (StepArgs.pending): AdamCM on a
        backend that folds the norm into its update pass, which it can only do by writing
        each insert at the start of the next step, from the momentum as stored (hence fp32
        params, whose stored momentum is the value inserted), and not in a split step or
        at kappa == 0 (torch's step)."""
        return (self.variant == Variant.ADAM_CM and plan.group.get("kappa") != 0
                and plan.exchange is None
                and plan.module.CAPABILITIES.defers_inserts
                and plan.fp32)

    def flush_buffers(self) -> None:
        """Write the critical-buffer inserts that steps decided but left pending, so that
        ``opt.state`` holds the buffer as docs/SPEC.md defines it after the last step.

        The fused backends leave AdamCM's inserts pending (``cm_pending``) and write each
        at the start of the next step, in their one pass over memory; ``state_dict()``,
        ``buffer_diagnostics()`` and a step on another backend call this first. Call it
        before reading ``cm_buffer``, ``cm_scales`` or ``cm_sum`` from ``opt.state``
        directly. No device sync. On a GPU it costs a masked insert per tensor of each
        group that may hold one (a read and a rewrite of one slot and S, whether or not an
        insert is pending); with CPU state only the tensors holding one are written. Call
        it when the buffer is read, not every step."""
        for group in self.param_groups:
            if self._may_pend(group):
                self._flush(group)

    def _may_pend(self, group: dict) -> bool:
        return id(group) in self._pending_groups or id(group) in self._graph_groups

    def _flush(self, group: dict) -> None:
        self._pending_groups.discard(id(group))
        # CPU state (eager): a host read says which tensors hold an insert, with no device
        # to wait for, so a group flushed before every step (_graph_groups) costs nothing
        # once written. Elsewhere, and while tracing, the masked write of every tensor.
        read = not torch.compiler.is_compiling()
        for p in group["params"]:
            st = self.state.get(p)
            if st and "cm_pending" in st and not distributed.is_sharded_type(st["cm_buffer"]):
                pending = st["cm_pending"]
                if read and pending.device.type == "cpu" and pending.item() < 0:
                    continue
                flush_pending(st["cm_buffer"], st["cm_sum"], st.get("cm_scales"),
                              st["exp_avg"], pending)

    def state_dict(self) -> dict:
        """torch's, with every pending insert written first (a checkpoint holds the buffer
        as docs/SPEC.md defines it)."""
        self.flush_buffers()
        return super().state_dict()

    # ------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict) -> None:
        pairs = checkpoint.loadable_pairs(self, state_dict)  # (refuses before any change)
        # (torch's load replaces the group dicts and, through __setstate__, the sets of
        # groups by id: a group whose deferring step a graph may still replay stays marked)
        replayed = [i for i, g in enumerate(self.param_groups) if id(g) in self._graph_groups]
        super().load_state_dict(state_dict)
        self._state_version += 1
        self._lists.clear()  # (they hold the replaced state)
        self._pending_groups = {id(g) for g in self.param_groups}
        self._graph_groups = {id(self.param_groups[i]) for i in replayed}
        saved_state = state_dict["state"]
        for pid, p in pairs:
            if pid in saved_state:
                self.state[p] = checkpoint.restored(saved_state[pid], p)


def _check_top_c(group: dict, backend: str, module: ModuleType) -> None:
    """A backend may bound topC (Triton's decide kernel holds a tensor's keys in
    registers); refuse a larger one with the way out."""
    limit = module.CAPABILITIES.max_top_c
    if limit is not None and group.get("kappa", 0) > 0 and group["topC"] > limit:
        raise ValueError(f"Invalid topC: {group['topC']} (the {backend!r} backend takes topC "
                         f"<= {limit}; use backend='reference' for a larger buffer)")


def _no_pending(p: Tensor) -> Tensor:
    return torch.full((), -1, dtype=torch.int64, device=p.device)


def _any_none(values: list) -> bool:
    if torch.compiler.is_compiling():
        return any(v is None for v in values)
    return any(map(operator.is_, values, itertools.repeat(None)))


def _sharded(plans: list[GroupPlan]) -> bool:
    return any(plan.exchange for plan in plans)


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
