"""Which backend computes a step: discovery, availability report and the ``auto`` choice.

A backend is a module with three functions:

- ``unavailable_reason() -> str | None``: why it cannot run in this process at all
  (no extension, no Triton, ...), or None;
- ``unsupported_reason(device, dtypes) -> str | None``: why it cannot take tensors of that
  device and those dtypes, or None;
- ``step(args)``: the kappa > 0 step of one param group, from a
  :class:`cm_fused.contract.StepArgs` (the one declaration of its inputs);

optionally ``square_sums(tensors) -> Tensor``, each tensor's sum of squares (fp64) for the
fused clip's norm, where the backend sums faster than torch's ``_foreach_norm``;

and declares what it can do in ``CAPABILITIES``, a :class:`cm_fused.contract.Capabilities`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

NAMES = ("reference", "cpu", "triton")
_MODULES = {"reference": "cm_fused.reference", "cpu": "cm_fused.cpu", "triton": "cm_fused.triton"}
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# buffer_dtype: a floating-point slot dtype, or int8 (blockwise quantized: quantize.py).
SLOT_DTYPES = (*FUSED_DTYPES, torch.int8)


def module(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {NAMES}")
    return importlib.import_module(_MODULES[name])


def unavailable_reason(name: str) -> str | None:
    try:
        mod = module(name)
    except ImportError as e:  # a backend that cannot even import is simply not available
        return f"cannot import {_MODULES[name]}: {e}"
    return mod.unavailable_reason()


def why_not(name: str, device: torch.device, dtypes: set[torch.dtype]) -> str | None:
    """Why backend ``name`` cannot step tensors of this device and dtypes, or None."""
    reason = unavailable_reason(name)
    if reason is None:
        reason = module(name).unsupported_reason(device, dtypes)
    return reason


def preferred(device: torch.device) -> str:
    """The fastest backend for a device, when it can run: what ``auto`` tries first."""
    return {"cpu": "cpu", "cuda": "triton"}.get(device.type, "reference")


def backends() -> dict[str, str]:
    """Each backend's status in this process: 'available' or the reason it is not."""
    return {name: unavailable_reason(name) or "available" for name in NAMES}
