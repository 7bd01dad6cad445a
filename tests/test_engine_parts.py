"""The engine's contract with the optimizers: an optimizer is its keywords and its public
OptimizerSpec, and overrides nothing of the engine; the spec's parts agree with each
other; a new optimizer declared that way steps as the engine says."""
from __future__ import annotations

import inspect

import pytest
import torch

import cm_fused
from cm_fused.engine import CriticalOptimizer
from cm_fused.spec import OptimizerSpec, Roles, Scalars, SharedDecision
from compare import assert_bit_identical, make_params, set_grads
from family import EVERY, FUSED_BACKENDS, require

SHAPES = [(5,), (3, 4), ()]


@pytest.mark.parametrize("name", sorted(EVERY))
def test_an_optimizer_overrides_no_engine_method(name):
    cls = EVERY[name].cls
    engine = {n: inspect.unwrap(v) for n, v in vars(CriticalOptimizer).items() if callable(v)}
    for klass in cls.__mro__[:cls.__mro__.index(CriticalOptimizer)]:
        # (torch wraps the engine's step in its profiling hook on the class it builds)
        overridden = {n for n, v in vars(klass).items()
                      if n in engine and callable(v) and inspect.unwrap(v) is not engine[n]}
        assert overridden <= {"__init__"}, (klass.__name__, sorted(overridden))
    assert isinstance(cls.spec, OptimizerSpec) and cls.variant is cls.spec.variant
    # (the keywords are the hyperparameters: every one is an __init__ keyword)
    keywords = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "backend"}
    assert set(cls.HYPERPARAMETERS) == keywords


@pytest.mark.parametrize("name", sorted(EVERY))
def test_the_spec_declares_every_state_key_its_roles_use(name):
    """A checkpoint is refused by the state keys the spec declares: every key a role
    can name, in every configuration, must be declared (else resuming would refuse the
    optimizer's own checkpoint)."""
    member = EVERY[name]
    spec = member.cls.spec
    for config, kw in {"default": {}, **member.configs}.items():
        for extra in ({}, {"amsgrad": True}, {"momentum": 0.9}, {"centered": True}):
            if not set(extra) <= set(member.cls.HYPERPARAMETERS):
                continue
            opt = member.cls(make_params([(2,)]), backend="reference", **{**kw, **extra})
            group = opt.param_groups[0]
            roles = spec.roles(group)
            assert isinstance(roles, Roles)
            assert {k for k in roles if k} <= set(spec.state_keys), (config, extra, roles)
            assert isinstance(spec.scalars(group), Scalars)
    if spec.new_state is not None:
        fresh = spec.new_state(torch.zeros(2), opt.param_groups[0])
        assert set(fresh) <= set(spec.state_keys)


class _AdamCM10(CriticalOptimizer):
    """A new optimizer declared the documented way: keywords and a spec, nothing else
    (AdamCM's spec, with a larger default buffer)."""

    spec = cm_fused.AdamCM.spec

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *, weight_decay=0.0,
                 amsgrad=False, topC=10, decay=0.7, kappa=1.0, synced=True, critical_test=0.0,
                 buffer_dtype=None, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, backend="auto"):
        super().__init__(params, locals(), backend)


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_an_optimizer_declared_by_its_spec_alone_steps_as_the_engine_says(backend, request):
    require(backend)
    a, b = make_params(SHAPES), make_params(SHAPES)
    mine = _AdamCM10(a, lr=1e-2, weight_decay=0.1, backend=backend)
    theirs = cm_fused.AdamCM(b, lr=1e-2, weight_decay=0.1, topC=10, backend=backend)
    for t in range(6):
        for ps, opt in ((a, mine), (b, theirs)):
            set_grads(ps, t)
            opt.step()
    mine.flush_buffers()
    theirs.flush_buffers()
    assert_bit_identical(mine, a, theirs, b)
    with pytest.raises(ValueError, match="topC"):
        _AdamCM10(make_params([(2,)]), topC=0)


def test_the_backend_asked_for_is_read_at_every_step():
    """``opt.backend`` changed between steps takes effect at the next one (the settled
    group's cached choice is keyed on it)."""
    require("cpu")
    params = make_params(SHAPES)
    opt = cm_fused.AdamCM(params, backend="reference")
    for t in range(2):  # (settled)
        set_grads(params, t)
        opt.step()
    assert opt.backends_in_use == {"cpu": "reference"}
    opt.backend = "cpu"
    set_grads(params, 2)
    opt.step()
    assert opt.backends_in_use == {"cpu": "cpu"}


def test_a_shared_decision_is_made_per_optimizer_and_rebuilt_when_unpickled():
    import pickle
    params = make_params(SHAPES)
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 0.05}]
    opt, other = cm_fused.SGDAM(groups, backend="reference"), cm_fused.SGDAM(
        make_params(SHAPES), backend="reference")
    assert isinstance(opt.shared_decision, SharedDecision)
    assert opt.shared_decision is not other.shared_decision
    assert cm_fused.AdamCM(make_params(SHAPES)).shared_decision is None
    for t in range(2):
        set_grads(params, t)
        opt.step()
    beta = opt.last_beta()["mean"]
    assert 0 <= beta.item() <= 0.9
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.shared_decision is not opt.shared_decision and clone.last_beta() == {}
    set_grads(clone.param_groups[0]["params"] + clone.param_groups[1]["params"], 2)
    clone.step()
    assert clone.last_beta()["mean"].isfinite()
