"""SAM around any optimizer, and the critical buffers' diagnostics.

SAM against a hand-written SAM step, its closure form against its two-step form, its
checkpoints and refusals; buffer_diagnostics against the same quantities computed from
an independent run of the SPEC's buffer model (tests/spec_model.py).
"""
import copy
import math

import pytest
import torch

import cm_fused
from compare import assert_bit_identical, make_params, set_grads, through_bytes
from family import BACKENDS, FAMILY, make, require
from spec_model import Buffer


def _loss(params, x):
    w, b = params
    return ((x @ w + b).tanh() ** 2).sum()


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)),
            torch.nn.Parameter(torch.randn(3, generator=g))]


# ------------------------------------------------------------ SAM

@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_is_the_base_step_at_the_perturbed_point(adaptive):
    """By hand: SAM's e = rho·g/‖g‖; ASAM's (Kwon et al. 2021) e = rho·|w|²⊙g/‖|w|⊙g‖;
    the norms over every parameter."""
    rho = 0.5 if adaptive else 0.1
    params, x = _model(int(adaptive)), torch.randn(5, 4)
    mine = [p.detach().clone() for p in params]
    opt = cm_fused.SAM(params, torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.05)
    for _ in range(3):
        _loss(params, x).backward()
        opt.first_step(zero_grad=True)
        _loss(params, x).backward()
        opt.second_step(zero_grad=True)
        ws = [w.clone().requires_grad_() for w in mine]
        g = torch.autograd.grad(_loss(ws, x), ws)
        t = [w.abs() if adaptive else torch.ones_like(w) for w in mine]
        norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
        shifted = [(w + rho * ti * ti * gi / (norm + 1e-12)).requires_grad_()
                   for w, ti, gi in zip(mine, t, g)]
        g2 = torch.autograd.grad(_loss(shifted, x), shifted)
        mine = [w - 0.05 * gi for w, gi in zip(mine, g2)]
    for p, w in zip(params, mine):
        torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("base", ["adamw", "adamcm", "adamcg"])
def test_sam_closure_form_is_the_two_step_form(base):
    cls = {"adamw": torch.optim.AdamW, "adamcm": cm_fused.AdamCM, "adamcg": cm_fused.AdamCG}
    a, b, x = _model(), _model(), torch.randn(5, 4)
    opts = [cm_fused.SAM(p, cls[base], rho=0.05, lr=1e-2) for p in (a, b)]
    for _ in range(5):
        _loss(a, x).backward()
        opts[0].first_step(zero_grad=True)
        _loss(a, x).backward()
        opts[0].second_step(zero_grad=True)
        _loss(b, x).backward()
        opts[1].step(lambda: _loss(b, x).backward())
        opts[1].zero_grad()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_checkpoint_midway_is_bit_identical(backend, request):
    require(backend)
    if backend == "triton":
        request.getfixturevalue("small_chunks")
    x = torch.randn(5, 4)

    def run(params, opt, steps):
        for _ in steps:
            _loss(params, x).backward()
            opt.step(lambda: _loss(params, x).backward())
            opt.zero_grad()

    make_sam = lambda ps: cm_fused.SAM(  # noqa: E731
        [{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-3}], cm_fused.AdamCM, rho=0.05,
        lr=1e-2, topC=2, backend=backend)
    a = _model()
    opt_a = make_sam(a)
    run(a, opt_a, range(3))
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = make_sam(b)
    opt_b.load_state_dict(through_bytes(opt_a.state_dict()))
    assert opt_b.param_groups is opt_b.base_optimizer.param_groups
    assert [g["lr"] for g in opt_b.param_groups] == [1e-2, 3e-3]
    run(a, opt_a, range(4))
    run(b, opt_b, range(4))
    assert_bit_identical(opt_a.base_optimizer, a, opt_b.base_optimizer, b)


def test_sam_refusals_change_nothing():
    params = _model()
    for rho in (0, -0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="rho"):
            cm_fused.SAM(params, cm_fused.AdamCM, rho=rho)
    with pytest.raises(TypeError, match="Optimizer class.*an instance of AdamCM"):
        cm_fused.SAM(params, cm_fused.AdamCM(params))
    opt = cm_fused.SAM(params, cm_fused.AdamCM, rho=0.05)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    before = [p.detach().clone() for p in params]
    _loss(params, torch.ones(2, 4)).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    opt.second_step()
    # AdamCM's first step moves nothing (m = 0): the refused first_step added nothing
    for p, q in zip(params, before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sam_restores_the_weights_exactly(dtype):
    """second_step puts back w itself: (w + e) - e would round, and a non-finite
    gradient would leave NaN where the base step (here lr 0) changes nothing."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000, generator=g).to(dtype))
    before = p.detach().clone()
    opt = cm_fused.SAM([p], torch.optim.SGD, rho=0.5, lr=0.0)
    for grad in (torch.randn(1000, generator=g), torch.full((1000,), float("inf"))):
        p.grad = grad.to(dtype)
        opt.first_step()
        p.grad = torch.ones_like(p)
        opt.second_step()
        assert torch.equal(p, before)


@pytest.mark.parametrize("two_step", [True, False])
def test_a_scheduler_on_sam_counts_either_use_as_a_step(two_step):
    """torch's schedulers warn when they step before the optimizer: first_step and
    second_step count as a step too, not only step(closure)."""
    import warnings
    params = make_params([(4,)])
    opt = cm_fused.SAM(params, cm_fused.AdamCM, lr=1e-2, backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for t in range(2):
            set_grads(params, t)
            if two_step:
                opt.first_step(zero_grad=True)
                set_grads(params, t + 10)
                opt.second_step(zero_grad=True)
            else:
                opt.step(lambda: set_grads(params, t + 10))
            sched.step()
    assert opt.param_groups[0]["lr"] == 1e-2 * 0.25


def test_sam_add_param_group_reaches_the_base():
    params = _model()
    opt = cm_fused.SAM(params[:1], cm_fused.AdamCM, rho=0.05, lr=1e-2)
    opt.add_param_group({"params": params[1:], "lr": 1e-3})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups is opt.base_optimizer.param_groups


# ------------------------------------------------------------ buffer diagnostics

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FAMILY))
def test_buffer_diagnostics_match_an_independent_buffer(name, backend, request):
    """Fill, mean key, variance, agreement and the insert rate between calls, against
    the SPEC's buffer model fed the same keys and values."""
    require(backend)
    if backend == "triton":
        request.getfixturevalue("small_chunks")
    shapes = [(7,), (3, 4), (), (5,)]
    params = make_params(shapes, seed=3)
    C = 3
    opt = make(name, backend, topC=C, decay=0.8, synced=False, lr=1e-2)(params)
    inserts_before = 0
    steps_before = 0
    for step in range(12):
        set_grads(params, step, seed=5, missing={3} if step < 4 else ())
        opt.step()
        if step not in (5, 11):
            continue
        got = opt.buffer_diagnostics()[0]
        fills, keys, variances, agreements, inserts, steps = [], [], [], [], 0, 0
        for p in params:
            st = opt.state[p]
            k = int(st["cm_count"])
            B = st["cm_buffer"][:k].double().reshape(k, -1)
            K = st["cm_keys"][:k].double()
            fills.append(k / C)
            keys.append(K.mean().item())
            variances.append(((B - B.mean(0)) ** 2).sum(1).mean().item())
            top = int(K.argmax())
            cos = [torch.nn.functional.cosine_similarity(B[top], B[i], dim=0).item()
                   for i in range(k) if i != top]
            if cos:
                agreements.append(sum(cos) / len(cos))
            inserts += int(st["cm_inserts"])
            steps += int(st["step"])
        rate = (inserts - inserts_before) / (steps - steps_before)
        inserts_before, steps_before = inserts, steps
        want = dict(fill=sum(fills) / 4, mean_key=sum(keys) / 4,
                    variance=sum(variances) / 4, agreement=sum(agreements) / len(agreements),
                    insert_rate=rate)
        for key, value in want.items():
            assert got[key].dim() == 0 and got[key].dtype == torch.float32
            assert math.isclose(got[key].item(), value, rel_tol=1e-4, abs_tol=1e-6), key


def test_insert_counts_follow_the_spec_buffer():
    """cm_inserts against the SPEC model's count of fills and replacements (the
    200-step spec comparison checks it per optimizer; here a run where slots are both
    replaced and kept)."""
    params = make_params([(7,)], seed=3)
    opt = make("adamcg", "reference", topC=2, decay=0.9, synced=False)(params)
    buf = Buffer(2)
    for step in range(40):
        set_grads(params, step, seed=5)
        key = params[0].grad.norm().item()
        opt.step()
        buf.insert(key, params[0].grad)
        buf.decay(0.9)
    assert opt.state[params[0]]["cm_inserts"].item() == buf.inserts
    assert 2 < buf.inserts < 40


def test_insert_rate_after_loading_an_earlier_checkpoint_counts_afresh():
    params = make_params([(3,), (4,)])
    opt = cm_fused.AdamCM(params, topC=2, backend="reference")
    set_grads(params, 0)
    opt.step()
    early = copy.deepcopy(opt.state_dict())  # (state_dict() holds the live tensors)
    for step in range(1, 6):
        set_grads(params, step)
        opt.step()
    opt.buffer_diagnostics()
    opt.load_state_dict(early)  # fewer inserts and steps than the last call saw
    rate = opt.buffer_diagnostics()[0]["insert_rate"].item()
    assert rate == 1.0  # one step each, one insert each (the first fills a slot)


def test_diagnostics_without_a_buffer_are_nan():
    params = make_params([(3,)])
    opt = cm_fused.AdamCM(params, topC=1, backend="reference")
    assert all(math.isnan(v.item()) for v in opt.buffer_diagnostics()[0].values())
    set_grads(params, 0)
    opt.step()
    got = opt.buffer_diagnostics()[0]
    assert got["fill"].item() == 1.0 and math.isnan(got["agreement"].item())
    assert not hasattr(cm_fused.AdamAM(params), "buffer_diagnostics")
