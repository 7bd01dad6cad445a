"""Checkpoints and pickles on the reference backend: the state_dict's format and keys,
resume bit-identical, storage never shared with the dict, refusals that change nothing
(another topC, int8 slots without scales, a pending insert that is no slot, a torch.optim
checkpoint, another optimizer's), and what older versions wrote. (Every backend's save and
load midway: test_matrix.py; with LR schedulers: test_scheduler_checkpoints.py.)"""
import pickle

import pytest
import torch

import cm_fused
from cm_fused import AdamCM
from compare import ODD_SHAPES, assert_bit_identical, assert_unchanged, checkpoint_roundtrip, copy_params, make_params, set_grads, snapshot, through_bytes
from family import FAMILY, ref


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
    for attr in ("_backends", "_runner", "backends_in_use"):  # as an older version pickled it
        del opt.__dict__[attr]
    for group in opt.param_groups:
        del group["critical_test"]
    clone = pickle.loads(pickle.dumps(opt))
    assert clone._backends._cache == {} and clone.param_groups[0]["critical_test"] == 0.0
    set_grads(clone.param_groups[0]["params"], 1)
    clone.step()


def test_a_pickled_clipping_optimizer_clips_and_reports_its_norm():
    params = make_params([(4,), (3,)])
    opt = ref(params, max_grad_norm=0.5)
    set_grads(params, 0)
    opt.step()
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.grad_norm is None and clone.param_groups[0]["max_grad_norm"] == 0.5
    set_grads(clone.param_groups[0]["params"], 1)
    want = torch.linalg.vector_norm(torch.cat([p.grad for p in clone.param_groups[0]["params"]]))
    clone.step()
    torch.testing.assert_close(clone.grad_norm, want)


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


# ---------------------------------------------------------------- 8-bit moments

def _eight_bit(cls, params, **kw):
    return cls(params, backend="reference", state_dtype=torch.int8, min_8bit_size=100, **kw)


def _stepped(opt, params, steps=3):
    for t in range(steps):
        set_grads(params, t)
        opt.step()
    return opt


def _assert_refused_unchanged(opt, params, sd, match):
    snap, lr = snapshot(opt, params), [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, snap)
    assert [g["lr"] for g in opt.param_groups] == lr


def test_a_load_whose_moments_do_not_fit_changes_nothing():
    """AdamAM keeps no buffer whose shape would be checked first: its moments' shape is
    checked before the groups and states are replaced (the conversion raised after)."""
    saved = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(300))]
    sd = _stepped(cm_fused.AdamAM(saved, lr=0.5, backend="reference"), saved).state_dict()
    params = make_params([(300,), (600,)])
    opt = _stepped(_eight_bit(cm_fused.AdamAM, params, lr=0.1), params)
    _assert_refused_unchanged(opt, params, sd, r"does not fit a parameter of shape \(600,\)")


@pytest.mark.parametrize("cls,kw", [(AdamCM, dict(kappa=0.0)),
                                    (cm_fused.RMSpropCG, dict(centered=True))],
                         ids=["kappa0", "centered"])
def test_a_checkpoint_8bit_moments_cannot_step_with_is_refused(cls, kw):
    """The loading optimizer's state_dtype wins: a checkpoint whose group could not step
    8-bit moments (kappa=0, centered RMSprop) is refused, not loaded into a dead group."""
    saved = make_params([(300,)])
    sd = _stepped(cls(saved, backend="reference", **kw), saved).state_dict()
    params = make_params([(300,)])
    opt = _stepped(_eight_bit(cls, params), params)
    _assert_refused_unchanged(opt, params, sd, "cannot be loaded into this optimizer's 8-bit")


def test_moments_cast_from_their_codes_are_refused():
    """A state dict whose uint8 codes were cast (a blanket .float()) would load code
    numbers as moment values."""
    params = make_params([(300,)])
    opt = _stepped(_eight_bit(AdamCM, params), params)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].float()
    for target in (opt, AdamCM(copy_params(params), backend="reference")):
        _assert_refused_unchanged(target, target.param_groups[0]["params"], sd,
                                  "are not uint8 codes")


def test_wrongly_shaped_moment_scales_are_refused():
    params = make_params([(300,)])
    opt = _stepped(_eight_bit(AdamCM, params), params)
    sd = opt.state_dict()
    sd["state"][0]["moment_scales"] = sd["state"][0]["moment_scales"][:, :1]
    _assert_refused_unchanged(opt, params, sd, "moment_scales")


def test_a_pending_insert_is_written_as_stored_before_the_moments_convert():
    """A checkpoint holding a pending insert (cm_pending >= 0: the momentum as stored goes
    into that slot) loaded into an 8-bit optimizer: the slot gets the fp32 momentum, not
    its codes."""
    params = make_params([(300,)])
    fp = _stepped(AdamCM(params, backend="reference", topC=3), params)
    sd = fp.state_dict()
    st = sd["state"][0]
    st["cm_pending"] = torch.tensor(0)
    want = st["exp_avg"].clone()
    opt = _eight_bit(AdamCM, copy_params(params), topC=3)
    opt.load_state_dict(sd)
    loaded = opt.state[opt.param_groups[0]["params"][0]]
    assert torch.equal(loaded["cm_buffer"][0], want) and int(loaded["cm_pending"]) == -1
    assert loaded["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("cls,kw", [(AdamCM, dict(buffer_dtype=torch.int8, topC=3)),
                                    (cm_fused.SGDCG, dict(momentum=0.9)),
                                    (cm_fused.RMSpropCG, dict(momentum=0.5)),
                                    (cm_fused.AdamAM, {})],
                         ids=["adamcm", "sgdcg", "rmspropcg", "adamam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_8bit_moments_load_back_into_full_precision_rows_and_dtype(cls, kw, dtype):
    """Each moment dequantized with its own scale row (0: momentum, 1: second moment),
    rounded to the param's dtype."""
    from cm_fused.quantize import dequantize_moment
    params = make_params([(300,), (7,)], dtype=dtype)
    opt = _stepped(_eight_bit(cls, params, **kw), params)
    back = cls(copy_params(params), backend="reference", **kw)
    back.load_state_dict(through_bytes(opt.state_dict()))
    roles = opt.spec.roles(opt.param_groups[0])
    st8, st = opt.state[params[0]], back.state[back.param_groups[0]["params"][0]]
    for row, key in enumerate((roles.momenta, roles.second_moments)):
        if key is None:
            continue
        want = dequantize_moment(st8[key], st8["moment_scales"][row], bool(row)).to(dtype)
        assert st[key].dtype == dtype and torch.equal(st[key], want), key
    assert "moment_scales" not in st
    _stepped(back, back.param_groups[0]["params"], 1)
