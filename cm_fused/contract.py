"""The step's contract: what every backend is given, declared once.

:class:`StepArgs` is the one declaration of a fused step's inputs (tensor lists,
hyperparameters, GradScaler inputs). The optimizer builds one per param group and step;
the reference backend reads it directly, the Triton launcher reads it directly, and the
``torch.library`` ops of the fused backends take its fields in order, with the schema
generated from this class (:data:`SCHEMA`), so the C++ kernel's signature
(csrc/step.cpp) is the only other place the argument list is written.

Every optimizer of the package is one :class:`Variant` of the same step:
**reduce** (per-tensor sums of squares of the unscaled gradients) → **decide** (the
priority key, the insert slot, keys decayed, counts and step counts: one rule for all)
→ **update** (one elementwise pass whose arithmetic the variant selects). docs/SPEC.md
is the math.
"""
from __future__ import annotations

import dataclasses
import enum
import typing
from typing import Optional

import torch
from torch import Tensor


class Variant(enum.IntEnum):
    """Which update the step computes. The values are part of the op's ABI: csrc/step.h
    and cm_fused/triton/kernels.py use the same numbers."""

    ADAM_CM = 0     # Adam + critical momenta: the momentum is inserted, a = m + S/k
    ADAM_CG = 1     # Adam + critical gradients: g is inserted, u = g + S/k
    SGD_CG = 2      # SGD + critical gradients: d = g + wd·p is inserted, u = d + S/k
    RMSPROP_CG = 3  # RMSprop + critical gradients: g is inserted, u = S/k


# Field metadata: the op mutates this list (schema alias annotation "(aN!)").
_MUTATED = {"mutated": True}


@dataclasses.dataclass
class StepArgs:
    """The inputs of one step of one param group, kappa > 0.

    Per-tensor lists hold one entry per parameter stepped (those with a gradient), all in
    the same order; a role the variant or the configuration does not use is an empty
    list (``momenta`` without momentum, ``extras`` without amsgrad or centered,
    ``second_moments`` for SGD). The kernels tell what is in use from that.
    """

    params: list[Tensor] = dataclasses.field(metadata=_MUTATED)
    grads: list[Tensor]
    # Adam's exp_avg; SGD's and RMSprop's momentum_buffer.
    momenta: list[Tensor] = dataclasses.field(metadata=_MUTATED)
    # Adam's exp_avg_sq; RMSprop's square_avg.
    second_moments: list[Tensor] = dataclasses.field(metadata=_MUTATED)
    # Adam's max_exp_avg_sq (amsgrad); RMSprop's grad_avg (centered).
    extras: list[Tensor] = dataclasses.field(metadata=_MUTATED)
    buffers: list[Tensor] = dataclasses.field(metadata=_MUTATED)  # [topC, *shape] slots
    keys: list[Tensor] = dataclasses.field(metadata=_MUTATED)     # [topC] fp32
    counts: list[Tensor] = dataclasses.field(metadata=_MUTATED)   # 0-dim int64: filled slots
    sums: list[Tensor] = dataclasses.field(metadata=_MUTATED)     # like p: sum of the slots
    steps: list[Tensor] = dataclasses.field(metadata=_MUTATED)    # 0-dim fp32
    variant: int
    lr: float                   # ignored when lr_tensor is given
    lr_tensor: Optional[Tensor]  # a 0-dim tensor lr, on the params' device
    beta1: float                # Adam's beta1; SGD's and RMSprop's momentum
    beta2: float                # Adam's beta2; RMSprop's alpha
    eps: float
    weight_decay: float         # decoupled for ADAM_CM, coupled (L2) for the others
    dampening: float            # SGD only
    key_decay: float            # every key is multiplied by it once per step
    critical_test: float        # probability of an unconditional replacement (with rand)
    synced: bool                # one key for the group: the sum of per-tensor norms
    maximize: bool              # step along +g: the gradient is negated after unscaling
    grad_scale: Optional[Tensor]  # divide gradients by it (GradScaler)
    found_inf: Optional[Tensor]   # nonzero: the step changes nothing at all
    rand: Optional[Tensor]        # fp32 [len(params)] coin draws for critical_test

    def op_args(self) -> tuple:
        """The fields in schema order (not dataclasses.astuple: that deep-copies)."""
        return tuple(getattr(self, name) for name in FIELDS)

    @classmethod
    def from_op_args(cls, args: tuple) -> StepArgs:
        return cls(*args)


FIELDS = tuple(f.name for f in dataclasses.fields(StepArgs))


def _schema() -> str:
    hints = typing.get_type_hints(StepArgs)
    types = {list[Tensor]: "Tensor{}[]", Optional[Tensor]: "Tensor?", int: "int",
             float: "float", bool: "bool"}
    parts, alias = [], 0
    for f in dataclasses.fields(StepArgs):
        text = types[hints[f.name]]
        if f.metadata.get("mutated"):
            text, alias = text.format(f"(a{alias}!)"), alias + 1
        parts.append(f"{text.format('')} {f.name}")
    return "(" + ", ".join(parts) + ") -> ()"


# The schema of every fused step op: "(Tensor(a0!)[] params, Tensor[] grads, ...) -> ()".
SCHEMA = _schema()
MUTATED = tuple(f.name for f in dataclasses.fields(StepArgs) if f.metadata.get("mutated"))

_libraries: dict[str, torch.library.Library] = {}


def define_op(qualname: str) -> None:
    """Define the op ``namespace::name`` with :data:`SCHEMA` and a fake implementation
    (the step mutates its inputs and returns nothing). Idempotent."""
    namespace, name = qualname.split("::")
    if qualname in _libraries:
        return
    lib = torch.library.Library(namespace, "FRAGMENT")
    lib.define(name + SCHEMA)
    torch.library.register_fake(qualname, lib=lib)(_fake)
    _libraries[qualname] = lib


def _fake(*args) -> None:
    return None


def sum_dtype(slot_dtype: torch.dtype) -> torch.dtype:
    """S is fp32 whenever slots are narrower than fp32 (a bf16 running sum drifts)."""
    return torch.float32 if slot_dtype.itemsize < 4 else slot_dtype
