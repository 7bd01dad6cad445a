"""Which backend steps a group: the choice for a device, dtypes and torch's ``fused``
flag, made once and cached, with the one warning when ``'auto'`` falls back."""
from __future__ import annotations

import logging
import warnings
from types import ModuleType

import torch

from . import registry
from .contract import Variant

log = logging.getLogger("cm_fused")


class BackendChoice:
    """Owns the choices made so far (and the warnings given) for one optimizer."""

    def __init__(self) -> None:
        self._cache: dict = {}
        self._warned: set[str] = set()

    def resolve(self, asked: str, device: torch.device, dtypes: frozenset,
                fused: bool | None = None,
                eight_bit: Variant | None = None) -> tuple[str, ModuleType]:
        """The backend (name, module) for tensors of this device and dtypes, when
        ``asked`` was asked for (torch's ``fused``: True requires a fused backend, False
        means the reference; ``eight_bit``: the variant, where the group has 8-bit moments)."""
        key = (asked, device, dtypes, fused, eight_bit)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._choose(asked, device, set(dtypes), fused,
                                                  eight_bit)
            log.debug("cm_fused: %s steps %s parameters on %s", hit[0],
                      sorted(map(str, dtypes)), device)
        return hit

    def _choose(self, name: str, device: torch.device, dtypes: set,
                fused: bool | None, eight_bit: Variant | None) -> tuple[str, ModuleType]:
        must_run = name != "auto"
        if name == "auto":
            if fused is False:  # torch's "not the fused kernel"
                return "reference", registry.module("reference")
            name, must_run = registry.preferred(device), bool(fused)
        reason = registry.why_not(name, device, dtypes)
        steps_8bit = registry.module(name).CAPABILITIES.eight_bit_moments
        if reason is None and eight_bit is not None and not (
                steps_8bit is True or (steps_8bit and eight_bit in steps_8bit)):
            reason = (f"does not step {eight_bit.name}'s 8-bit moments "
                      "(state_dtype=torch.int8) yet")
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


def check_name(backend: str) -> None:
    if backend != "auto" and backend not in registry.NAMES:
        raise ValueError(f"Invalid backend: {backend!r} (expected 'auto' or one of "
                         f"{registry.NAMES})")


def check_flags(asked: str, group: dict) -> None:
    """torch's fused=True/False against an explicitly named backend."""
    fused = group.get("fused")
    if fused and asked == "reference":
        raise ValueError("fused=True asks for a fused backend, but backend='reference' "
                         "was named")
    if fused is False and asked not in ("auto", "reference"):
        raise ValueError(f"fused=False asks for the reference backend, but "
                         f"backend={asked!r} was named")


def check_top_c(group: dict, backend: str, module: ModuleType) -> None:
    """A backend may bound topC (Triton's decide kernel holds a tensor's keys in
    registers); refuse a larger one with the way out."""
    limit = module.CAPABILITIES.max_top_c
    if limit is not None and group.get("kappa", 0) > 0 and group["topC"] > limit:
        raise ValueError(f"Invalid topC: {group['topC']} (the {backend!r} backend takes topC "
                         f"<= {limit}; use backend='reference' for a larger buffer)")
