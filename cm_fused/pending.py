"""AdamCM's deferred inserts (``cm_pending``, StepArgs.pending): which steps defer, which
groups may hold an insert decided but not written, and writing them.

The invariant this owns: a group whose state may hold a pending insert is marked, and is
flushed before anything reads its buffer as docs/SPEC.md defines it (``state_dict``,
``buffer_diagnostics``, a step that does not defer). A group whose deferring step a CUDA
graph captured or torch.compile traced stays marked for good: its replays leave inserts
pending unseen.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import distributed
from .contract import Variant
from .reference import flush_pending

if TYPE_CHECKING:
    from .planning import GroupPlan


class PendingInserts:
    def __init__(self, variant: Variant) -> None:
        self.variant = variant
        self._pending: set = set()  # groups, by id
        self._replayed: set = set()  # groups whose deferring step a graph replays

    def defers(self, plan: GroupPlan) -> bool:
        """Whether this step leaves its inserts pending: AdamCM on a backend that folds
        the norm into its update pass, which it can only do by writing each insert at the
        start of the next step, from the momentum as stored (hence fp32 params, whose
        stored momentum is the value inserted), and not in a split step or at kappa == 0
        (torch's step). Not with 8-bit moments either: the value inserted is the new momentum
        before it is quantized, which the codes stored next step no longer hold."""
        return (self.variant == Variant.ADAM_CM and plan.group.get("kappa") != 0
                and plan.group.get("state_dtype") != torch.int8
                and plan.exchange is None
                and plan.module.CAPABILITIES.defers_inserts
                and plan.fp32)

    def before_step(self, plan: GroupPlan, state: dict) -> bool:
        """Marks the group if this step defers (returns True), else writes what it holds
        (this step writes each insert as it decides it, or steps torch's code, which
        changes the momentum a pending insert would write)."""
        group = plan.group
        if not self.defers(plan):
            if self.may_pend(group):
                self.flush(group, state)
            return False
        if not torch.compiler.is_compiling():  # (traced: marked by traced_step)
            self._pending.add(id(group))
            if plan.device.type == "cuda" and _capturing_on(plan.device):
                self._replayed.add(id(group))
        return True

    def traced_step(self, plan: GroupPlan) -> None:
        """torch.compile traces a step of the group (called eagerly, before the trace)."""
        if self.defers(plan):
            self._replayed.add(id(plan.group))

    def may_pend(self, group: dict) -> bool:
        return id(group) in self._pending or id(group) in self._replayed

    def flush_all(self, groups: list[dict], state: dict) -> None:
        for group in groups:
            if self.may_pend(group):
                self.flush(group, state)

    def flush(self, group: dict, state: dict) -> None:
        self._pending.discard(id(group))
        # CPU state (eager): a host read says which tensors hold an insert, with no device
        # to wait for, so a group flushed before every step (replayed) costs nothing
        # once written. Elsewhere, and while tracing, the masked write of every tensor.
        read = not torch.compiler.is_compiling()
        for p in group["params"]:
            st = state.get(p)
            if st and "cm_pending" in st and not distributed.is_sharded_type(st["cm_buffer"]):
                pending = st["cm_pending"]
                if read and pending.device.type == "cpu" and pending.item() < 0:
                    continue
                flush_pending(st["cm_buffer"], st.get("cm_sum"), st.get("cm_scales"),
                              st["exp_avg"], pending)

    def replaced(self, old: list[dict], new: list[dict]) -> None:
        """The group dicts were replaced (torch's load_state_dict, an unpickled state,
        whose state may hold pending inserts): every new group may pend, and one whose
        old group a graph replays stays marked."""
        replayed = {i for i, g in enumerate(old) if id(g) in self._replayed}
        self._pending = {id(g) for g in new}
        self._replayed = {id(g) for i, g in enumerate(new) if i in replayed}


def _capturing_on(device: torch.device) -> bool:
    """Whether the current stream of ``device`` (not of the current device) captures."""
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()
