"""AdamCM: the torch.optim.Optimizer users construct. Groups, validation, state, dispatch.

The arithmetic lives in the backends (reference.py, cpu.py, triton/); this class decides
which one runs, owns the per-parameter state, and keeps the promises of shared/SPEC.md
that are not arithmetic: validation before any change, GradScaler protocol, checkpoints.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam

from . import registry
from .reference import unscaled

log = logging.getLogger("cm_fused")

# State entries that keep their own dtype (torch's load_state_dict would cast them to the
# param's dtype, which breaks bf16 slots, fp32 keys and sums, and the integer count).
_OWN_DTYPE = {"cm_keys": torch.float32, "cm_count": torch.int64, "step": torch.float32}


def sum_dtype(slot_dtype: torch.dtype) -> torch.dtype:
    """S is fp32 whenever slots are narrower than fp32 (SPEC: a bf16 running sum drifts)."""
    return torch.float32 if slot_dtype.itemsize < 4 else slot_dtype


def _bad(name: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"Invalid {name}: {value!r} ({rule})")


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def validate_group(group: dict) -> None:
    """Raise ValueError naming the first invalid hyperparameter of a param group."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise _bad("lr", lr, "a tensor lr must hold one floating-point value")
    elif not (_is_real(lr) and lr >= 0):
        raise _bad("lr", lr, "must be a number >= 0 or a 0-dim tensor")
    if not (_is_real(group["eps"]) and group["eps"] >= 0):
        raise _bad("eps", group["eps"], "must be >= 0")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise _bad("betas", betas, "must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        if not (_is_real(b) and 0 <= b < 1):
            raise _bad(f"beta{i + 1}", b, "must be in [0, 1)")
    if not (_is_real(group["weight_decay"]) and group["weight_decay"] >= 0):
        raise _bad("weight_decay", group["weight_decay"], "must be >= 0")
    if not (_is_real(group["kappa"]) and group["kappa"] >= 0):
        raise _bad("kappa", group["kappa"], "must be >= 0; 0 turns the buffer off")
    if not (_is_real(group["decay"]) and 0 <= group["decay"] <= 1):
        raise _bad("decay", group["decay"], "must be in [0, 1]")
    top_c = group["topC"]
    if group["kappa"] > 0 and not (isinstance(top_c, int) and not isinstance(top_c, bool)
                                   and top_c >= 1):
        raise _bad("topC", top_c, "must be an int >= 1 when kappa > 0")
    if not (_is_real(group["critical_test"]) and 0 <= group["critical_test"] <= 1):
        raise _bad("critical_test", group["critical_test"], "must be a probability in [0, 1]")
    if group["buffer_dtype"] is not None and group["buffer_dtype"] not in registry.FUSED_DTYPES:
        raise _bad("buffer_dtype", group["buffer_dtype"],
                   "must be None, torch.float32, torch.bfloat16 or torch.float16")
    for flag in ("amsgrad", "synced"):
        if not isinstance(group[flag], bool):
            raise _bad(flag, group[flag], "must be a bool")


@dataclass
class _Plan:
    """What one group's step will do, decided before anything is changed."""
    group: dict
    params: list[Tensor]
    device: torch.device | None
    backend: str
    states: list[dict] | None = None


class AdamCM(torch.optim.Optimizer):
    """Adam with Critical Momenta; ``kappa=0`` is exactly ``torch.optim.AdamW``.

    Keyword names follow ``torch.optim.AdamW`` and the authors' ``Adam_CM``. The exact
    update, quirks included, is shared/SPEC.md; the README explains each knob.

    ``backend``: ``"auto"`` (fastest available for the tensors' device, falling back to
    ``"reference"`` with one warning), ``"reference"``, ``"cpu"`` or ``"triton"`` (these
    raise if they cannot run). ``self.backends_in_use`` maps device type to the backend
    that last ran there.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False,
                 topC: int = 5, decay: float = 0.7, kappa: float = 1.0, synced: bool = True,
                 critical_test: float = 0.0, buffer_dtype: torch.dtype | None = None, *,
                 backend: str = "auto"):
        if backend != "auto" and backend not in registry.NAMES:
            raise ValueError(f"Invalid backend: {backend!r} (expected 'auto' or one of "
                             f"{registry.NAMES})")
        self.backend = backend
        self.backends_in_use: dict[str, str] = {}
        self._warned: set[str] = set()
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
                        eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, topC=topC,
                        decay=decay, kappa=kappa, synced=synced, critical_test=critical_test,
                        buffer_dtype=buffer_dtype)
        validate_group(defaults)
        if isinstance(lr, Tensor) and not lr.item() >= 0:  # once, at construction only
            raise _bad("lr", lr, "must be >= 0")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        validate_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Every check runs before the first change, so a step that raises changes nothing;
        # then all state is allocated (an out-of-memory stops before any group steps).
        plans = [self._plan(group) for group in self.param_groups]
        for plan in plans:
            plan.states = [self._state_for(p, plan.group) for p in plan.params]
        grad_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler
        found_inf = getattr(self, "found_inf", None)
        for plan in plans:
            if plan.params:
                self._run(plan, grad_scale, found_inf)
        return loss

    def _plan(self, group: dict) -> _Plan:
        validate_group(group)
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("AdamCM does not support sparse gradients")
            if p.is_complex() or p.grad.is_complex():
                raise RuntimeError("AdamCM does not support complex parameters or gradients")
            if p.grad.shape != p.shape or p.grad.dtype != p.dtype:
                raise RuntimeError(f"gradient {tuple(p.grad.shape)} {p.grad.dtype} does not "
                                   f"match parameter {tuple(p.shape)} {p.dtype}")
        if not params:
            return _Plan(group, [], None, "reference")
        devices = {p.device for p in params} | {p.grad.device for p in params}
        if len(devices) > 1:
            raise RuntimeError(f"all parameters of a group and their gradients must be on one "
                               f"device, got {sorted(map(str, devices))}")
        device = devices.pop()
        for p in params:
            self._check_state(p, group)
        name = self._resolve(device, {p.dtype for p in params})
        return _Plan(group, params, device, name)

    def _check_state(self, p: Tensor, group: dict) -> None:
        st = self.state.get(p)
        if not st:
            return
        if group["kappa"] > 0:
            if "cm_buffer" not in st:
                raise RuntimeError("this parameter has stepped with kappa=0; turning the "
                                   "critical-momenta buffer on afterwards is not supported")
            buf = st["cm_buffer"]
            if buf.shape[0] != group["topC"]:
                raise RuntimeError(f"the group's topC is {group['topC']} but this parameter's "
                                   f"buffer holds {buf.shape[0]} slots; topC cannot change "
                                   f"after the first step")
            want = group["buffer_dtype"] or p.dtype
            if buf.dtype != want:
                raise RuntimeError(f"the group's buffer_dtype resolves to {want} but this "
                                   f"parameter's buffer is {buf.dtype}; it cannot change "
                                   f"after the first step")

    def _resolve(self, device: torch.device, dtypes: set[torch.dtype]) -> str:
        if self.backend != "auto":
            reason = registry.why_not(self.backend, device, dtypes)
            if reason:
                raise RuntimeError(f"backend={self.backend!r} cannot step "
                                   f"{sorted(map(str, dtypes))} tensors on {device}: {reason}")
            return self.backend
        name = registry.preferred(device)
        reason = registry.why_not(name, device, dtypes)
        if reason is None:
            return name
        message = f"cm_fused: backend 'auto' uses 'reference' on {device}: '{name}' {reason}"
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=4)
        reason = registry.why_not("reference", device, dtypes)
        if reason:
            raise RuntimeError(f"no backend can step these parameters: {reason}")
        return "reference"

    def _run(self, plan: _Plan, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        group, params, device = plan.group, plan.params, plan.device
        if self.backends_in_use.get(device.type) != plan.backend:
            log.debug("cm_fused: %s steps parameters on %s", plan.backend, device)
            self.backends_in_use[device.type] = plan.backend
        states = plan.states
        if grad_scale is not None:
            grad_scale = grad_scale.to(device, non_blocking=True)
        if found_inf is not None:
            found_inf = found_inf.to(device, non_blocking=True)
        beta1, beta2 = group["betas"]
        lists = dict(
            params=params, grads=[p.grad for p in params],
            exp_avgs=[s["exp_avg"] for s in states],
            exp_avg_sqs=[s["exp_avg_sq"] for s in states],
            max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
        )
        lr = group["lr"]
        if isinstance(lr, Tensor):  # once here, so no backend copies it on every use
            lr = lr.to(device, non_blocking=True)
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                     weight_decay=group["weight_decay"], amsgrad=group["amsgrad"])
        steps = [s["step"] for s in states]
        if group["kappa"] == 0:
            self._adamw(plan.backend, device, lists, steps, hyper, grad_scale, found_inf)
            return
        rand = None
        if group["critical_test"] > 0:
            rand = torch.rand(len(params), device=device)
        fused = plan.backend != "reference"
        if fused:
            lists, write_back = _contiguous(lists)
        registry.module(plan.backend).adam_cm_step(
            **lists, steps=steps,
            buffers=[s["cm_buffer"] for s in states], keys=[s["cm_keys"] for s in states],
            counts=[s["cm_count"] for s in states], sums=[s["cm_sum"] for s in states],
            **hyper, decay=group["decay"], critical_test=group["critical_test"],
            synced=group["synced"], grad_scale=grad_scale, found_inf=found_inf, rand=rand)
        if fused:
            write_back()

    @staticmethod
    def _adamw(backend: str, device, lists, steps, hyper, grad_scale, found_inf) -> None:
        """kappa == 0: torch's own AdamW code path, fused unless the reference is asked for."""
        if backend != "reference":
            _torch_adam(**lists, state_steps=steps, fused=True, grad_scale=grad_scale,
                        found_inf=found_inf, decoupled_weight_decay=True, maximize=False,
                        **hyper)
            return
        # torch's single-tensor path takes no GradScaler inputs: unscale and guard here.
        restore = _restore_if_found_inf(found_inf, [*lists["params"], *lists["exp_avgs"],
                                                    *lists["exp_avg_sqs"],
                                                    *lists["max_exp_avg_sqs"], *steps])
        if grad_scale is not None:
            lists = {**lists, "grads": [unscaled(g, grad_scale).to(g.dtype)
                                        for g in lists["grads"]]}
        _torch_adam(**lists, state_steps=steps, foreach=False,
                    capturable=device.type != "cpu", decoupled_weight_decay=True,
                    maximize=False, **hyper)
        restore()

    def _state_for(self, p: Tensor, group: dict) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if group["kappa"] > 0:
                slot = group["buffer_dtype"] or p.dtype
                C = group["topC"]
                st["cm_buffer"] = torch.zeros((C, *p.shape), dtype=slot, device=p.device)
                st["cm_keys"] = torch.zeros(C, dtype=torch.float32, device=p.device)
                st["cm_count"] = torch.zeros((), dtype=torch.int64, device=p.device)
                st["cm_sum"] = torch.zeros(p.shape, dtype=sum_dtype(slot), device=p.device)
        if group["amsgrad"] and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return st

    # ---------------------------------------------------------------- checkpoints

    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"checkpoint has {len(saved_groups)} param groups, this "
                             f"optimizer has {len(self.param_groups)}")
        pairs = []
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if saved.get("topC") != group["topC"]:
                raise ValueError(f"checkpoint param group {i} has topC={saved.get('topC')!r} "
                                 f"but this optimizer's group {i} has topC={group['topC']!r}; "
                                 f"critical-momenta buffers cannot be resized")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"checkpoint param group {i} has {len(saved['params'])} "
                                 f"params, this optimizer's has {len(group['params'])}")
            pairs += zip(saved["params"], group["params"])
        saved_state = state_dict["state"]
        for pid, p in pairs:
            buf = saved_state.get(pid, {}).get("cm_buffer")
            if buf is not None and tuple(buf.shape[1:]) != tuple(p.shape):
                raise ValueError(f"checkpoint buffer of shape {tuple(buf.shape)} does not fit "
                                 f"a parameter of shape {tuple(p.shape)}")
        super().load_state_dict(state_dict)
        # Rebuild each state from the checkpoint with our dtype rules, and copy so that the
        # optimizer never shares storage with the dict it was given.
        for pid, p in pairs:
            if pid not in saved_state:
                continue
            self.state[p] = {key: _restore(key, value, p)
                             for key, value in saved_state[pid].items()}


def _restore_if_found_inf(found_inf: Tensor | None, tensors: list[Tensor]):
    """Snapshot ``tensors``; the returned callable puts them back where found_inf is set.

    torch's single-tensor AdamW takes no found_inf, so the reference's kappa=0 step is
    done and then undone on the device, without a host sync (it costs one copy of p, m
    and v while it runs).
    """
    if found_inf is None:
        return lambda: None
    skip = found_inf != 0
    saved = [t.clone() for t in tensors]

    def restore():
        for t, old in zip(tensors, saved):
            t.copy_(torch.where(skip, old, t))

    return restore


def _restore(key: str, value: Any, p: Tensor) -> Any:
    if not isinstance(value, Tensor):
        return value
    if key in _OWN_DTYPE:
        dtype = _OWN_DTYPE[key]
    elif key in ("cm_buffer", "cm_sum"):
        dtype = value.dtype
    else:
        dtype = p.dtype
    return value.to(device=p.device, dtype=dtype, copy=True).contiguous()


def _contiguous(lists: dict) -> tuple[dict, Any]:
    """Fused kernels take dense tensors: step contiguous copies of strided params/grads.

    Returns the lists to step and a callable that copies the stepped params back.
    """
    params, grads = lists["params"], lists["grads"]
    strided = [i for i, p in enumerate(params) if not p.is_contiguous()]
    if not strided and all(g.is_contiguous() for g in grads):
        return lists, lambda: None
    dense = list(params)
    for i in strided:
        dense[i] = params[i].contiguous()
    out = {**lists, "params": dense, "grads": [g.contiguous() for g in grads]}

    def write_back():
        for i in strided:
            params[i].copy_(dense[i])

    return out, write_back
