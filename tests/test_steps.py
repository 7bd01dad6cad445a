"""Steps on the reference backend that are not a lock step with another backend:
GradScaler's protocol, groups, narrow dtypes against an fp32 run, odd shapes, tensor lr,
lr=0 and closures, torch's SGD quirks at kappa=0, meta parameters, int8 slots'
diagnostics, adaptive memory's beta. (Fused backends against the reference:
test_matrix.py.)"""
import pytest
import torch

import cm_fused
from cm_fused import AdamCM
from compare import ODD_SHAPES, assert_bit_identical, assert_same_state, assert_unchanged, copy_params, make_params, run_lockstep, set_grads, snapshot
from family import FAMILY, ref, require


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
