"""The torch.optim surface every optimizer of the package shares (:class:`CriticalOptimizer`),
orchestrating one step: plan every group (cm_fused/planning.py) → allocate its state
(cm_fused/state_store.py) → run it on its backend (cm_fused/dispatch.py, in two phases
where cm_fused/split_step.py says) → checkpoints (cm_fused/checkpoint.py).

An optimizer (cm_fused/optimizers.py) is a subclass with an ``__init__`` whose keywords
are its hyperparameters and a public :class:`~cm_fused.spec.OptimizerSpec`; it overrides
nothing here.
"""
from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import backend_choice, checkpoint, clipping, distributed, split_step, validation
from .backend_choice import BackendChoice
from .contract import Variant
from .dispatch import GroupRunner
from .pending import PendingInserts
from .planning import GroupPlan, Planner
from .spec import OptimizerSpec
from .state_store import StateStore

__all__ = ["CriticalOptimizer", "GroupPlan"]


class CriticalOptimizer(torch.optim.Optimizer):
    """Base class of every optimizer of the package: critical momenta and gradients
    (variants with a buffer) and adaptive memory (``*_AM``: no buffer, no kappa).

    ``backend``: ``"auto"`` (fastest available for the tensors' device, falling back to
    ``"reference"`` with one warning), ``"reference"``, ``"cpu"`` or ``"triton"`` (these
    raise if they cannot run). ``self.backends_in_use`` maps device type to the backend
    that last ran there; ``self.shared_decision`` is the spec's
    :class:`~cm_fused.spec.SharedDecision` (None for an optimizer without one).

    ``max_grad_norm``: clip the gradients by their global norm inside the step, as
    ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` before it would
    (cm_fused/clipping.py); ``self.grad_norm`` is then the last step's norm, before
    clipping: a 0-dim device tensor each step overwrites (clone it to keep it).
    ``stochastic_rounding``: bf16/fp16 params are rounded stochastically, with bits
    drawn from ``rounding_seed`` (cm_fused/rounding.py).
    """

    _step_supports_amp_scaling = True
    spec: ClassVar[OptimizerSpec]
    variant: ClassVar[Variant]  # spec.variant
    # The hyperparameters and their defaults: the subclass's __init__ keywords.
    HYPERPARAMETERS: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        sig = inspect.signature(cls.__init__)
        cls.HYPERPARAMETERS = {name: p.default for name, p in sig.parameters.items()
                               if name not in ("self", "params", "backend")}
        if "spec" in cls.__dict__:
            cls.variant = cls.spec.variant

    def __init__(self, params, hyperparameters: dict, backend: str = "auto"):
        backend_choice.check_name(backend)
        self.backend = backend
        self.grad_norm: Tensor | None = None
        self.backends_in_use: dict[str, str] = {}
        self._assemble()
        defaults = {name: hyperparameters[name] for name in self.HYPERPARAMETERS}
        if isinstance(defaults.get("betas"), list):
            defaults["betas"] = tuple(defaults["betas"])
        validation.validate(defaults, self.HYPERPARAMETERS)
        super().__init__(params, defaults)

    def _assemble(self) -> None:
        """The step's collaborators; what they hold is rebuilt, not pickled."""
        spec, name = self.spec, type(self).__name__
        self._store = StateStore(name, spec)
        self._backends = BackendChoice()
        self._planner = Planner(name, spec, self.HYPERPARAMETERS, self._store, self._backends)
        self._pending = PendingInserts(spec.variant)
        self.shared_decision = spec.shared_decision() if spec.shared_decision else None
        self._runner = GroupRunner(spec, self._store, self._pending, self.shared_decision,
                                   self.backends_in_use, lambda: self.param_groups)

    def __setstate__(self, state: dict) -> None:
        """Unpickling, and torch's load_state_dict (which calls it with the new groups).
        A hyperparameter added since the state was written gets its default (the
        behaviour of the version that did not have it)."""
        super().__setstate__(state)
        for group in [self.defaults, *self.param_groups]:
            for name, default in self.HYPERPARAMETERS.items():
                group.setdefault(name, default)
        if "_runner" not in self.__dict__:  # unpickled: fresh caches
            self.__dict__.setdefault("backend", "auto")
            self.backends_in_use = {}
            self.grad_norm = None
            self._assemble()
            # (a pickled state may hold pending inserts: every group is flushed when read)
            self._pending.replaced([], self.param_groups)

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
        backend_choice.check_flags(self.backend, full)
        super().add_param_group(param_group)
        try:
            validation.check_rounding(type(self).__name__, self.param_groups[-1])
            self._choose_backend(self.param_groups[-1])
        except (TypeError, ValueError, RuntimeError):
            self.param_groups.pop()
            raise

    def _choose_backend(self, group: dict) -> None:
        """Choose the group's backend now (it may load or build the C++ extension, and
        warns if 'auto' falls back), so that steps only look it up: torch.compile can
        trace a lookup, not a build. A choice that fails raises at the first step, or here
        with fused=True (as torch's fused optimizers refuse at construction)."""
        distributed.refuse_flattened(type(self).__name__, group["params"])
        devices = {p.device for p in group["params"]}
        if len(devices) != 1:
            return
        try:
            name, module = self._backends.resolve(
                self.backend, devices.pop(), frozenset(p.dtype for p in group["params"]),
                group.get("fused"),
                self.variant if group.get("state_dtype") == torch.int8 else None)
        except RuntimeError:
            if group.get("fused"):
                raise
            return
        backend_choice.check_top_c(group, name, module)

    # ------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._planner.check_shared(self.param_groups)
        if torch.compiler.is_compiling():  # (first: before the traced code reads the state)
            for group in self.param_groups:
                self._init_group(group)
        # Every check runs before the first change, so a step that raises changes nothing;
        # then all state is allocated.
        plans = [self._planner.plan(group, self.state, self.backend)
                 for group in self.param_groups]
        active = [plan for plan in plans if plan.params]
        split = split_step.needs_split(self.shared_decision, active)
        if split:  # (it checks that the groups can share one decision)
            self.shared_decision.begin(active)
        self._store.allocate(self.state, plans)
        grad_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler
        found_inf = getattr(self, "found_inf", None)
        max_norm = self.param_groups[0].get("max_grad_norm") if active else None
        if max_norm is not None:  # (every group has the same: Planner.check_shared)
            norm, grad_scale, found_inf = clipping.clipped(active, max_norm, grad_scale,
                                                           found_inf)
            self._norm_buffer(active[0].device).copy_(norm)
        if split:
            split_step.across_groups(self._runner, self.shared_decision, active, self.state,
                                     grad_scale, found_inf)
        else:
            for plan in active:
                split_step.one_group(self._runner, plan, self.state, grad_scale, found_inf)
        return loss

    def _init_group(self, group: dict) -> None:
        """Allocate the state a step of ``group`` needs (of its params with gradients).

        Called only while torch.compile traces a step: dynamo runs a method of this name
        eagerly, as it does torch's own optimizers' (the state it allocates becomes an
        input of the graph), so the first step runs the same graph as every later one
        instead of compiling one of its own that allocates. Whatever the traced step
        would change in the optimizer's attributes is changed here, for the same reason
        (a guard on its value before the first step would fail on the second)."""
        plan = self._planner.plan(group, self.state, self.backend)
        if not plan.params:
            return
        if group.get("max_grad_norm") is not None:
            self._norm_buffer(plan.device)
        self.backends_in_use[plan.device.type] = plan.backend
        self._pending.traced_step(plan)
        self._store.allocate(self.state, [plan])
        self._store.changed()  # (the traced step may add state: torch's code at kappa=0)
        if self.shared_decision is not None:
            self.shared_decision.memory(plan.device)  # (its sums, allocated here)

    def _norm_buffer(self, device: torch.device) -> Tensor:
        """``self.grad_norm``, made once per device: a traced step writes into it (dynamo
        does not replay a step's attribute assignments on an optimizer), as does a captured
        one (a CUDA graph replays into the same memory)."""
        if self.grad_norm is None or self.grad_norm.device != device:
            self.grad_norm = torch.zeros((), dtype=torch.float32, device=device)
        return self.grad_norm

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
        self._pending.flush_all(self.param_groups, self.state)

    # ------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """torch's, with every pending insert written first (a checkpoint holds the buffer
        as docs/SPEC.md defines it)."""
        self.flush_buffers()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        # Every check and conversion before any change: a load that raises changes nothing.
        pairs = checkpoint.loadable_pairs(self, state_dict)
        states = checkpoint.converted_states(self, state_dict, pairs)
        old_groups = list(self.param_groups)
        layouts = [checkpoint.layout(g) for g in old_groups]
        super().load_state_dict(state_dict)
        self._store.changed()
        self._runner.forget_lists()  # (they hold the replaced state)
        self._pending.replaced(old_groups, self.param_groups)
        for group, layout in zip(self.param_groups, layouts):
            group.update(layout)  # (the optimizer's state layout, not the checkpoint's)
        for pid, p in pairs:
            if pid in states:
                self.state[p] = states[pid]
