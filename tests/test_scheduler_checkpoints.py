"""Checkpoints as training loops write them: every torch LR scheduler kind that writes
into the param groups, user keys in groups, a save midway and a bit-identical resume, on
every optimizer and backend; and what still identifies another optimizer's checkpoint."""
from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler

from compare import assert_bit_identical, copy_params, make_params, set_grads, through_bytes
from family import BACKENDS, EVERY, require

SHAPES = [(7,), (3, 5), (64,)]


def _momentum_cycles(opt) -> bool:
    """OneCycleLR cycles a momentum or beta1 that the optimizer has (SGDAM has neither)."""
    return "momentum" in opt.defaults or "betas" in opt.defaults


# name -> scheduler(s) on an optimizer; each writes its own keys into the groups
SCHEDULERS = {
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)),
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=5),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(
        opt, max_lr=2e-2, total_steps=12, cycle_momentum=_momentum_cycles(opt)),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5,
                                                                    patience=0),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2),
              lr_scheduler.ExponentialLR(opt, gamma=0.9)], milestones=[2]),
    "CyclicLR": lambda opt: lr_scheduler.CyclicLR(
        opt, base_lr=1e-3, max_lr=1e-2, step_size_up=2,
        cycle_momentum="momentum" in opt.defaults and opt.defaults["momentum"] > 0),
}


def _step_scheduler(sched, step: int) -> None:
    if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
        sched.step(float(step % 2))  # (a metric that stalls: the lr drops)
    else:
        sched.step()


def _groups(params):
    """Two groups carrying the keys users keep in them (layer-wise lr decay, names)."""
    return [{"params": params[:2], "name": "body", "layer_id": 0, "lr_scale": 0.5},
            {"params": params[2:], "name": "head", "layer_id": 1, "lr_scale": 1.0}]


def _kwargs(name: str) -> dict:
    kw = {"lr": 1e-2}
    if name == "sgdcg":
        kw["momentum"] = 0.9  # (CyclicLR and OneCycleLR cycle it)
    if name == "rmspropcg":
        kw["momentum"] = 0.5
    return kw


def _drive(params, opt, sched, steps) -> None:
    for step in steps:
        set_grads(params, step, 5)
        torch.manual_seed(step)  # (critical_test coins)
        opt.step()
        _step_scheduler(sched, step)


def _resume_case(name: str, backend: str, scheduler: str, before=3, after=4):
    """An uninterrupted run and a run saved after ``before`` steps (optimizer and
    scheduler, through bytes with weights_only=True) and resumed in fresh objects."""
    cls, kw = EVERY[name].cls, _kwargs(name)
    make = SCHEDULERS[scheduler]

    params_a = make_params(SHAPES, seed=3)
    opt_a = cls(_groups(params_a), backend=backend, **kw)
    sched_a = make(opt_a)
    _drive(params_a, opt_a, sched_a, range(before + after))

    params_b = make_params(SHAPES, seed=3)
    opt_b = cls(_groups(params_b), backend=backend, **kw)
    sched_b = make(opt_b)
    _drive(params_b, opt_b, sched_b, range(before))
    ckpt = through_bytes({"params": [p.detach() for p in params_b],
                          "optimizer": opt_b.state_dict(), "scheduler": sched_b.state_dict()})

    params_c = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt_c = cls(_groups(params_c), backend=backend, **kw)
    sched_c = make(opt_c)  # (as a training script does: build, then load)
    opt_c.load_state_dict(ckpt["optimizer"])
    sched_c.load_state_dict(ckpt["scheduler"])
    _drive(params_c, opt_c, sched_c, range(before, before + after))
    return (opt_a, params_a, sched_a), (opt_c, params_c, sched_c)


def _assert_same_groups(opt_a, opt_c) -> None:
    for ga, gc in zip(opt_a.param_groups, opt_c.param_groups):
        assert ga.keys() == gc.keys(), f"group keys {sorted(ga)} != {sorted(gc)}"
        for key in ga:
            if key != "params":
                assert ga[key] == gc[key], f"group {key}: {ga[key]!r} != {gc[key]!r}"


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("backend", ("reference", "cpu"))
@pytest.mark.parametrize("name", list(EVERY))
def test_a_run_with_a_scheduler_resumes_bit_identically(name, backend, scheduler):
    """The checkpoint holds what the scheduler and the user wrote into the groups; it
    loads back, and the resumed run is bit-identical to the uninterrupted one, lr by lr."""
    require(backend)
    (opt_a, params_a, sched_a), (opt_c, params_c, sched_c) = \
        _resume_case(name, backend, scheduler)
    assert_bit_identical(opt_a, params_a, opt_c, params_c)
    _assert_same_groups(opt_a, opt_c)
    assert opt_c.param_groups[1]["name"] == "head"  # (the user's keys came back)
    assert sched_a.state_dict() == sched_c.state_dict()
    assert opt_c.backends_in_use == {"cpu": backend}


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "SequentialLR"])
@pytest.mark.parametrize("name", list(EVERY))
def test_a_run_with_a_scheduler_resumes_bit_identically_on_triton(name, scheduler,
                                                                 small_chunks):
    require("triton")
    (opt_a, params_a, _), (opt_c, params_c, _) = _resume_case(name, "triton", scheduler,
                                                               before=2, after=2)
    assert_bit_identical(opt_a, params_a, opt_c, params_c)
    _assert_same_groups(opt_a, opt_c)


@pytest.mark.parametrize("name", list(EVERY))
def test_a_scheduler_checkpoint_saved_before_any_step_loads(name):
    """Saved right after the scheduler was attached (state empty, groups carrying
    initial_lr and the user's keys)."""
    cls, kw = EVERY[name].cls, _kwargs(name)
    params = make_params(SHAPES)
    opt = cls(_groups(params), backend="reference", **kw)
    lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=5,
                            cycle_momentum=_momentum_cycles(opt))
    saved = through_bytes(opt.state_dict())
    fresh = cls(_groups(copy_params(params)), backend="reference", **kw)
    fresh.load_state_dict(saved)
    for group, saved_group in zip(fresh.param_groups, saved["param_groups"]):
        assert "initial_lr" in group and group["initial_lr"] == saved_group["initial_lr"]
        assert group["layer_id"] == saved_group["layer_id"]


# ------------------------------------------------------------ what is still refused

def _other(name: str) -> str:
    """An optimizer of the package whose hyperparameters differ from ``name``'s."""
    return {"adamcm": "sgdcg", "adamcg": "rmspropcg", "sgdcg": "adamcm",
            "rmspropcg": "sgdcg", "adamam": "sgdcg", "sgdam": "adamcm"}[name]


@pytest.mark.parametrize("name", list(EVERY))
def test_another_optimizers_checkpoint_with_scheduler_keys_is_still_refused(name):
    """Extra keys are no longer what identifies another optimizer; its hyperparameters
    are, with or without a scheduler's keys beside them, and nothing changes."""
    other = EVERY[_other(name)].cls
    params = make_params(SHAPES)
    src = other(_groups(params), backend="reference", **_kwargs(_other(name)))
    lr_scheduler.StepLR(src, step_size=2)
    set_grads(params, 0)
    src.step()
    cls = EVERY[name].cls
    dst = cls(_groups(copy_params(params)), backend="reference", **_kwargs(name))
    groups_before = [dict(g) for g in dst.param_groups]
    with pytest.raises(ValueError, match="hyperparameters of other optimizers.*saved by "
                                         "another optimizer"):
        dst.load_state_dict(src.state_dict())
    assert not dst.state and [dict(g) for g in dst.param_groups] == groups_before


@pytest.mark.parametrize("torch_cls", [torch.optim.AdamW, torch.optim.SGD])
def test_a_torch_checkpoint_with_scheduler_keys_is_refused(torch_cls):
    params = make_params(SHAPES)
    src = torch_cls(params, lr=1e-2)
    lr_scheduler.LambdaLR(src, lambda t: 1.0)
    set_grads(params, 0)
    src.step()
    dst = EVERY["adamcm"].cls(copy_params(params), backend="reference")
    with pytest.raises(ValueError, match="not saved by a cm_fused optimizer"):
        dst.load_state_dict(src.state_dict())
    assert not dst.state


def test_a_user_key_named_like_no_optimizers_keyword_is_kept_even_if_odd():
    """Any key that is no optimizer's keyword loads back unchanged, whatever its value."""
    params = make_params(SHAPES)
    opt = EVERY["adamcm"].cls([{"params": params, "tags": ["a", 1], "initial_lr": 3e-3}],
                              backend="reference")
    fresh = EVERY["adamcm"].cls(copy_params(params), backend="reference")
    fresh.load_state_dict(through_bytes(opt.state_dict()))
    assert fresh.param_groups[0]["tags"] == ["a", 1]
    assert fresh.param_groups[0]["initial_lr"] == 3e-3
