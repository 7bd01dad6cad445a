"""The optimizer classes around the backends: validation, errors that change nothing,
GradScaler, checkpoints (old ones included), groups, dtypes, odd shapes, keywords,
backend choice. Run on the reference (the fused backends are in test_matrix.py)."""
import pickle
import warnings

import pytest
import torch

import cm_fused
from cm_fused import AdamCM, registry
from compare import (ODD_SHAPES, assert_bit_identical, assert_same_state, assert_unchanged,
                     checkpoint_roundtrip, copy_params, make_params, run_lockstep, set_grads, snapshot,
                     through_bytes)
from family import ADAPTIVE, EVERY, FAMILY, require


def ref(params, **kw):
    return AdamCM(params, backend="reference", **kw)


@pytest.fixture(params=list(FAMILY))
def family_ref(request):
    """Every optimizer of the family, on the reference backend."""
    cls = FAMILY[request.param].cls
    return lambda params, **kw: cls(params, backend="reference", **kw)


# ------------------------------------------------------------ validation

BAD_ARGS = [
    ("lr", -1e-3), ("lr", float("nan")), ("eps", -1.0), ("betas", (1.0, 0.999)),
    ("betas", (0.9, -0.1)), ("betas", (0.9,)), ("weight_decay", -0.1), ("decay", 1.5),
    ("decay", -0.1), ("topC", 0), ("topC", 2.5), ("topC", True), ("kappa", -1.0),
    ("critical_test", 1.5), ("critical_test", -0.1), ("buffer_dtype", torch.float64),
    ("buffer_dtype", torch.uint8), ("buffer_dtype", "bf16"), ("amsgrad", 1), ("synced", "yes"),
    ("momentum", -0.5), ("dampening", float("nan")), ("dampening", "0.1"),
    ("lam", -0.1), ("lam", float("nan")), ("beta_max", 1.0), ("beta_max", -0.1),
]
BAD_CASES = [pytest.param(opt, arg, value, id=f"{opt}-{arg}={value!r}")
             for opt, member in EVERY.items() for arg, value in BAD_ARGS
             if arg in member.cls.HYPERPARAMETERS]


def _match(arg):
    return "beta" if arg == "betas" else arg


@pytest.mark.parametrize("opt_name,arg,value", BAD_CASES)
def test_invalid_hyperparameter_is_refused_at_construction(opt_name, arg, value):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=_match(arg)):
        EVERY[opt_name].cls([p], backend="reference", **{arg: value})


@pytest.mark.parametrize("opt_name,arg,value", BAD_CASES)
def test_invalid_hyperparameter_in_a_group_changes_nothing(opt_name, arg, value):
    cls = EVERY[opt_name].cls
    params = make_params([(3,), (2, 2)])
    opt = cls(params[:1], lr=1e-2, backend="reference")
    with pytest.raises(ValueError):
        opt.add_param_group({"params": params[1:], arg: value})
    assert len(opt.param_groups) == 1
    # ... and set later (as a scheduler or a user would): the step raises, nothing moves
    opt.add_param_group({"params": params[1:]})
    for t in range(3):
        set_grads(params, t)
        opt.step()
    snap = snapshot(opt, params)
    opt.param_groups[1][arg] = value
    set_grads(params, 3)
    with pytest.raises(ValueError, match=_match(arg)):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_topc_is_only_checked_when_the_buffer_is_on():
    p = torch.nn.Parameter(torch.ones(2))
    ref([p], kappa=0.0, topC=0)  # AdamW mode: topC unused


def test_tensor_lr_must_be_nonnegative_and_single_valued():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="lr"):
        ref([p], lr=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="lr"):
        ref([p], lr=torch.tensor([1e-3, 1e-3]))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        AdamCM([torch.nn.Parameter(torch.ones(1))], backend="cuda-magic")


@pytest.mark.parametrize("bad", ["sparse", "complex"])
def test_sparse_or_complex_gradient_raises_and_changes_nothing(bad):
    params = make_params([(4,), (3,)])
    opt = ref(params)
    for t in range(2):
        set_grads(params, t)
        opt.step()
    snap = snapshot(opt, params)
    set_grads(params, 2)
    if bad == "sparse":
        params[1].grad = torch.ones(3).to_sparse()
        match = "sparse"
    else:
        params[1].data = params[1].data.to(torch.complex64)
        params[1].grad = torch.ones(3, dtype=torch.complex64)
        match = "complex"
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert torch.equal(params[0].detach(), snap[0][0])
    for k, v in snap[1][0].items():
        assert torch.equal(opt.state[params[0]][k], v), k


def _grad_of_another_shape(p):
    p.grad.data = p.grad.data.reshape(3, 2)


def _grad_of_another_dtype(p):
    p.grad.data = p.grad.data.double()


def _param_resized(p):
    p.data = torch.zeros(3, 3)
    p.grad = torch.ones(3, 3)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("tamper,match", [
    (_grad_of_another_shape, "does not match parameter"),
    (_grad_of_another_dtype, "does not match parameter"),
    (_param_resized, "shape and device cannot change"),
], ids=["grad-shape", "grad-dtype", "param-resized"])
def test_a_tensor_changed_in_place_is_refused_on_a_settled_step(tamper, match, backend):
    """``.data`` gets past what torch's setters refuse: a gradient of another shape or
    dtype, or a parameter resized after its first step (its state no longer fits: a
    fused kernel would step out of bounds). A settled step (nothing else changed since
    the checks passed) still sees it, says so, and changes nothing."""
    require(backend)
    params = make_params([(4,), (2, 3)])
    opt = AdamCM(params, backend=backend)
    for t in range(3):
        set_grads(params, t)
        opt.step()
    set_grads(params, 3)
    tamper(params[1])
    snap = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_an_error_in_a_later_group_leaves_earlier_groups_untouched():
    params = make_params([(4,), (3,)])
    opt = ref([{"params": params[:1]}, {"params": params[1:]}])
    set_grads(params, 0)
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert not opt.state


def test_changing_topc_after_the_first_step_raises_and_changes_nothing():
    params = make_params([(4,)])
    opt = ref(params, topC=3)
    set_grads(params, 0)
    opt.step()
    snap = snapshot(opt, params)
    opt.param_groups[0]["topC"] = 4
    set_grads(params, 1)
    with pytest.raises(RuntimeError, match="topC"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_turning_the_buffer_on_after_adamw_steps_is_refused():
    params = make_params([(4,)])
    opt = ref(params, kappa=0.0)
    set_grads(params, 0)
    opt.step()
    opt.param_groups[0]["kappa"] = 1.0
    with pytest.raises(RuntimeError, match="kappa"):
        opt.step()


def test_explicit_backend_that_cannot_run_raises_with_reason():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = AdamCM([p], backend="cpu")
    p.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="backend='cpu' cannot step"):
        opt.step()
    assert not opt.state


def test_auto_falls_back_to_reference_with_one_warning():
    """The group's backend is chosen when the group is added: the warning comes then,
    once, and not again at any step."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))  # no fused backend takes fp64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = AdamCM([p])
        assert sum("uses 'reference'" in str(w.message) for w in caught) == 1
        for t in range(3):
            p.grad = torch.full((3,), 0.5 + t, dtype=torch.float64)
            opt.step()
    fallbacks = [w for w in caught if "uses 'reference'" in str(w.message)]
    assert len(fallbacks) == 1
    assert opt.backends_in_use == {"cpu": "reference"}


def test_backends_report_names_each_backend_with_a_status():
    report = cm_fused.backends()
    assert set(report) == {"reference", "cpu", "triton"}
    assert report["reference"] == "available"
    assert all(isinstance(v, str) and v for v in report.values())


# ------------------------------------------------------------ GradScaler protocol

def test_grad_scale_divides_gradients_and_keys(family_ref):
    params_a = make_params([(5,), (2, 3)])
    params_b = copy_params(params_a)
    opt_a, opt_b = family_ref(params_a, synced=False), family_ref(params_b, synced=False)
    for t in range(5):
        set_grads(params_a, t)
        set_grads(params_b, t)
        for p in params_b:
            p.grad *= 8.0
        opt_a.step()
        opt_b.grad_scale, opt_b.found_inf = torch.tensor(8.0), torch.tensor(0.0)
        opt_b.step()
    assert_bit_identical(opt_a, params_a, opt_b, params_b)  # power-of-two scale: exact


@pytest.mark.parametrize("kappa", [1.0, 0.0])
def test_amp_grad_scaler_matches_unscaled_run_and_skips_inf_steps(family_ref, kappa):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    twin.load_state_dict(model.state_dict())
    opt = family_ref(model.parameters(), lr=1e-2, kappa=kappa)
    opt_twin = family_ref(twin.parameters(), lr=1e-2, kappa=kappa)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(16, 6)
    for t in range(6):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        scaler.scale(loss).backward()
        if t == 3:  # an overflowing step: skipped, scale halves
            next(model.parameters()).grad[0, 0] = float("inf")
            before = snapshot(opt, list(model.parameters()))
        scaler.step(opt)
        scaler.update()
        if t == 3:
            assert_unchanged(opt, list(model.parameters()), before)
            assert scaler.get_scale() == 2.0 ** 9
            continue
        opt_twin.zero_grad()
        twin(x).pow(2).mean().backward()
        opt_twin.step()
    assert_bit_identical(opt, list(model.parameters()), opt_twin, list(twin.parameters()))


# ------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kappa_zero_save_load_midway_continues_bit_identically(family_ref, dtype):
    """torch's own state layout at kappa=0 (SGD's momentum buffer created on the first
    step) survives a checkpoint too; kappa > 0 is in the matrix for every backend."""
    kw = dict(lr=1e-2, kappa=0.0, weight_decay=0.1)
    if "momentum" in family_ref([torch.nn.Parameter(torch.ones(1))]).defaults:
        kw["momentum"] = 0.9
    a, b = checkpoint_roundtrip(lambda ps: family_ref(ps, **kw), ODD_SHAPES, 7, 8,
                                dtype=dtype, missing=lambda t: {1} if t == 8 else ())
    assert_bit_identical(*a, *b)


def test_state_dict_is_plain_and_names_documented_keys():
    params = make_params([(3,)])
    opt = ref(params, amsgrad=True, buffer_dtype=torch.float16, topC=4)
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    through_bytes(sd)
    s = sd["state"][0]
    assert set(s) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "cm_buffer",
                      "cm_keys", "cm_count", "cm_inserts", "cm_sum", "cm_pending"}
    assert s["cm_pending"].dtype == torch.int64 and s["cm_pending"].item() == -1
    assert s["cm_buffer"].shape == (4, 3) and s["cm_buffer"].dtype == torch.float16
    assert s["cm_sum"].dtype == torch.float32 and s["cm_keys"].dtype == torch.float32
    assert s["cm_count"].dtype == torch.int64 and s["step"].dtype == torch.float32
    assert s["cm_inserts"].dtype == torch.int64 and s["cm_inserts"].item() == 1


def test_loading_a_checkpoint_with_another_topc_is_refused_and_changes_nothing():
    params = make_params([(3,), (2,)])
    saver = ref(params, topC=3)
    set_grads(params, 0)
    saver.step()
    other = copy_params(params)
    opt = ref(other, topC=5)
    set_grads(other, 0)
    opt.step()
    snap = snapshot(opt, other)
    with pytest.raises(ValueError, match="topC=3.*topC=5"):
        opt.load_state_dict(saver.state_dict())
    assert_unchanged(opt, other, snap)
    assert opt.param_groups[0]["topC"] == 5


@pytest.mark.parametrize("tamper,match", [
    (lambda st: st.pop("cm_scales"), "need 'cm_scales'.*got none"),
    (lambda st: st.update(cm_scales=st["cm_scales"][:, :1]), r"of shape \(3, 2\)"),
    (lambda st: st.update(cm_scales=st["cm_scales"].half()), "torch.float16")])
def test_int8_slots_without_their_scales_are_refused_on_load_and_at_a_step(tamper, match):
    params = make_params([(300,)])
    saver = ref(params, topC=3, buffer_dtype=torch.int8)
    set_grads(params, 0)
    saver.step()
    sd = through_bytes(saver.state_dict())  # (a copy: state_dict shares the state's dicts)
    tamper(sd["state"][0])
    other = copy_params(params)
    opt = ref(other, topC=3, buffer_dtype=torch.int8)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert not opt.state
    tamper(saver.state[params[0]])  # state edited by hand: the next step refuses it
    set_grads(params, 1)
    snap = snapshot(saver, params)
    with pytest.raises(RuntimeError, match=match):
        saver.step()
    assert_unchanged(saver, params, snap)


@pytest.mark.parametrize("pending,count", [(3, 2), (-2, 2), (0, 0)])
def test_a_checkpoint_whose_pending_insert_is_no_slot_is_refused(pending, count):
    """cm_pending names the slot a fused step writes first: out of range it would be out
    of bounds, so a checkpoint with one is refused (state_dict() never writes one)."""
    params = make_params([(5,)])
    saver = ref(params, topC=3)
    set_grads(params, 0)
    saver.step()
    sd = through_bytes(saver.state_dict())
    assert sd["state"][0]["cm_pending"].item() == -1
    sd["state"][0]["cm_pending"] = torch.tensor(pending)
    sd["state"][0]["cm_count"] = torch.tensor(count)
    opt = ref(copy_params(params), topC=3)
    with pytest.raises(ValueError, match=f"cm_pending={pending}, which is not a slot"):
        opt.load_state_dict(sd)
    assert not opt.state


def test_int8_slots_with_sharded_parameters_are_refused_and_change_nothing(monkeypatch):
    from cm_fused import distributed
    params = make_params([(3,), (5,)])
    opt = ref(params, buffer_dtype=torch.int8)
    set_grads(params, 0)
    monkeypatch.setattr(distributed, "is_sharded_type", lambda t: True)
    with pytest.raises(NotImplementedError, match="int8 with sharded"):
        opt._new_state(params[0], opt.param_groups[0])


def test_int8_buffer_diagnostics_read_the_values_the_slots_hold(family_ref):
    from cm_fused.quantize import dequantize
    params = make_params([(300,), (3, 5)])
    twin = copy_params(params)
    opt = family_ref(params, topC=3, buffer_dtype=torch.int8)
    for t in range(5):
        set_grads(params, t)
        opt.step()
    # the same buffers, dequantized into an fp32 optimizer's state
    shadow = family_ref(twin, topC=3)
    set_grads(twin, 0)
    shadow.step()
    for p, q in zip(params, twin):
        st = opt.state[p]
        shadow.state[q].update({k: v.clone() for k, v in st.items()
                                if k not in ("cm_buffer", "cm_scales")})
        shadow.state[q]["cm_buffer"] = dequantize(st["cm_buffer"], st["cm_scales"])
    got, want = opt.buffer_diagnostics()[0], shadow.buffer_diagnostics()[0]
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], msg=k)
    assert got["variance"] > 0


def test_loaded_state_does_not_share_storage_with_the_checkpoint():
    params = make_params([(3,)])
    opt = ref(params)
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    twin = copy_params(params)
    opt2 = ref(twin)
    opt2.load_state_dict(sd)
    set_grads(twin, 1)
    opt2.step()
    assert opt.state[params[0]]["step"].item() == 1  # the source is untouched


# ------------------------------------------------------------ shapes, dtypes, groups, API

def test_non_contiguous_params_match_contiguous_run():
    base = torch.randn(5, 4)
    p_strided = torch.nn.Parameter(base.clone().t())  # non-contiguous leaf
    p_dense = torch.nn.Parameter(base.clone().t().contiguous())
    assert not p_strided.is_contiguous()
    opt_s, opt_d = ref([p_strided], weight_decay=0.1), ref([p_dense], weight_decay=0.1)
    for t in range(6):
        g = torch.randn(4, 5, generator=torch.Generator().manual_seed(t))
        p_strided.grad, p_dense.grad = g.t().contiguous().t(), g.clone()
        opt_s.step()
        opt_d.step()
    assert torch.equal(p_strided.detach(), p_dense.detach())


def test_several_groups_with_their_own_topc_and_hyperparameters():
    params = make_params([(4,), (3, 3), (), (7,)])
    opt = ref([{"params": params[:2], "topC": 2, "decay": 0.99},
               {"params": params[2:], "topC": 4, "synced": False, "lr": 1e-2}])
    for t in range(6):
        set_grads(params, t)
        opt.step()
    assert opt.state[params[0]]["cm_buffer"].shape == (2, 4)
    assert opt.state[params[2]]["cm_buffer"].shape == (4,)
    assert opt.state[params[3]]["cm_count"].item() == 4
    assert opt.state[params[1]]["cm_count"].item() == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_params_track_an_fp32_run(family_ref, dtype):
    """bf16/fp16 storage, fp32 math: within a few storage ulps of the fp32 trajectory."""
    shapes = [(64,), (8, 8), ()]
    narrow = make_params(shapes, dtype=dtype)
    wide = [torch.nn.Parameter(p.detach().float()) for p in narrow]
    lr = 0.2 if "dampening" in family_ref(narrow[:1]).defaults else 1e-2  # SGD: as far
    opt_n, opt_w = family_ref(narrow, lr=lr), family_ref(wide, lr=lr)
    for t in range(20):
        set_grads(wide, t)
        for pn, pw in zip(narrow, wide):
            pn.grad = pw.grad.to(dtype)
        opt_n.step()
        opt_w.step()
    start = make_params(shapes, dtype=dtype)
    for pn, pw, p0 in zip(narrow, wide, start):
        moved = (pw.detach() - p0.detach().float()).abs().max().item()
        assert moved > 0.05  # ~20 steps of lr 1e-2: the comparison below is not vacuous
        # Each step rounds p to the storage dtype once: up to half an ulp at |p| <= 4,
        # 20 times (bf16 ulp 2^-6 there, fp16 2^-9).
        ulp = 2.0 ** -6 if dtype == torch.bfloat16 else 2.0 ** -9
        torch.testing.assert_close(pn.detach().float(), pw.detach(), atol=10 * ulp, rtol=0)
    assert opt_n.state[narrow[0]]["cm_sum"].dtype == torch.float32  # S stays fp32
    assert opt_n.state[narrow[0]]["cm_buffer"].dtype == dtype


def test_odd_shapes_and_empty_tensors_step(family_ref):
    params = make_params(ODD_SHAPES)
    opt = family_ref(params, weight_decay=0.01, topC=5)
    for t in range(4):
        set_grads(params, t)
        opt.step()
    assert all(opt.state[p]["cm_count"].item() == 4 for p in params)


def test_tensor_lr_matches_float_lr():
    run_lockstep(lambda ps: ref(ps, lr=1e-2), lambda ps: ref(ps, lr=torch.tensor(1e-2)),
                 [(6,), (2, 2)], steps=20)


def test_scheduler_lr_zero_freezes_params_and_closure_returns_loss():
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = ref([p], lr=0.1, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    before = p.detach().clone()
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = (p * torch.tensor([2.0, 3.0])).sum()
            loss.backward()
            return loss
        loss = opt.step(closure)
        sched.step()
        assert loss.item() == pytest.approx((before * torch.tensor([2.0, 3.0])).sum().item())
    assert torch.equal(p.detach(), before)
    assert opt.state[p]["cm_count"].item() == 3  # the buffer still fills at lr 0


# The authors' classes' keyword arguments, all of them (cmoptimizer.optim, as released).
AUTHORS_KEYWORDS = {
    "Adam_CM": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, decay=0.7, kappa=1.0, topC=5,
                    weight_decay=0.0, amsgrad=False, critical_test=0.0, synced=True,
                    buffer_dtype=None),
    "Adam_C": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, decay=0.7, kappa=1.0, topC=10,
                   weight_decay=0.0, amsgrad=False, critical_test=0.0, synced=True,
                   buffer_dtype=None),
    "SGD_C": dict(lr=1e-3, kappa=1.0, dampening=0.0, weight_decay=0.0, momentum=0.0,
                  decay=0.7, topC=10, critical_test=0.0, synced=True, buffer_dtype=None),
    "RMSprop_C": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                      centered=False, decay=0.7, kappa=1.0, topC=10, synced=True,
                      buffer_dtype=None),
}
TORCH_KEYWORDS = {
    "AdamCM": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False),
    "AdamCG": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False),
    "SGDCG": dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0),
    "RMSpropCG": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                      centered=False),
}


@pytest.mark.parametrize("name", list(AUTHORS_KEYWORDS))
def test_the_authors_classes_names_and_keywords(name):
    p = torch.nn.Parameter(torch.ones(2))
    opt = getattr(cm_fused, name)([p], **AUTHORS_KEYWORDS[name])
    assert isinstance(opt, torch.optim.Optimizer)
    assert {k: opt.defaults[k] for k in AUTHORS_KEYWORDS[name]} == AUTHORS_KEYWORDS[name]
    assert opt.defaults["topC"] == AUTHORS_KEYWORDS[name]["topC"]  # the authors' default


@pytest.mark.parametrize("name", list(TORCH_KEYWORDS))
def test_torch_counterparts_keywords(name):
    p = torch.nn.Parameter(torch.ones(2))
    opt = getattr(cm_fused, name)([p], **TORCH_KEYWORDS[name])
    assert {k: opt.defaults[k] for k in TORCH_KEYWORDS[name]} == TORCH_KEYWORDS[name]


@pytest.mark.parametrize("name", list(FAMILY))
def test_every_keyword_of_the_torch_counterpart_is_accepted_with_its_default(name):
    """Drop-in: each keyword torch's class takes (from its signature, in this torch), with
    torch's default value, is accepted; the optimizer then steps."""
    import inspect
    member = FAMILY[name]
    torch_kw = {k: p.default for k, p in inspect.signature(member.torch_cls.__init__)
                .parameters.items() if k not in ("self", "params")}
    params = make_params([(3,)])
    opt = member.cls(params, **torch_kw)
    set_grads(params, 0)
    opt.step()


def test_differentiable_is_refused_clearly():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        AdamCM([p], differentiable=True)


@pytest.mark.parametrize("kw,match", [
    (dict(fused=True, backend="reference"), "backend='reference'"),
    (dict(fused=False, backend="cpu"), "backend='cpu'"),
    (dict(fused=True, foreach=True), "cannot be asked for together"),
    (dict(nesterov=True, momentum=0.9), "Nesterov momentum is not defined"),
    (dict(nesterov=True, kappa=0.0), "requires a momentum and zero dampening"),
], ids=str)
def test_contradictory_implementation_keywords_are_refused(kw, match):
    cls = cm_fused.SGDCG if "nesterov" in kw else AdamCM
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.ones(2))], **kw)


def test_fused_true_requires_a_fused_backend_at_construction():
    """As torch's fused=True: refused when no fused backend can step the parameters (here
    fp64), at construction, with the reason; auto does not fall back."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="fused=True, but no fused backend"):
        AdamCM([p], fused=True)
    opt = AdamCM([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(RuntimeError, match="fused=True"):
        opt.add_param_group({"params": [p], "fused": True})
    assert len(opt.param_groups) == 1  # the group was not added


def test_fused_false_means_the_reference_and_fused_true_a_fused_backend():
    require("cpu")
    for fused, want in ((False, "reference"), (True, "cpu"), (None, "cpu")):
        params = make_params([(3,)])
        opt = AdamCM(params, fused=fused)
        set_grads(params, 0)
        opt.step()
        assert opt.backends_in_use == {"cpu": want}, fused


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", list(FAMILY))
def test_kappa_zero_foreach_flag_runs_torchs_matching_code(name, foreach):
    """kappa=0 with torch's foreach=True/False: bit-identical to the torch optimizer with
    the same flag (on the default backend)."""
    member = FAMILY[name]
    kw = dict(lr=1e-2, weight_decay=0.1, **(dict(momentum=0.9) if name == "sgdcg" else {}))
    params_a = make_params([(5,), (2, 3)])
    params_b = copy_params(params_a)
    opt_a = member.cls(params_a, kappa=0.0, foreach=foreach, **kw)
    opt_b = member.torch_cls(params_b, foreach=foreach, **kw)
    for t in range(5):
        set_grads(params_a, t)
        set_grads(params_b, t)
        opt_a.step()
        opt_b.step()
    assert_bit_identical(opt_a, params_a, opt_b, params_b)


def test_capturable_is_accepted_and_changes_nothing_on_cpu():
    """Every backend's step already keeps its scalars on the device (no host read), so
    capturable=True steps exactly as capturable=False; at kappa=0 on CPU torch's
    non-capturable code runs (torch's own capturable code refuses CPU tensors)."""
    for kappa in (1.0, 0.0):
        run_lockstep(lambda ps: ref(ps, capturable=True, kappa=kappa),
                     lambda ps: ref(ps, kappa=kappa), [(4,), (2, 2)], steps=4)


def test_positional_arguments_stop_where_torch_and_the_authors_disagree():
    """torch.optim.Adam(params, lr, betas, eps, weight_decay) vs the authors' Adam_CM(params,
    lr, betas, eps, decay): a fifth positional argument would mean two different things,
    so it is refused rather than bound to either. SGD: torch's second is momentum, the
    authors' kappa."""
    p = torch.nn.Parameter(torch.ones(2))
    AdamCM([p], 1e-3, (0.9, 0.99), 1e-8)
    cm_fused.AdamCG([p], 1e-3, (0.9, 0.99), 1e-8)
    cm_fused.SGDCG([p], 1e-3)
    cm_fused.RMSpropCG([p], 1e-2, 0.99, 1e-8, 0.0, 0.0, False)
    with pytest.raises(TypeError):
        cm_fused.RMSpropCG([p], 1e-2, 0.99, 1e-8, 0.0, 0.0, False, 0.7)
    with pytest.raises(TypeError):
        AdamCM([p], 1e-3, (0.9, 0.99), 1e-8, 0.01)
    with pytest.raises(TypeError):
        cm_fused.SGDCG([p], 1e-3, 0.9)


def test_keywords_of_another_optimizer_are_refused():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="betas"):
        cm_fused.SGDCG([p], betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="momentum"):
        cm_fused.AdamCG([p], momentum=0.9)


# ------------------------------------------------------------ old checkpoints, pickles

def test_a_checkpoint_without_a_newer_hyperparameter_loads_with_its_default(family_ref):
    """A checkpoint written before a hyperparameter existed (emulated: deleted from the
    saved groups) loads; the group gets the hyperparameter's default, and steps on."""
    params = make_params([(4,), (2, 3)])
    opt = family_ref(params, lr=1e-2)
    for t in range(3):
        set_grads(params, t)
        opt.step()
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["buffer_dtype"], group["synced"]
    fresh = family_ref(copy_params(params), lr=1e-2, buffer_dtype=torch.float32, synced=False)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["buffer_dtype"] is None
    assert fresh.param_groups[0]["synced"] is True
    set_grads(fresh.param_groups[0]["params"], 3)
    fresh.step()


def test_an_optimizer_pickled_by_an_older_version_unpickles_with_new_attributes():
    params = make_params([(4,)])
    opt = ref(params)
    set_grads(params, 0)
    opt.step()
    for attr in ("_backend_cache", "backends_in_use"):  # as if an older version pickled it
        del opt.__dict__[attr]
    for group in opt.param_groups:
        del group["critical_test"]
    clone = pickle.loads(pickle.dumps(opt))
    assert clone._backend_cache == {} and clone.param_groups[0]["critical_test"] == 0.0
    set_grads(clone.param_groups[0]["params"], 1)
    clone.step()


def test_a_checkpoint_of_another_cm_fused_optimizer_is_named_as_such():
    params = make_params([(3,)])
    adam = AdamCM(params, backend="reference", topC=10)
    set_grads(params, 0)
    adam.step()
    sgd = cm_fused.SGDCG(copy_params(params), backend="reference", momentum=0.9)
    with pytest.raises(ValueError, match="saved by another optimizer"):
        sgd.load_state_dict(adam.state_dict())
    assert not sgd.state


def test_a_torch_checkpoint_is_named_as_such_and_changes_nothing():
    params = make_params([(3,)])
    adamw = torch.optim.AdamW(params)
    set_grads(params, 0)
    adamw.step()
    opt = ref(copy_params(params))
    with pytest.raises(ValueError, match="not saved by a cm_fused optimizer"):
        opt.load_state_dict(adamw.state_dict())
    assert not opt.state


# ------------------------------------------------------------ state, backend choice

def test_a_state_allocation_that_fails_changes_nothing():
    """topC so large that the buffer cannot be allocated: the step raises, and no state is
    left behind, not even for the group that allocated first."""
    params = make_params([(4,), (1000,)])
    opt = ref([{"params": params[:1]}, {"params": params[1:], "topC": 10 ** 12}])
    set_grads(params, 0)
    with pytest.raises(RuntimeError):
        opt.step()
    assert not any(opt.state.get(p) for p in params)
    assert all(torch.equal(p, q) for p, q in zip(params, make_params([(4,), (1000,)])))


def test_the_backend_is_chosen_once_per_device_and_dtypes(monkeypatch):
    calls = []
    real = registry.why_not
    monkeypatch.setattr(registry, "why_not", lambda *a: calls.append(a) or real(*a))
    params = make_params([(4,), (3,)])
    opt = AdamCM(params)  # auto
    for t in range(4):
        set_grads(params, t)
        opt.step()
    assert len(calls) == 1
    half = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt.add_param_group({"params": [half]})
    for t in range(3):
        set_grads(params, t)
        half.grad = torch.ones(3, dtype=torch.bfloat16)
        opt.step()
    assert len(calls) == 2  # one more for the new (device, dtypes)


def test_sgdcg_momentum_cannot_be_turned_on_after_the_first_step():
    params = make_params([(4,)])
    opt = cm_fused.SGDCG(params, backend="reference")
    set_grads(params, 0)
    opt.step()
    snap = snapshot(opt, params)
    opt.param_groups[0]["momentum"] = 0.9
    set_grads(params, 1)
    with pytest.raises(RuntimeError, match="momentum"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_kappa_zero_sgd_skipped_first_momentum_step_leaves_no_buffer():
    """torch's SGD creates its momentum buffer on a tensor's first step; when GradScaler
    skips that step (found_inf), the buffer must not exist afterwards, so the next step
    is again a first momentum step: as torch.optim.SGD with GradScaler, which never
    calls step() for an overflowing step."""
    params = make_params([(5,)])
    twin = copy_params(params)
    opt = cm_fused.SGDCG(params, lr=0.1, momentum=0.9, kappa=0.0, backend="reference")
    sgd = torch.optim.SGD(twin, lr=0.1, momentum=0.9, foreach=False)
    set_grads(params, 0)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    assert "momentum_buffer" not in opt.state[params[0]]
    del opt.grad_scale, opt.found_inf
    for t in range(1, 4):
        set_grads(params, t)
        set_grads(twin, t)
        opt.step()
        sgd.step()
    assert_bit_identical(opt, params, sgd, twin)


@pytest.mark.parametrize("kappa", [1.0, 0.0])
def test_meta_parameters_step_like_torchs(family_ref, kappa):
    """Parameters on the meta device (deferred initialisation): the step runs and the
    state has the shapes a real step would give; at kappa=0 as torch's own optimizer
    on meta (its step counter on the CPU)."""
    p = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    kw = {"momentum": 0.9} if "dampening" in family_ref([p]).defaults else {}
    opt = family_ref([p], kappa=kappa, **kw)
    for _ in range(2):
        p.grad = torch.empty(4, 3, device="meta")
        opt.step()
    st = opt.state[p]
    if kappa > 0:
        assert st["cm_buffer"].shape == (opt.defaults["topC"], 4, 3)
        assert all(v.device.type == "meta" for v in st.values())
    else:
        twin = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
        torch_opt = FAMILY[next(n for n, m in FAMILY.items()
                                if m.cls is type(opt))].torch_cls([twin], **kw)
        for _ in range(2):
            twin.grad = torch.empty(4, 3, device="meta")
            torch_opt.step()
        ts = torch_opt.state[twin]
        assert st.keys() == ts.keys()
        assert all(st[k].device == ts[k].device and st[k].shape == ts[k].shape for k in st)


# ------------------------------------------------------------ found in review

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_kappa_zero_sgd_skipped_or_partial_first_momentum_steps(backend):
    """torch's fused SGD creates momentum buffers uninitialised and all at once: the
    cpu backend must not keep garbage after a skipped first step, nor fail when one
    tensor takes its first step beside another's later one. Both step like
    torch.optim.SGD(foreach=False), which GradScaler skips on overflow: bit for bit on
    the reference; the cpu backend's later steps are torch's fused kernel, which rounds
    differently."""
    require(backend)
    params = make_params([(5,), (3,)])
    twin = copy_params(params)
    opt = cm_fused.SGDCG(params, lr=0.1, momentum=0.9, kappa=0.0, backend=backend)
    sgd = torch.optim.SGD(twin, lr=0.1, momentum=0.9, foreach=False)
    set_grads(params, 0)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()  # skipped: no buffer may remain
    assert not opt.state.get(params[0])
    del opt.grad_scale, opt.found_inf
    for t, missing in ((1, {1}), (2, ()), (3, ())):  # params[1] starts a step later
        set_grads(params, t, missing=missing)
        set_grads(twin, t, missing=missing)
        opt.step()
        sgd.step()
    if backend == "reference":
        assert_bit_identical(opt, params, sgd, twin)
    else:
        assert_same_state(opt, params, sgd, twin, torch.float32)


@pytest.mark.parametrize("lr", [torch.tensor(0.01, dtype=torch.bfloat16),
                                torch.tensor([0.01])], ids=["bf16", "shape1"])
def test_any_single_value_tensor_lr_steps_every_backend_alike(lr):
    """A bf16 or [1]-shaped tensor lr is read as a 0-dim fp32 lr by every backend (the
    reference would otherwise round 1 - lr*wd to bf16, or broadcast a 0-dim param)."""
    require("cpu")
    kw = dict(lr=lr, weight_decay=0.5)
    (oa, pa), (ob, pb) = run_lockstep(lambda ps: AdamCM(ps, backend="cpu", **kw),
                                      lambda ps: ref(ps, **kw), [(), (5,)], steps=4)
    fp32 = lr.float().reshape(())
    run_lockstep(lambda ps: ref(ps, **kw), lambda ps: ref(ps, lr=fp32, weight_decay=0.5),
                 [(), (5,)], steps=4)


def test_a_parameter_whose_dtype_changed_is_refused_before_any_group_steps():
    params = make_params([(4,), (3,)])
    opt = ref([{"params": params[:1]}, {"params": params[1:]}], buffer_dtype=torch.float32)
    set_grads(params, 0)
    opt.step()
    snap = snapshot(opt, params[:1])
    params[1].data = params[1].data.to(torch.bfloat16)
    set_grads(params, 1)
    with pytest.raises(RuntimeError, match="dtype cannot change"):
        opt.step()
    assert_unchanged(opt, params[:1], snap)


def test_a_negative_tensor_lr_is_refused_in_add_param_group_too():
    opt = ref(make_params([(2,)]))
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": make_params([(3,)]), "lr": torch.tensor(-1.0)})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("src,dst", [("rmspropcg", "adamcm"), ("sgdcg", "rmspropcg"),
                                     ("adamcg", "adamcm")])
def test_a_checkpoint_of_another_optimizer_before_any_step_is_named_too(src, dst):
    params = make_params([(3,)])
    saved = FAMILY[src].cls(params, backend="reference", topC=5).state_dict()
    opt = FAMILY[dst].cls(copy_params(params), backend="reference", topC=5)
    with pytest.raises(ValueError, match="saved by another optimizer"):
        opt.load_state_dict(saved)


def test_pickling_keeps_the_backend_and_an_old_pickle_can_add_groups():
    import copy
    opt = ref(make_params([(4,)]))
    assert copy.deepcopy(opt).backend == "reference"
    del opt.defaults["critical_test"]  # as a version without it pickled it
    for group in opt.param_groups:
        del group["critical_test"]
    clone = pickle.loads(pickle.dumps(opt))
    clone.add_param_group({"params": make_params([(3,)])})
    assert clone.param_groups[1]["critical_test"] == 0.0 and clone.backend == "reference"


# ------------------------------------------------------------ adaptive memory

@pytest.fixture(params=list(ADAPTIVE))
def adaptive_ref(request):
    cls = ADAPTIVE[request.param].cls
    return lambda params, **kw: cls(params, backend="reference", **kw)


def test_last_beta_is_device_tensors_and_empty_before_a_step(adaptive_ref):
    params = make_params([(3,), (2, 2)])
    opt = adaptive_ref(params, lr=1e-2)
    assert opt.last_beta() == {}
    for t in range(3):
        set_grads(params, t)
        opt.step()
    beta = opt.last_beta()
    assert set(beta) == {"mean", "min", "max"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32
               for v in beta.values())
    assert beta["min"] <= beta["mean"] <= beta["max"]


def test_sgdam_groups_must_share_lam_and_beta_max_and_nothing_changes():
    params = make_params([(3,), (2, 2)])
    opt = cm_fused.SGDAM([{"params": params[:1]}, {"params": params[1:]}], lr=1e-2,
                         backend="reference")
    set_grads(params, 0)
    opt.step()
    snap = snapshot(opt, params)
    opt.param_groups[1]["lam"] = 0.5
    set_grads(params, 1)
    with pytest.raises(ValueError, match="same lam and beta_max"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_adaptive_checkpoints_of_torch_or_another_optimizer_are_refused(adaptive_ref):
    params = make_params([(3,)])
    set_grads(params, 0)
    torch_opt = torch.optim.AdamW(copy_params(params))
    cm_opt = AdamCM(copy_params(params), backend="reference")
    for other in (torch_opt, cm_opt):
        other.param_groups[0]["params"][0].grad = params[0].grad.clone()
        other.step()
        opt = adaptive_ref(params)
        with pytest.raises(ValueError, match="cm_fused optimizer|another optimizer"):
            opt.load_state_dict(other.state_dict())
        assert not opt.state


def test_adaptive_state_names_the_spec_entries():
    params = make_params([(3,)])
    set_grads(params, 0)
    adam = cm_fused.AdamAM(params, backend="reference")
    adam.step()
    st = adam.state_dict()["state"][0]
    assert set(st) == {"step", "d", "v", "memory"} and st["memory"].shape == (3,)
    sgd = cm_fused.SGDAM(copy_params(params), backend="reference")
    sgd.param_groups[0]["params"][0].grad = params[0].grad.clone()
    sgd.step()
    assert set(sgd.state_dict()["state"][0]) == {"step", "d"}


def test_a_step_with_nothing_changed_skips_the_state_checks_and_allocation(monkeypatch):
    """Host time per step is the floor of a GPU step: once a group's params, dtypes,
    hyperparameters and state are unchanged since the last step, the per-tensor state
    checks and allocation do not run again; any change runs them."""
    params = make_params([(3,), (2, 2), ()])
    opt = ref(params, lr=1e-2)
    for t in range(2):
        set_grads(params, t)
        opt.step()
    calls = []
    real_check, real_alloc = opt._check_states, opt._state_for
    monkeypatch.setattr(opt, "_check_states", lambda *a: calls.append("check") or real_check(*a))
    monkeypatch.setattr(opt, "_state_for", lambda *a: calls.append("alloc") or real_alloc(*a))
    set_grads(params, 2)
    opt.step()
    assert calls == []
    opt.param_groups[0]["topC"] = 7  # a change: checked again, and refused
    set_grads(params, 3)
    with pytest.raises(RuntimeError, match="topC cannot change"):
        opt.step()
    assert calls == ["check"]
    opt.param_groups[0]["topC"] = 5
    fresh = torch.nn.Parameter(torch.ones(4))  # a new tensor: allocated
    opt.add_param_group({"params": [fresh]})
    fresh.grad = torch.ones(4)
    opt.step()
    assert "alloc" in calls and "cm_buffer" in opt.state[fresh]


@pytest.mark.parametrize("reset", ["clear", "replace", "del", "empty"])
def test_a_state_reset_by_the_user_steps_as_fresh(reset):
    """Clearing opt.state, replacing it, or deleting a parameter's entry between steps
    (the usual ways to reset an optimizer) gives fresh state, as torch's optimizers do."""
    import collections
    params = make_params([(3,), (2, 2)])
    opt = ref(params, lr=1e-2)
    for t in range(3):
        set_grads(params, t)
        opt.step()
    if reset == "clear":
        opt.state.clear()
    elif reset == "replace":
        opt.state = collections.defaultdict(dict)
    elif reset == "del":
        del opt.state[params[0]]
    else:
        opt.state[params[0]] = {}
    set_grads(params, 3)
    opt.step()
    assert opt.state[params[0]]["step"].item() == 1
    assert opt.state[params[0]]["cm_count"].item() == 1
