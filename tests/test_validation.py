"""Refusals and errors that change nothing, on the reference backend: every
hyperparameter's error inputs (``family.BAD_VALUES``, as data: a new optimizer or keyword
adds rows, not tests), bad gradients, tensors changed behind the optimizer's back, state
allocation that fails, and the backend choice (made once, its fallback and refusals)."""
import warnings

import pytest
import torch

import cm_fused
from cm_fused import AdamCM, registry
from compare import assert_unchanged, make_params, set_grads, snapshot
from family import BAD_VALUES, EVERY, ref, require

BAD_CASES = [pytest.param(opt, arg, value, id=f"{opt}-{arg}={value!r}")
             for opt, member in EVERY.items() for arg, value in member.error_inputs]


def test_every_hyperparameter_of_every_optimizer_has_error_inputs():
    """A keyword without a row in family.BAD_VALUES would go untested."""
    for name, member in EVERY.items():
        missing = sorted(set(member.cls.HYPERPARAMETERS) - set(BAD_VALUES))
        assert not missing, f"{name}: no error inputs for {missing} in family.BAD_VALUES"


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


# Hyperparameters that cannot change after a parameter's first step: (optimizer, its
# keywords, the key set later, the new value).
FIXED_AFTER_FIRST_STEP = [
    pytest.param(AdamCM, dict(topC=3), "topC", 4, id="topC"),
    # (SGD's first momentum step is a copy: turned on later, it would be skipped)
    pytest.param(cm_fused.SGDCG, dict(), "momentum", 0.9, id="sgdcg-momentum"),
]


@pytest.mark.parametrize("cls,kw,key,value", FIXED_AFTER_FIRST_STEP)
def test_a_hyperparameter_fixed_after_the_first_step_raises_and_changes_nothing(
        cls, kw, key, value):
    params = make_params([(4,)])
    opt = cls(params, backend="reference", **kw)
    set_grads(params, 0)
    opt.step()
    snap = snapshot(opt, params)
    opt.param_groups[0][key] = value
    set_grads(params, 1)
    with pytest.raises(RuntimeError, match=key):
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
    store = opt._store
    real_check, real_alloc = store.check, store._state_for
    monkeypatch.setattr(store, "check", lambda *a: calls.append("check") or real_check(*a))
    monkeypatch.setattr(store, "_state_for", lambda *a: calls.append("alloc") or real_alloc(*a))
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


def test_entries_taken_back_from_a_stepped_state_are_allocated_again():
    """A failed allocation takes back what it added to a state that already had entries
    (a checkpoint of a version without insert counts); the next step must not count that
    group as settled (the state's version changed), whatever else is unchanged."""
    params = make_params([(4,), (3,)])
    opt = ref(params, lr=1e-2)
    for t in range(2):
        set_grads(params, t)
        opt.step()
    sd = opt.state_dict()
    for st in sd["state"].values():
        del st["cm_inserts"]  # (an older version's checkpoint)
    old = ref(params, lr=1e-2)
    old.load_state_dict(sd)
    big = torch.nn.Parameter(torch.ones(1000))
    old.add_param_group({"params": [big], "topC": 10 ** 12})
    big.grad = torch.ones(1000)
    with pytest.raises(RuntimeError):
        old.step()
    assert all("cm_inserts" not in old.state[p] for p in params)  # (taken back)
    old.param_groups.pop()  # the user drops the group that could not be allocated
    old.state.pop(big, None)
    set_grads(params, 3)
    old.step()
    assert all(old.state[p]["cm_inserts"].item() >= 0 for p in params)
