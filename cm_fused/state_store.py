"""The per-parameter state of a step: its checks against the group, its allocation
(every group's before any group steps, taken back if any fails), the critical buffer's
entries and their dtype rules, and a version that changes with any of it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import checkpoint, distributed
from .contract import Variant, sum_dtype
from .spec import OptimizerSpec, Roles

if TYPE_CHECKING:
    from .planning import GroupPlan

Added = list  # [(state dict, keys added)]: what a failed allocation takes back


class StateStore:
    """Reads and writes ``opt.state`` (passed in: users clear or replace it) for one
    optimizer. ``version`` changes whenever the store (or torch's kappa=0 code, or a
    checkpoint) changes a state's entries: the plan cache keys on it."""

    def __init__(self, name: str, spec: OptimizerSpec) -> None:
        self.name, self.spec = name, spec
        self.version = 0

    def changed(self) -> None:
        self.version += 1

    # ------------------------------------------------------ checks

    def check(self, state: dict, group: dict, params: list[Tensor], roles: Roles) -> None:
        """Refuse a param whose dtype, shape or device, or a group whose buffer
        hyperparameters, changed since its first step."""
        moment = roles.second_moments or roles.momenta  # the param's dtype, or uint8 codes
        for p in params:
            st = state.get(p)
            if not st:
                continue
            m = st.get(moment) if moment else None
            if m is not None and (m.dtype == torch.uint8) != eight_bit_moments(group, p):
                raise RuntimeError(
                    f"this parameter's moments are {m.dtype} but the group's state_dtype "
                    f"{group.get('state_dtype')} and min_8bit_size "
                    f"{group.get('min_8bit_size')} ask for "
                    f"{'8-bit' if m.dtype != torch.uint8 else 'full-precision'} ones: they "
                    f"cannot change after the first step (load_state_dict converts a "
                    f"checkpoint's)")
            if m is not None and m.dtype not in (p.dtype, torch.uint8):
                raise RuntimeError(f"this parameter is {p.dtype} but its optimizer state "
                                   f"is {m.dtype}: a parameter's dtype cannot change "
                                   f"after its first step")
            if m is not None and (m.shape != p.shape or m.device != p.device):
                raise RuntimeError(
                    f"this parameter is {tuple(p.shape)} on {p.device} but its optimizer "
                    f"state is {tuple(m.shape)} on {m.device}: a parameter's shape and "
                    f"device cannot change after its first step (load_state_dict puts "
                    f"a checkpoint's state where its parameters are)")
            if self.spec.variant.buffered:
                _check_buffer(st, p, group)
            if self.spec.check_state is not None:
                self.spec.check_state(st, group)

    # ------------------------------------------------------ allocation

    def allocate(self, state: dict, plans: list[GroupPlan]) -> None:
        """Sets each plan's ``states``, with every entry its step needs allocated (zeros)
        for every group before any group steps: an out-of-memory stops before anything
        changes, and takes back what it allocated."""
        for plan in plans:  # (before any state is made: a refusal leaves none behind)
            if not plan.settled and plan.exchange is not None:
                self._check_8bit_shards(plan.group, plan.params)
        added: Added = []
        try:
            for plan in plans:
                states = list(map(state.__getitem__, plan.params)) if plan.settled else ()
                if not (states and all(states)):  # (a state emptied by hand: allocate)
                    states = [self._state_for(state, p, plan.group, plan.roles, added)
                              for p in plan.params]
                plan.states = states
        except BaseException:
            self._take_back(added)
            raise

    def _check_8bit_shards(self, group: dict, params: list[Tensor]) -> None:
        """8-bit state (moments, or int8 slots) of a DTensor: only for the placements
        distributed.scale_table lays out."""
        slots8 = group.get("buffer_dtype") == torch.int8 and self.spec.variant.buffered \
            and group["kappa"] > 0
        for p in params:
            if distributed.is_sharded_type(p) and (slots8 or eight_bit_moments(group, p)):
                distributed.check_8bit_placements(f"{self.name}: {_which(group, p)}", p)

    def _take_back(self, added: Added) -> None:
        for st, keys in added:
            for key in keys:
                del st[key]
        self.changed()

    def _state_for(self, state: dict, p: Tensor, group: dict, roles: Roles,
                   added: Added) -> dict:
        st = state[p]
        fresh = not st
        new: dict[str, Tensor] = {}
        eight = eight_bit_moments(group, p)
        for role, key in zip(Roles._fields, roles):
            if key is not None and key not in st:
                if role in MOMENT_ROLES and eight:  # codes (cm_fused/quantize.py)
                    new[key] = torch.zeros_like(p, dtype=torch.uint8,
                                                memory_format=torch.contiguous_format)
                    continue
                if role != "steps":
                    new[key] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    continue
                # The step counter lives on the param's device (read there by every
                # kernel), but at kappa=0 on meta, where torch's optimizers have neither a
                # fused nor a capturable path, on the CPU as torch keeps it.
                meta0 = group.get("kappa") == 0 and p.device.type == "meta"
                new[key] = torch.zeros((), dtype=torch.float32,
                                       device="cpu" if meta0 else p.device)
        if eight and (roles.momenta or roles.second_moments) and MOMENT_SCALES not in st:
            new[MOMENT_SCALES] = distributed.scale_table(p, 2)
        if fresh:
            if self.spec.variant.buffered and group["kappa"] > 0:
                new.update(self.new_buffer(p, group))
            if self.spec.new_state is not None:
                new.update(self.spec.new_state(p, group))
        elif "cm_buffer" in st:
            # A checkpoint of a version before the insert count (counted from here on) or
            # before deferred inserts.
            if "cm_inserts" not in st:
                new["cm_inserts"] = torch.zeros((), dtype=torch.int64, device=p.device)
            if self.spec.variant == Variant.ADAM_CM and "cm_pending" not in st:
                new["cm_pending"] = no_pending(p)
        if new:
            st.update(new)
            added.append((st, list(new)))
            self.changed()
        return st

    def new_buffer(self, p: Tensor, group: dict) -> dict[str, Tensor]:
        """A fresh critical buffer of ``p`` (docs/SPEC.md: slots, keys, counts, S; int8
        slots' scales; AdamCM's pending insert)."""
        slot = group["buffer_dtype"] or p.dtype
        C = group["topC"]
        extra = {}
        if slot == torch.int8:  # (a DTensor's: a table per shard, see allocate)
            extra["cm_scales"] = distributed.scale_table(p, C)
        if self.spec.variant == Variant.ADAM_CM:  # (see StepArgs.pending)
            extra["cm_pending"] = no_pending(p)
        # (shaped like p: DTensors for DTensor params, cm_fused/distributed.py)
        if keeps_sum(group):
            extra["cm_sum"] = torch.zeros_like(p, dtype=sum_dtype(slot),
                                               memory_format=torch.contiguous_format)
        return {**extra, "cm_buffer": distributed.slots_like(p, C, slot),
                "cm_keys": torch.zeros(C, dtype=torch.float32, device=p.device),
                "cm_count": torch.zeros((), dtype=torch.int64, device=p.device),
                "cm_inserts": torch.zeros((), dtype=torch.int64, device=p.device)}


def _check_buffer(st: dict, p: Tensor, group: dict) -> None:
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
    if ("cm_sum" in st) != keeps_sum(group):
        raise RuntimeError(f"this parameter's buffer {'keeps' if 'cm_sum' in st else 'has no'} "
                           f"running sum (cm_sum), which state_dtype, buffer_dtype and topC "
                           f"of the group do not ask for; they cannot change after the "
                           f"first step")


MOMENT_ROLES = ("momenta", "second_moments")  # the roles 8-bit moments code
MOMENT_SCALES = "moment_scales"  # their blocks' scales, fp32 [2, n_blocks]


def eight_bit_moments(group: dict, p: Tensor) -> bool:
    """Whether ``p``'s moments are 8-bit codes (docs/SPEC.md "8-bit moments")."""
    return group.get("state_dtype") == torch.int8 and p.numel() >= group["min_8bit_size"]


def keeps_sum(group: dict) -> bool:
    """Whether the group's buffers keep their running sum ``S`` (``cm_sum``): not with
    8-bit moments and slots and topC <= 8, whose update sums the slots instead."""
    return not (group.get("state_dtype") == torch.int8
                and group.get("buffer_dtype") == torch.int8 and group["topC"] <= 8)


def _which(group: dict, p: Tensor) -> str:
    """Names a parameter in an error: its index in its group, its shape."""
    i = next(i for i, q in enumerate(group["params"]) if q is p)
    return f"parameter {i} of its param group (shape {tuple(p.shape)})"


def no_pending(p: Tensor) -> Tensor:
    return torch.full((), -1, dtype=torch.int64, device=p.device)
