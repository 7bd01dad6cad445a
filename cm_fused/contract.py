"""The step's contract: what every backend is given, declared once.

:class:`StepArgs` is the one declaration of a fused step's inputs (tensor lists,
hyperparameters, GradScaler inputs). The optimizer builds one per param group and step;
the reference backend reads it directly, the Triton launcher reads it directly, and the
``torch.library`` ops of the fused backends take its fields in order, with the schema
generated from this class (:data:`SCHEMA`), so the C++ kernel's signature
(csrc/step.cpp) is the only other place the argument list is written.

Every optimizer of the package is one :class:`Variant` of the same step:
**reduce** (per-tensor sums over the elements) → **decide** (per-tensor scalars) →
**update** (one elementwise pass whose arithmetic the variant selects). For the
critical-buffer variants the sums are of the squared unscaled gradient and the decide is
the insert rule (priority key, slot, keys decayed, fill and insert counts, step counts: one rule for
all); for the adaptive-memory variants (``*_AM``) the sums are the inner products of the
two-plane model and the decide picks the momentum coefficient beta. docs/SPEC.md is the
math.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import typing
from typing import Optional

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend declares about itself, once (its module's ``CAPABILITIES``); the
    engine reads nothing else of a backend but its functions (cm_fused/registry.py).
    """
    # AdamCM with fp32 params: the norm is folded into the update pass, and each insert
    # is written at the start of the next step (StepArgs.pending).
    defers_inserts: bool = False
    # The largest topC the backend takes (None: any); the optimizer refuses a larger one.
    max_top_c: int | None = None
    # Steps 8-bit moments (state_dtype=torch.int8) and slots without a sum: True for
    # every variant, or the frozenset of the Variants it steps them for.
    eight_bit_moments: bool | frozenset = False


class Variant(enum.IntEnum):
    """Which update the step computes. The values are part of the op's ABI: csrc/step.h
    and cm_fused/triton/kernels.py use the same numbers."""

    ADAM_CM = 0     # Adam + critical momenta: the momentum is inserted, a = m + S/k
    ADAM_CG = 1     # Adam + critical gradients: g is inserted, u = g + S/k
    SGD_CG = 2      # SGD + critical gradients: d = g + wd·p is inserted, u = d + S/k
    RMSPROP_CG = 3  # RMSprop + critical gradients: g is inserted, u = S/k
    ADAM_AM = 4     # AdamW with adaptive memory momentum: one beta per tensor
    SGD_AM = 5      # SGD with adaptive memory momentum: one beta for the whole optimizer

    @property
    def buffered(self) -> bool:
        """Whether the variant keeps a critical buffer (slots, keys, fill and insert
        counts, sums)."""
        return self < Variant.ADAM_AM

    @property
    def sums_per_tensor(self) -> int:
        """How many sums the reduce pass makes per tensor: the gradient's sum of squares
        (buffered variants); ADAM_AM's D, M, X, Y; SGD_AM's D, N."""
        return {Variant.ADAM_AM: 4, Variant.SGD_AM: 2}.get(self, 1)


class Phase(enum.IntEnum):
    """Which part of the step an op call does. A step is split in two where the reduce
    pass's sums must be completed before anything is decided:

    - SGD_AM, whose beta comes from sums over every group: REDUCE for every group (each
      adds its sums into ``memory[0]``), then UPDATE for every group (decide from those
      sums, then update);
    - every other variant, when its tensors are sharded over processes: REDUCE writes
      each tensor's sums into ``reduced`` and changes nothing else; the optimizer sums
      ``reduced`` over the processes; UPDATE decides from ``reduced`` and updates.
    """

    ALL = 0
    REDUCE = 1
    UPDATE = 2


# Field metadata: the op mutates this list (schema alias annotation "(aN!)").
_MUTATED = {"mutated": True}


@dataclasses.dataclass
class StepArgs:
    """The inputs of one step of one param group (kappa > 0 for the buffered variants).

    Per-tensor lists hold one entry per parameter stepped (those with a gradient), all in
    the same order; a role the variant or the configuration does not use is an empty
    list (``momenta`` without momentum, ``extras`` without amsgrad or centered,
    ``second_moments`` for SGD, ``scales`` unless the slots are int8, the buffer's lists
    for ``*_AM``, ``memory`` for the buffered variants). The kernels tell what is in use
    from that. For ADAM_AM, ``momenta`` is d, ``second_moments`` v and ``beta1`` is
    beta1max; for SGD_AM, ``momenta`` is d and ``beta1`` is beta_max.
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
    # int8 slots only (else an empty list): fp32 [topC, n_blocks] per tensor, one scale
    # per block of quantize.QBLOCK elements of a slot (cm_fused/quantize.py).
    scales: list[Tensor] = dataclasses.field(metadata=_MUTATED)
    # 8-bit moments (state_dtype=torch.int8), else an empty list: per tensor, fp32
    # [2, n_blocks] (row 0 the scales of momenta[i], row 1 of second_moments[i]) where
    # that tensor's moments are uint8 codes, an empty tensor where they are not (below
    # min_8bit_size) (cm_fused/quantize.py, docs/SPEC.md "8-bit moments").
    moment_scales: list[Tensor] = dataclasses.field(metadata=_MUTATED)
    keys: list[Tensor] = dataclasses.field(metadata=_MUTATED)     # [topC] fp32
    counts: list[Tensor] = dataclasses.field(metadata=_MUTATED)   # 0-dim int64: filled slots
    inserts: list[Tensor] = dataclasses.field(metadata=_MUTATED)  # 0-dim int64: inserts so far
    # like p: the sum of the slots; an empty list where no sum is kept (8-bit moments
    # and slots, topC <= 8: the update sums the slots)
    sums: list[Tensor] = dataclasses.field(metadata=_MUTATED)
    # ADAM_CM on a backend that defers inserts (Capabilities), else an empty list: 0-dim
    # int64 per tensor, the slot whose insert of the momentum (momenta[i], as stored) a
    # step decided but has not written yet (-1: none); the next step writes it first.
    pending: list[Tensor] = dataclasses.field(metadata=_MUTATED)
    steps: list[Tensor] = dataclasses.field(metadata=_MUTATED)    # 0-dim fp32
    # The adaptive-memory scalars, fp32 [3]: ADAM_AM one per tensor (prod of the past
    # betas, the previous lr, the last beta); SGD_AM one for the whole optimizer
    # (D, N: the sums of this step; the last beta).
    memory: list[Tensor] = dataclasses.field(metadata=_MUTATED)
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
    lam: float                  # *_AM: the proximal weight of the memory plane
    phase: int                  # a Phase: a step split in two (see Phase)
    synced: bool                # one key for the group: the sum of per-tensor norms
    maximize: bool              # step along +g: the gradient is negated after unscaling
    grad_scale: Optional[Tensor]  # divide gradients by it (GradScaler)
    found_inf: Optional[Tensor]   # nonzero: the step changes nothing at all
    rand: Optional[Tensor]        # fp32 [len(params)] coin draws for critical_test
    # int64 [len(params), 2], on the params' device: stochastic rounding of bf16/fp16
    # params, each tensor's (key, element offset) (cm_fused/rounding.py); None: the
    # params are rounded to nearest.
    rounding: Optional[Tensor]
    # fp64 [len(params), NS], Phase.REDUCE/UPDATE of every variant but SGD_AM (else None):
    # the reduce pass's sums per tensor (NS = 1: the gradient's sum of squares; ADAM_AM:
    # NS = 4, the sums D, M, X, Y), written by REDUCE and read by UPDATE. (With found_inf
    # set a backend may leave it unwritten: UPDATE then changes nothing anyway.)
    reduced: Optional[Tensor] = dataclasses.field(default=None, metadata=_MUTATED)

    def op_args(self) -> tuple:
        """The fields in schema order (not dataclasses.astuple: that deep-copies)."""
        return tuple(getattr(self, name) for name in FIELDS)

    @classmethod
    def from_op_args(cls, args: tuple) -> StepArgs:
        return cls(*args)


FIELDS = tuple(f.name for f in dataclasses.fields(StepArgs))


class Tensors(tuple):
    """A per-tensor list of :class:`StepArgs` that the optimizer vouches for: the same
    ``serial`` means the very same tensor objects (a new serial whenever any differs, and
    serials are never reused). A launcher may key its host-side tables on the serial
    instead of reading every tensor's address each step (cm_fused/triton/launch.py).
    What the serial cannot see is a tensor whose storage is swapped in place (``.data =``,
    ``set_``): the launcher compares addresses for that. ``plans`` holds a launcher's
    host-side tables for the group this list belongs to, freed with it."""

    serial: int
    plans: dict
    _serials = itertools.count()

    def __new__(cls, tensors):
        self = super().__new__(cls, tensors)
        self.serial = next(cls._serials)
        self.plans = {}
        return self

    def __reduce__(self):  # a copy or a pickle is a plain tuple: it vouches for nothing
        return tuple, (tuple(self),)



def _schema() -> str:
    hints = typing.get_type_hints(StepArgs)
    types = {list[Tensor]: "Tensor{}[]", Optional[Tensor]: "Tensor{}?", int: "int",
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
    """S is fp32 whenever slots are narrower than fp32 (a bf16 running sum drifts; int8
    slots hold fp32 values, see cm_fused/quantize.py)."""
    return torch.float32 if slot_dtype.itemsize < 4 else slot_dtype
