"""The axes of the test matrix: the optimizers (with their torch counterparts and SPEC
models), the backends, and each optimizer's configurations.

A new optimizer is one entry in FAMILY (critical buffer) or ADAPTIVE (adaptive memory);
every matrix test then covers it. EVERY is both: the tests that hold for any optimizer
of the package (lock step, dtypes, GradScaler, groups, checkpoints, torch.compile) run
over it, those about the buffer or kappa=0 over FAMILY.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

import cm_fused
from cm_fused import registry
from spec_model import SpecAdamAM, SpecAdamCG, SpecAdamCM, SpecRMSpropCG, SpecSGDAM, SpecSGDCG


@dataclass(frozen=True)
class Member:
    cls: type
    torch_cls: type | None   # what kappa=0 is, exactly (None: no kappa)
    spec: type               # the independent float64 model (spec_model.py)
    configs: dict = field(default_factory=dict)  # name -> keyword arguments
    torch_fused: bool = True  # torch has a fused kernel (else foreach) for kappa=0

    @property
    def buffered(self) -> bool:
        return self.cls.variant.buffered

    @property
    def error_inputs(self) -> list[tuple[str, object]]:
        """(keyword, value) pairs its constructor must refuse with a ValueError naming the
        keyword: the rows of BAD_VALUES for the keywords it takes."""
        return [(arg, value) for arg in self.cls.HYPERPARAMETERS
                for value in BAD_VALUES.get(arg, ())]


# Error inputs, by keyword: values every optimizer taking the keyword must refuse.
# test_validation.py checks that each optimizer's every keyword has a row here.
NAN = float("nan")
BAD_VALUES = {
    "lr": (-1e-3, NAN), "eps": (-1.0,), "weight_decay": (-0.1,),
    "betas": ((1.0, 0.999), (0.9, -0.1), (0.9,)),
    "decay": (1.5, -0.1), "topC": (0, 2.5, True), "kappa": (-1.0,),
    "critical_test": (1.5, -0.1), "buffer_dtype": (torch.float64, torch.uint8, "bf16"),
    "amsgrad": (1,), "synced": ("yes",), "momentum": (-0.5,), "dampening": (NAN, "0.1"),
    "alpha": (1.5, -0.1), "centered": (1,), "nesterov": (True,),  # (without momentum)
    "lam": (-0.1, NAN), "beta_max": (1.0, -0.1),
    "decoupled_weight_decay": (True,),  # (AdamCG: only at kappa=0)
    "maximize": ("yes",), "foreach": ("no",), "fused": (1,), "capturable": ("yes",),
    "differentiable": (True,),
    "max_grad_norm": (0.0, -1.0, float("inf"), NAN, "1.0", True),
    "stochastic_rounding": (1, "yes"), "rounding_seed": (-1, 2 ** 32, 1.5, True),
    "state_dtype": (torch.float16, torch.uint8, "int8"), "min_8bit_size": (-1, 1.5, True),
}


# Configurations every optimizer runs (fill/replace both happen in each: the lock-step
# gradients' scale rises and falls).
COMMON = {
    "defaults": dict(),
    "unsynced": dict(synced=False),
    "topC1": dict(topC=1),
    "critical": dict(critical_test=0.3, topC=3),
    "decay0": dict(decay=0.0),  # every key 0 (or, SGDCG, never decayed): exact ties
    "tensor_lr": dict(lr=torch.tensor(2e-3), weight_decay=0.05),
    "maximize": dict(maximize=True, weight_decay=0.05),
}

FAMILY = {
    "adamcm": Member(cm_fused.AdamCM, torch.optim.AdamW, SpecAdamCM, {
        **COMMON,
        "amsgrad_wd": dict(amsgrad=True, weight_decay=0.1),
        "decay0.99": dict(decay=0.99),
        "beta1_small": dict(betas=(0.3, 0.99)),  # the other branch of torch.lerp's formula
        "eps0": dict(eps=0.0, weight_decay=0.1),  # the first step must not be 0 / (0 + 0)
        "all": dict(synced=False, amsgrad=True, weight_decay=0.05, topC=3, decay=0.99,
                    critical_test=0.1, lr=1e-2, eps=1e-6),
    }),
    "adamcg": Member(cm_fused.AdamCG, torch.optim.Adam, SpecAdamCG, {
        **COMMON,
        "amsgrad_wd": dict(amsgrad=True, weight_decay=0.1),
        "beta1_small": dict(betas=(0.3, 0.99)),
        "all": dict(synced=False, amsgrad=True, weight_decay=0.05, topC=3, decay=0.99,
                    critical_test=0.1, lr=1e-2, eps=1e-6),
    }),
    "sgdcg": Member(cm_fused.SGDCG, torch.optim.SGD, SpecSGDCG, {
        **COMMON,
        "momentum": dict(momentum=0.9),
        "momentum_damp_wd": dict(momentum=0.9, dampening=0.1, weight_decay=0.05),
        "all": dict(synced=False, momentum=0.5, dampening=0.2, weight_decay=0.01, topC=3,
                    decay=0.99, critical_test=0.1, lr=1e-2),
    }),
    "rmspropcg": Member(cm_fused.RMSpropCG, torch.optim.RMSprop, SpecRMSpropCG, {
        **{k: v for k, v in COMMON.items() if k != "critical"},  # it has no critical_test
        "momentum": dict(momentum=0.9),
        "centered_wd": dict(centered=True, weight_decay=0.05),
        "all": dict(synced=False, momentum=0.5, centered=True, weight_decay=0.01, topC=3,
                    decay=0.99, lr=1e-3, alpha=0.9, eps=1e-6),
    }, torch_fused=False),
}

# Adaptive memory: no buffer, no kappa.
ADAPTIVE = {
    "adamam": Member(cm_fused.AdamAM, None, SpecAdamAM, {
        "defaults": dict(),
        "lam0_wd": dict(lam=0.0, weight_decay=0.05),
        "tensor_lr": dict(lr=torch.tensor(2e-3), weight_decay=0.05),
        "maximize": dict(maximize=True, weight_decay=0.05),
        "lr0": dict(lr=0.0, weight_decay=0.1),
        "all": dict(lam=0.3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, lr=1e-2),
    }),
    "sgdam": Member(cm_fused.SGDAM, None, SpecSGDAM, {
        "defaults": dict(lr=1e-2),
        "wd": dict(lr=1e-2, weight_decay=0.05),
        "tensor_lr": dict(lr=torch.tensor(2e-3), weight_decay=0.05),
        "maximize": dict(lr=1e-2, maximize=True, lam=0.0),
        "lr0": dict(lr=0.0, weight_decay=0.1),
        "all": dict(lr=1e-2, lam=0.3, beta_max=0.8, weight_decay=0.05),
    }),
}
EVERY = {**FAMILY, **ADAPTIVE}

FUSED_BACKENDS = ("cpu", "triton")
BACKENDS = ("reference", *FUSED_BACKENDS)


def cases(configs=None, members=None):
    """(optimizer, config) pairs as pytest params, for ``@pytest.mark.parametrize``
    (``members``: FAMILY by default)."""
    return [pytest.param(name, cfg, id=f"{name}-{cfg}")
            for name, m in (FAMILY if members is None else members).items()
            for cfg in m.configs if configs is None or cfg in configs]


def ref(params, **kw):
    """AdamCM on the reference backend: the tests' plain optimizer."""
    return cm_fused.AdamCM(params, backend="reference", **kw)


def require(backend: str) -> None:
    """Skip (with the reason) or fail when a backend cannot step CPU tensors here.

    The C++ backend fails instead of skipping when CM_FUSED_REQUIRE_EXT=1 (CI), and the
    Triton backend fails whenever Triton imports (its kernels must then load)."""
    reason = registry.why_not(backend, torch.device("cpu"), {torch.float32})
    if reason is None:
        return
    if backend == "cpu" and os.environ.get("CM_FUSED_REQUIRE_EXT") == "1":
        pytest.fail(f"CM_FUSED_REQUIRE_EXT=1 but the cpu backend cannot run: {reason}",
                    pytrace=False)
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            pytest.skip(f"triton is not importable: {reason}")
        pytest.fail(f"triton is importable but the triton backend cannot run: {reason}",
                    pytrace=False)
    pytest.skip(f"backend {backend!r} cannot run on CPU tensors here: {reason}")


def interpreted(cases, keep) -> list:
    """pytest params of ``cases`` (tuples whose last item is the backend), the Triton
    backend's (interpreted on CPU: ~10 s a run) marked slow unless ``keep(case)``: the
    default run keeps a representative few, -m slow runs them all."""
    return [pytest.param(*c, id="-".join(map(str, c)),
                         marks=pytest.mark.slow if c[-1] == "triton" and not keep(c) else ())
            for c in cases]


def use(backend: str, request) -> None:
    """``require(backend)``; the Triton one gets interpreter-sized chunks (conftest's
    small_chunks)."""
    require(backend)
    if backend == "triton":
        request.getfixturevalue("small_chunks")


def make(name: str, backend: str, **kw):
    """A factory ``params -> optimizer`` for FAMILY[name] on ``backend``."""
    cls = EVERY[name].cls
    return lambda params: cls(params, backend=backend, **kw)
