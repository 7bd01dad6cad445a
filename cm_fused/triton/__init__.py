"""The Triton backend: the fused step (every variant) over all tensors of a group.

Kernels are in ``kernels.py``, tables and launches in ``launch.py`` (block sizes there),
the ``torch.library`` op in ``op.py``. Importing this package never fails for lack of
Triton: the Triton imports happen on first use, and a failure shows up as
:func:`unavailable_reason`.

Without a CUDA device the kernels can still run on CPU tensors under the Triton
interpreter; ``TRITON_INTERPRET=1`` must be set before this backend is first used
(Triton decides interpreter mode when a kernel is defined).
"""
from __future__ import annotations

import os

import torch

from ..contract import Capabilities, StepArgs
from ..registry import FUSED_DTYPES

_import_error: str | None = None

# The decide kernel holds a tile of every tensor's keys in registers: up to 256 slots it
# compiles without spills for sm_80 and sm_90 (tests/test_compile_gate.py; 512 spills
# 360 bytes on sm_90). AdamCM with fp32 params defers its inserts (kernels._update_kernel).
# 8-bit moments: every variant. The critical-buffer ones write the reference's bytes;
# adaptive memory's beta comes from sums the kernels add in another order than the
# reference (an ulp apart, as with full-precision state), so a new moment on a code's
# rounding boundary may land one code step from the reference's.
CAPABILITIES = Capabilities(defers_inserts=True, max_top_c=256, eight_bit_moments=True)


def _op_module():
    """cm_fused.triton.op, imported on first use (it imports Triton and the kernels)."""
    from . import op
    return op


def unavailable_reason() -> str | None:
    global _import_error
    try:
        import triton  # noqa: F401  (absolute: the Triton package, not this one)
    except ImportError as e:
        return f"triton is not importable ({e})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return ("no CUDA device, and TRITON_INTERPRET=1 is not set (the Triton "
                "interpreter, slow, runs the kernels on CPU tensors)")
    if _import_error is None:
        try:
            _op_module()
        except Exception as e:  # reported, not swallowed: auto warns with this reason
            _import_error = f"the Triton kernels failed to load: {type(e).__name__}: {e}"
    return _import_error


def _interpreted() -> bool:
    return _op_module().INTERPRETED


def unsupported_reason(device: torch.device, dtypes: set[torch.dtype]) -> str | None:
    bad = sorted(str(d) for d in dtypes if d not in FUSED_DTYPES)
    if bad:
        return (f"the Triton backend steps float32, bfloat16 and float16 parameters, got "
                f"{', '.join(bad)}")
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if _interpreted():
            return None
        return ("Triton kernels run on CUDA devices; CPU tensors only under the Triton "
                "interpreter (TRITON_INTERPRET=1 set before the backend is first used)")
    return f"Triton kernels run on CUDA devices, not {device.type}"


def step(args: StepArgs) -> None:
    """One step (kappa > 0) of one param group, in place (see cm_fused.contract.StepArgs).

    Params, grads and state must be contiguous (the optimizer sees to it) and on one CUDA
    device (or CPU under the interpreter); a tensor ``lr``, ``grad_scale``, ``found_inf``
    and ``rand`` (fp32) on that device too (the optimizer puts them there; the kernels
    read them in place).
    """
    if not args.params:
        return
    op = _op_module()
    if torch.compiler.is_compiling():
        # Traced (torch.compile): the custom op, so that the graph sees what it mutates.
        torch.ops.cm_fused_triton.step_(*args.op_args())
    else:
        # Eager: the op's kernel, called directly. Through the dispatcher, a custom op
        # with nine mutated tensor lists costs tens of microseconds per tensor of host
        # time (alias checks, version counters), ~0.5 s a step for 10,000 tensors.
        op.launch.step(args)
