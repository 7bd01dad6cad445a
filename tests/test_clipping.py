"""The fused clip (``max_grad_norm``): every optimizer on every backend steps as
``clip_grad_norm_(params, max_grad_norm)`` followed by its step would, over several groups,
with GradScaler's scale and skipped steps, and at kappa=0 (torch's own step); a
non-finite norm skips the step; bad values are refused before anything changes."""
import pytest
import torch

from compare import (assert_same_state, assert_unchanged, copy_params, make_params,
                     set_grads, snapshot)
from family import BACKENDS, EVERY, FAMILY, interpreted, make, require, use

SHAPES = [(), (1,), (4097,), (3, 5), (0,), (2, 33)]
CPU_SHAPES = SHAPES + [(40000,)]  # several of the C++ kernel's chunks, a ragged tail
STEPS = {"cpu": 16, "triton": 6, "reference": 16}
# The gradients' norm (tests/compare.py's set_grads on SHAPES) swings between about 8
# and 120 (CPU_SHAPES: 4x more): steps are clipped and not.
MAX_NORM = 60.0


pytestmark = pytest.mark.usefixtures("one_thread")


def _groups(params, kw):
    """Two groups (the norm is over both), the second with its own lr."""
    lr = kw.get("lr", 1e-3)
    return [{"params": params[:3]}, {"params": params[3:], "lr": lr * 0.5}]


@pytest.mark.parametrize("name,config,backend", interpreted(
    [(n, c, b) for n in EVERY for c in ("all", "kappa0") for b in BACKENDS
     if c == "all" or n in FAMILY],
    keep=lambda c: c[:2] in (("adamcm", "all"), ("adamam", "all"), ("sgdam", "all"),
                             ("adamcm", "kappa0"))))
def test_the_step_is_clip_grad_norm_then_the_step(name, config, backend, request):
    """Against the same optimizer stepping after ``clip_grad_norm_`` on the unscaled
    gradients: a GradScaler scale (not a power of two) on odd steps, a skipped step, a
    gradient missing; ``grad_norm`` is what clip_grad_norm_ returned."""
    use(backend, request)
    kw = dict(EVERY[name].configs["all"])
    if config == "kappa0":
        kw = {k: v for k, v in kw.items() if k not in ("critical_test", "topC", "decay",
                                                       "synced")}
        kw["kappa"] = 0.0
    params_a = make_params(CPU_SHAPES if backend == "cpu" else SHAPES)
    params_b = copy_params(params_a)
    cls = EVERY[name].cls
    opt_a = cls(_groups(params_a, kw), backend=backend, max_grad_norm=MAX_NORM, **kw)
    opt_b = cls(_groups(params_b, kw), backend=backend, **kw)
    # g / (1 / c) rounds other than clip_grad_norm_'s g · c, and an early Adam step or
    # centered RMSprop's sqrt(E[u²] − E[u]²) grows such an ulp to 2-5e-5: fp16's
    # tolerance (1e-4, 1e-3). (A clip missed or misplaced is off by percents.)
    tolerance = torch.float16
    clipped = 0
    for t in range(STEPS[backend]):
        scale = 3.0 if t % 2 else 1.0
        inf = 1.0 if t == 3 else 0.0
        missing = {1} if t % 4 == 2 else ()
        set_grads(params_a, t, missing=missing)
        set_grads(params_b, t, missing=missing)
        if inf:  # an overflow GradScaler found: the norm is infinite too
            params_a[2].grad[5] = params_b[2].grad[5] = float("inf")
        for p in params_a:
            if p.grad is not None:
                p.grad *= scale
        opt_a.grad_scale, opt_a.found_inf = torch.tensor([scale]), torch.tensor([inf])
        norm = torch.nn.utils.clip_grad_norm_([p for p in params_b if p.grad is not None],
                                              MAX_NORM)
        opt_b.found_inf = torch.tensor(inf)
        for opt in (opt_a, opt_b):
            torch.manual_seed(t)
            opt.step()
        torch.testing.assert_close(opt_a.grad_norm, norm, rtol=1e-5, atol=0)
        clipped += int(norm > MAX_NORM and inf == 0)
        assert_same_state(opt_a, params_a, opt_b, params_b, tolerance, f"step {t}")
    assert 0 < clipped < STEPS[backend] - 1  # both kinds of steps happened


@pytest.mark.parametrize("name,backend", interpreted(
    [(n, b) for n in EVERY for b in BACKENDS], keep=lambda c: c[0] in ("adamcm", "sgdam")))
def test_a_non_finite_norm_skips_the_step(name, backend, request):
    """An inf or NaN gradient makes the norm non-finite: the step changes nothing (as
    GradScaler's skipped step), and grad_norm says why."""
    use(backend, request)
    params = make_params(SHAPES)
    opt = make(name, backend, max_grad_norm=1.0, **EVERY[name].configs["all"])(params)
    for t in range(3):
        set_grads(params, t)
        opt.step()
    for bad in (float("inf"), float("nan")):
        before = snapshot(opt, params)
        set_grads(params, 3)
        params[2].grad[7] = bad
        opt.step()
        assert_unchanged(opt, params, before)
        assert not opt.grad_norm.isfinite()
    kept = params[2].detach().clone()
    set_grads(params, 4)
    opt.step()  # and the next finite step goes on
    assert opt.grad_norm.isfinite() and not torch.equal(params[2], kept)


def test_grad_scaler_unscale_then_clip_is_the_fused_clip():
    """The recipe with torch.amp.GradScaler (unscale_, clip_grad_norm_, step) against the
    fused clip under scaler.step alone, on one model and its copy, with an overflow."""
    require("cpu")
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cls = EVERY["adamcm"].cls
    opt_a = cls(models[0].parameters(), lr=1e-2, max_grad_norm=0.5, backend="cpu")
    opt_b = cls(models[1].parameters(), lr=1e-2, backend="cpu")
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=4)
               for _ in range(2)]
    x = torch.randn(16, 6)
    for t in range(12):
        for i, (model, opt, scaler) in enumerate(zip(models, (opt_a, opt_b), scalers)):
            opt.zero_grad()
            scaler.scale(model(x * (1 + t)).pow(2).mean()).backward()
            if t == 5:
                model[0].weight.grad[0, 0] = float("inf")
            if i == 1:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for a, b in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt_a.state[models[0][0].weight]["step"].item() == 11  # one skipped step


@pytest.mark.parametrize("name", list(EVERY))
def test_every_group_has_the_same_max_grad_norm(name):
    params = make_params([(3,), (4,)])
    opt = EVERY[name].cls([params[0]], max_grad_norm=1.0, backend="reference")
    opt.add_param_group({"params": [params[1]], "max_grad_norm": 2.0})
    set_grads(params, 0)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("name", ["adamcm", "sgdam"])
def test_a_compiled_clipping_step_is_the_eager_one(name):
    """torch.compile(opt.step, fullgraph=True) from the first step: the norm buffer is
    made outside the graph (_init_group) and written inside it; the same trajectory and
    norms as eager steps."""
    require("cpu")
    torch._dynamo.reset()
    shapes = [(5,), (3, 4), ()]
    params_e, params_c = make_params(shapes), make_params(shapes)
    # (no critical_test: a traced torch.rand does not draw what an eager one does)
    kw = {k: v for k, v in EVERY[name].configs["all"].items() if k != "critical_test"}
    kw["max_grad_norm"] = 2.0
    opt_e, opt_c = make(name, "cpu", **kw)(params_e), make(name, "cpu", **kw)(params_c)
    compiled = torch.compile(opt_c.step, fullgraph=True, backend="aot_eager")
    for t in range(4):
        set_grads(params_e, t)
        set_grads(params_c, t)
        opt_e.step()
        compiled()
        assert torch.equal(opt_c.grad_norm, opt_e.grad_norm) and opt_e.grad_norm > 2.0
    assert_same_state(opt_e, params_e, opt_c, params_c, torch.float32, "compiled")
