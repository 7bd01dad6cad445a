"""What an optimizer's checkpoint holds and how it loads back: the checks that tell this
optimizer's checkpoint from another's (before anything changes), and the dtype each
saved state entry is restored in.

A group of a saved checkpoint keeps every key it had, as torch's optimizers do: keys a
training loop adds (a scheduler's ``initial_lr``, a user's ``layer_id``) load back. What
identifies another optimizer's checkpoint is what that optimizer really has and this one
does not: a hyperparameter of another optimizer (of the package or of torch.optim), a
state entry this one does not keep, or no mark of the package at all.
"""
from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import distributed
from . import validation
from .quantize import QuantizedMoment, dequantize_moment, n_blocks, quantize_moment, slot_sum
from .reference import flush_pending
from .state_store import MOMENT_SCALES, eight_bit_moments, keeps_sum

if TYPE_CHECKING:
    from .engine import CriticalOptimizer

# State entries that keep their own dtype (torch's load_state_dict would cast them to the
# param's dtype, which breaks bf16 slots, fp32 keys and sums, and the integer count).
OWN_DTYPE = {"cm_keys": torch.float32, "cm_count": torch.int64, "cm_inserts": torch.int64,
             "step": torch.float32, "memory": torch.float32, "cm_scales": torch.float32,
             "cm_pending": torch.int64, MOMENT_SCALES: torch.float32}
# (cm_scales: int8 slots only; cm_pending: AdamCM only)
BUFFER_STATE = ("cm_buffer", "cm_keys", "cm_count", "cm_inserts", "cm_sum", "cm_scales",
                "cm_pending")
# The hyperparameters of the state's layout: the optimizer's own are kept on loading a
# checkpoint, whose state is converted to them (in_layout).
LAYOUT = ("state_dtype", "min_8bit_size")


def check_scales(scales: Tensor | None, buf: Tensor, p: Tensor) -> None:
    """int8 slots need their scales: fp32 [topC, n_blocks] (cm_fused/quantize.py)."""
    check_table(scales, p, buf.shape[0], "int8 slots", "cm_scales", RuntimeError)


def check_table(scales: Tensor | None, p: Tensor, rows: int, what: str, key: str,
                error: type) -> None:
    """8-bit state's scales: fp32, shaped as distributed.table_shape says (for a DTensor
    parameter a DTensor, whose first dimension is the number of shards: the scales of
    another sharding would be misread)."""
    want = distributed.table_shape(p, rows)
    sharded = distributed.is_sharded_type(p)
    if scales is None or tuple(scales.shape) != want or scales.dtype != torch.float32 \
            or distributed.is_sharded_type(scales) != sharded:
        got = "none" if scales is None else \
            f"{type(scales).__name__} {scales.dtype} {tuple(scales.shape)}"
        kind = "a DTensor" if sharded else "a tensor"
        where = f" (its shards' scales, {want[0]} shards)" if sharded else ""
        raise error(f"{what} need '{key}', {kind} of float32 of shape {want}{where} for a "
                    f"parameter of shape {tuple(p.shape)}; got {got}" + (
                        "; 8-bit state saved with another number of shards cannot be "
                        "loaded" if sharded and scales is not None
                        and tuple(scales.shape) != want else ""))


def loadable_pairs(opt: CriticalOptimizer, state_dict: dict) -> list[tuple[Any, Tensor]]:
    """The (saved id, parameter) pairs of ``state_dict`` for ``opt``, or a ValueError that
    says why ``opt`` cannot load it. Reads only: nothing is changed either way."""
    name = type(opt).__name__
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"checkpoint has {len(saved_groups)} param groups, this "
                         f"optimizer has {len(opt.param_groups)}")
    buffered = opt.variant.buffered
    pairs, saved_of = [], {}
    for i, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        _check_group(i, group, saved, opt, name, buffered)
        pairs += zip(saved["params"], group["params"])
        saved_of.update(dict.fromkeys(saved["params"], {**opt.HYPERPARAMETERS, **saved}))
    saved_state = state_dict["state"]
    known = {*opt.spec.state_keys, *(BUFFER_STATE if buffered else ()), MOMENT_SCALES}
    roles = [opt.spec.roles(g) for g in opt.param_groups]
    moments = {k for r in roles for k in (r.momenta, r.second_moments) if k is not None}
    like_p = moments | {r.extras for r in roles if r.extras is not None} | {"cm_sum"}
    for pid, p in pairs:
        st = saved_state.get(pid, {})
        _check_state(st, p, known, moments, like_p, name)
        _check_not_cast(st, p, saved_of[pid], moments)
    return pairs


def _check_not_cast(st: dict, p: Tensor, saved: dict, moments: set) -> None:
    """8-bit state cast to another dtype would be read as values: refuse moments or slots
    that the checkpoint's own group says were 8-bit but are not. (DCP loads a checkpoint
    into the state the optimizer holds, casting without a check: 8-bit codes loaded into
    full-precision state show only here.)"""
    cast = sorted(k for k in moments if isinstance(st.get(k), Tensor)
                  and st[k].dtype != torch.uint8 and eight_bit_moments(saved, p))
    buf = st.get("cm_buffer")
    if isinstance(buf, Tensor) and buf.dtype != torch.int8 \
            and saved.get("buffer_dtype") == torch.int8:
        cast.append("cm_buffer")
    if cast:
        raise ValueError(
            f"checkpoint state {cast} is {st[cast[0]].dtype}, but its param group "
            f"(state_dtype {saved.get('state_dtype')}, buffer_dtype "
            f"{saved.get('buffer_dtype')}) says it was saved 8-bit: it was cast and would "
            f"be misread (torch.distributed.checkpoint loads into the optimizer's own "
            f"state: load it into an optimizer with the state_dtype and buffer_dtype it "
            f"was saved with)")


def _check_group(i: int, group: dict, saved: dict, opt: CriticalOptimizer, name: str,
                 buffered: bool) -> None:
    if not {"topC", "lam"} & set(saved):  # no cm_fused optimizer's mark
        raise ValueError(f"checkpoint param group {i} has neither 'topC' nor 'lam': it "
                         f"was not saved by a cm_fused optimizer (a torch.optim "
                         f"checkpoint?), so {name} cannot load it")
    foreign = sorted((set(saved) & other_hyperparameters()) - {*opt.HYPERPARAMETERS})
    if foreign:
        raise ValueError(f"checkpoint param group {i} has {foreign}, which are "
                         f"hyperparameters of other optimizers that {name} does not "
                         f"take: it was saved by another optimizer")
    if buffered and saved["topC"] != group["topC"]:
        raise ValueError(f"checkpoint param group {i} has topC={saved['topC']!r} "
                         f"but this optimizer's group {i} has topC={group['topC']!r}; "
                         f"critical buffers cannot be resized")
    if len(saved["params"]) != len(group["params"]):
        raise ValueError(f"checkpoint param group {i} has {len(saved['params'])} "
                         f"params, this optimizer's has {len(group['params'])}")


def _check_state(st: dict, p: Tensor, known: set, moments: set, like_p: set,
                 name: str) -> None:
    foreign = sorted(set(st) - known)
    if foreign:
        raise ValueError(f"checkpoint state has {foreign}, which {name} does not keep: "
                         f"it was saved by another optimizer")
    if distributed.is_sharded_type(p) and any(
            isinstance(v, Tensor) and v.dim() > 0 and not distributed.is_sharded_type(v)
            and k not in OWN_DTYPE for k, v in st.items()):
        raise ValueError("checkpoint state is plain tensors but its parameters are "
                         "DTensors: load sharded optimizer state with "
                         "torch.distributed.checkpoint (set_optimizer_state_dict)")
    codes = [k for k, v in st.items() if isinstance(v, Tensor) and v.dtype == torch.uint8]
    if MOMENT_SCALES in st:  # (8-bit moments cast to another dtype would read as values)
        cast = sorted(k for k in moments if k in st and st[k].dtype != torch.uint8)
        if cast:
            raise ValueError(f"checkpoint state has '{MOMENT_SCALES}' but its moments {cast} "
                             f"are not uint8 codes: they were cast (to "
                             f"{st[cast[0]].dtype}) and would be misread")
    for k, v in st.items():  # the moments and the running sum are shaped like the param
        if k in like_p:
            if isinstance(v, Tensor) and tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"checkpoint state '{k}' of shape {tuple(v.shape)} does not "
                                 f"fit a parameter of shape {tuple(p.shape)}")
    if codes:
        check_table(st.get(MOMENT_SCALES), p, 2, f"checkpoint state has 8-bit moments "
                    f"{codes}: they", MOMENT_SCALES, ValueError)
    buf = st.get("cm_buffer")
    if buf is None:
        return
    if tuple(buf.shape[1:]) != tuple(p.shape):
        raise ValueError(f"checkpoint buffer of shape {tuple(buf.shape)} does not fit "
                         f"a parameter of shape {tuple(p.shape)}")
    if buf.dtype == torch.int8:
        try:
            check_scales(st.get("cm_scales"), buf, p)
        except RuntimeError as e:
            raise ValueError(f"checkpoint state: {e}") from None
    pending = st.get("cm_pending")
    if pending is not None:
        # (a kernel writes the slot it names: out of range would be out of bounds)
        j, k = int(pending), int(st.get("cm_count", 0))
        if not (-1 <= j < buf.shape[0] and (j == -1 or k > 0)):
            raise ValueError(f"checkpoint state has cm_pending={j}, which is not a "
                             f"slot of a buffer holding {k} of {buf.shape[0]}")


def restored(saved: dict, p: Tensor) -> dict:
    """A parameter's state rebuilt from its checkpoint entry with the dtype rules, in
    copies: the optimizer never shares storage with the dict it was given."""
    return {key: _restored(key, value, p) for key, value in saved.items()}


def _restored(key: str, value: Any, p: Tensor) -> Any:
    if not isinstance(value, Tensor):
        return value
    if key in OWN_DTYPE:
        dtype = OWN_DTYPE[key]
    elif key in ("cm_buffer", "cm_sum") or value.dtype == torch.uint8:  # (moment codes)
        dtype = value.dtype
    else:
        dtype = p.dtype
    return value.to(device=p.device, dtype=dtype, copy=True).contiguous()


def converted_states(opt: CriticalOptimizer, state_dict: dict,
                     pairs: list[tuple[Any, Tensor]]) -> dict:
    """Each saved param's state as ``opt`` will hold it: restored with the dtype rules and
    converted to ``opt``'s layout (its state_dtype and min_8bit_size win over the
    checkpoint's), or a ValueError. Changes nothing of ``opt``."""
    saved_state = state_dict["state"]
    group_of = {}
    for i, (group, saved) in enumerate(zip(opt.param_groups, state_dict["param_groups"])):
        # (what the group will be after loading: a missing hyperparameter takes its default)
        merged = {**opt.HYPERPARAMETERS, **saved, **layout(group)}
        if merged.get("state_dtype") is not None:
            try:
                validation.RULES["state_dtype"]("state_dtype", merged["state_dtype"], merged)
            except ValueError as e:
                raise ValueError(f"checkpoint param group {i} cannot be loaded into this "
                                 f"optimizer's 8-bit moments: {e}") from None
        group_of.update((id(p), merged) for p in group["params"])
    states = {}
    for pid, p in pairs:
        if pid in saved_state:
            group = group_of[id(p)]
            if distributed.is_sharded_type(p):
                _same_layout(saved_state[pid], p, group, opt.spec.roles(group))
            states[pid] = in_layout(restored(saved_state[pid], p), p, group,
                                    opt.spec.roles(group))
    return states


def _same_layout(st: dict, p: Tensor, group: dict, roles) -> None:
    """A DTensor parameter's state loads only in the layout it was saved in: in_layout's
    conversions (quantizing, dequantizing, summing int8 slots) work on whole tensors."""
    eight = eight_bit_moments(group, p)
    for key in (roles.momenta, roles.second_moments):
        t = st.get(key) if key is not None else None
        if t is not None and (t.dtype == torch.uint8) != eight:
            raise ValueError(
                f"checkpoint state '{key}' is {t.dtype} but this optimizer keeps "
                f"{'8-bit' if eight else 'full-precision'} moments (state_dtype "
                f"{group.get('state_dtype')}, min_8bit_size {group.get('min_8bit_size')}): "
                f"sharded (DTensor) state is not converted on loading; load it into an "
                f"optimizer with the state_dtype it was saved with")
    buf = st.get("cm_buffer")
    if buf is not None and buf.dtype == torch.int8 and group.get("kappa", 0) > 0 \
            and keeps_sum(group) and "cm_sum" not in st:
        raise ValueError("checkpoint state has int8 slots without their running sum "
                         "('cm_sum'), which this optimizer keeps: sharded (DTensor) state "
                         "is not converted on loading; load it into an optimizer with the "
                         "state_dtype and topC it was saved with")


def layout(group: dict) -> dict:
    """A group's state-layout hyperparameters (those it has)."""
    return {k: group[k] for k in LAYOUT if k in group}


def as_stored(st: dict, key: str, row: int):
    """A moment as a step reads it: the tensor, or its codes with their scales."""
    t = st[key]
    if t.dtype != torch.uint8:
        return t
    return QuantizedMoment(t, st[MOMENT_SCALES][row], bool(row))


def in_layout(st: dict, p: Tensor, group: dict, roles) -> dict:
    """A restored state converted to the group's layout: moments quantized to 8-bit codes
    or dequantized to the param's dtype, and the running sum of int8 slots dropped or
    summed from the slots, as the group keeps them (docs/SPEC.md "Checkpoints")."""
    eight = eight_bit_moments(group, p)
    pending = st.get("cm_pending")
    if pending is not None and int(pending) >= 0:  # (written as it is stored, first)
        flush_pending(st["cm_buffer"], st.get("cm_sum"), st.get("cm_scales"),
                      as_stored(st, roles.momenta, 0), pending)
    for role, second in (("momenta", False), ("second_moments", True)):
        key = getattr(roles, role)
        t = st.get(key) if key is not None else None
        if t is None or (t.dtype == torch.uint8) == eight:
            continue
        if eight:
            scales = st.setdefault(MOMENT_SCALES, torch.zeros(
                2, n_blocks(p.numel()), dtype=torch.float32, device=p.device))
            st[key], scales[int(second)] = quantize_moment(t.float(), second)
        else:
            st[key] = dequantize_moment(t, st[MOMENT_SCALES][int(second)],
                                        second).to(p.dtype)
    if not eight:
        st.pop(MOMENT_SCALES, None)
    buf = st.get("cm_buffer")
    if buf is not None and buf.dtype == torch.int8 and group.get("kappa", 0) > 0:
        if not keeps_sum(group):
            st.pop("cm_sum", None)
        elif "cm_sum" not in st:
            st["cm_sum"] = slot_sum(buf, st["cm_scales"])
    return st


@functools.cache
def other_hyperparameters() -> frozenset[str]:
    """Every keyword of the package's and of torch.optim's optimizers (all of them
    subclasses of torch.optim.Optimizer): a saved group holding one that an optimizer
    does not take was written by another optimizer."""
    names = set()
    for cls in _subclasses(torch.optim.Optimizer):
        try:
            sig = inspect.signature(cls.__init__)
        except (TypeError, ValueError):
            continue
        names |= {n for n, p in sig.parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(names - {"self", "params", "backend", "defaults", "base_optimizer",
                              "hyperparameters"})


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        if sub.__module__.startswith(("torch.optim", "cm_fused")):
            found.append(sub)
        found += _subclasses(sub)
    return found
