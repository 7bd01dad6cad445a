"""The reference backend against shared/SPEC.md: hand-computed cases that pin each quirk,
an independent float64 model over long runs, torch.optim.AdamW at kappa=0, properties."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cm_fused import AdamCM
from compare import ODD_SHAPES, make_params, run_lockstep, set_grads
from spec_model import SpecAdamCM


def ref(params, **kw):
    return AdamCM(params, backend="reference", **kw)


def param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


# ------------------------------------------------------------ hand-computed SPEC cases

def test_first_step_moves_only_by_weight_decay_and_seeds_buffer_with_raw_gradient():
    p = param([1.0, -2.0, 4.0])
    g = torch.tensor([3.0, 0.0, 4.0])
    opt = ref([p], lr=0.1, weight_decay=0.5, topC=3, decay=0.5)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0, 4.0]) * (1 - 0.1 * 0.5),
                               rtol=0, atol=0)
    s = opt.state[p]
    assert torch.equal(s["exp_avg"], torch.zeros(3))
    assert torch.equal(s["exp_avg_sq"], torch.zeros(3))
    assert torch.equal(s["cm_buffer"][0], g)  # the raw gradient, not a momentum
    assert torch.equal(s["cm_buffer"][1:], torch.zeros(2, 3))
    assert torch.equal(s["cm_sum"], g)
    assert s["cm_count"].item() == 1 and s["step"].item() == 1
    assert s["cm_keys"].tolist() == [5.0 * 0.5, 0.0, 0.0]  # ||g|| = 5, decayed once


def test_first_step_without_weight_decay_leaves_param_bit_identical():
    p = param([0.3, -0.7])
    opt = ref([p], lr=1.0)
    p.grad = torch.tensor([10.0, -3.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.3, -0.7]))


def test_synced_key_is_sum_of_per_tensor_norms_not_global_norm():
    a, b = param([3.0, 4.0]), param([0.0, 12.0])
    opt = ref([a, b], decay=1.0)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])
    opt.step()
    assert opt.state[a]["cm_keys"][0].item() == 17.0  # 5 + 12, the global norm is 13
    assert opt.state[b]["cm_keys"][0].item() == 17.0
    c, d = param([3.0, 4.0]), param([0.0, 12.0])
    opt = ref([c, d], decay=1.0, synced=False)
    c.grad, d.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])
    opt.step()
    assert opt.state[c]["cm_keys"][0].item() == 5.0
    assert opt.state[d]["cm_keys"][0].item() == 12.0


def test_second_step_aggregate_uses_pre_insert_buffer_and_v_tracks_aggregate():
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    x0 = [0.5, -1.0]
    g1, g2 = [1.0, 2.0], [-3.0, 0.5]
    p = param(x0)
    opt = ref([p], lr=lr, betas=(b1, b2), eps=eps, topC=5)
    p.grad = torch.tensor(g1)
    opt.step()
    p.grad = torch.tensor(g2)
    opt.step()
    m = [(1 - b1) * y for y in g2]  # m was 0 after the first step
    a = [mi + s for mi, s in zip(m, g1)]  # S/k before the insert: g1 / 1
    v = [(1 - b2) * ai * ai for ai in a]  # not (1 - b2) * g^2
    bc1, bc2 = 1 - b1 ** 2, 1 - b2 ** 2
    want = [x - (lr / bc1) * ai / (math.sqrt(vi) / math.sqrt(bc2) + eps)
            for x, ai, vi in zip(x0, a, v)]
    s = opt.state[p]
    torch.testing.assert_close(p.detach(), torch.tensor(want), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s["exp_avg_sq"], torch.tensor(v), rtol=1e-6, atol=0)
    torch.testing.assert_close(s["exp_avg"], torch.tensor(m), rtol=1e-6, atol=0)
    # the momentum (not the aggregate) went into slot 1; S is the sum of the slots
    torch.testing.assert_close(s["cm_buffer"][1], torch.tensor(m), rtol=0, atol=0)
    torch.testing.assert_close(s["cm_sum"], torch.tensor(g1) + torch.tensor(m), rtol=0, atol=0)


def _drive(opt, p, grads):
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()


def test_replacement_is_strictly_greater_than_the_min_key():
    p = param([0.0, 0.0])
    opt = ref([p], topC=2, decay=1.0)  # decay 1: keys are the norms themselves
    _drive(opt, p, [[1.0, 0.0], [2.0, 0.0]])
    s = opt.state[p]
    assert s["cm_keys"].tolist() == [1.0, 2.0] and s["cm_count"].item() == 2
    before = s["cm_buffer"].clone()
    _drive(opt, p, [[0.0, 1.0]])  # key 1.0 == min key: no replacement
    assert torch.equal(s["cm_buffer"], before) and s["cm_keys"].tolist() == [1.0, 2.0]
    _drive(opt, p, [[0.0, 1.5]])  # 1.5 > 1.0: replaces slot 0
    assert s["cm_keys"].tolist() == [1.5, 2.0]
    assert torch.equal(s["cm_buffer"][1], before[1])
    assert torch.equal(s["cm_buffer"][0], s["exp_avg"])
    torch.testing.assert_close(s["cm_sum"], s["cm_buffer"].sum(0))


def test_tie_on_min_key_replaces_first_index():
    p = param([0.0, 0.0])
    opt = ref([p], topC=3, decay=1.0)
    _drive(opt, p, [[5.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    s = opt.state[p]
    assert s["cm_keys"].tolist() == [5.0, 2.0, 2.0]
    before = s["cm_buffer"].clone()
    _drive(opt, p, [[3.0, 0.0]])
    assert s["cm_keys"].tolist() == [5.0, 3.0, 2.0]
    assert torch.equal(s["cm_buffer"][2], before[2]) and not torch.equal(s["cm_buffer"][1],
                                                                         before[1])


def test_critical_test_one_always_replaces_the_min_slot():
    p = param([0.0, 0.0])
    opt = ref([p], topC=2, decay=1.0, critical_test=1.0)
    _drive(opt, p, [[4.0, 0.0], [3.0, 0.0], [0.0, 1.0]])  # key 1 < min key 3
    assert opt.state[p]["cm_keys"].tolist() == [4.0, 1.0]


def test_tensor_without_grad_is_skipped_entirely():
    a, b = param([1.0, 1.0]), param([2.0, 2.0])
    opt = ref([a, b], weight_decay=0.1, lr=0.1, decay=0.5)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])
    opt.step()
    sb = {k: v.clone() for k, v in opt.state[b].items()}
    b_before = b.detach().clone()
    a.grad, b.grad = torch.tensor([0.0, 2.0]), None
    opt.step()
    assert torch.equal(b.detach(), b_before)  # no weight decay either
    for k, v in sb.items():
        assert torch.equal(opt.state[b][k], v), k  # keys not decayed, step not advanced
    # a's synced key no longer includes b's norm: 0.5 * ||(0, 2)||
    assert opt.state[a]["cm_keys"][1].item() == 0.5 * 2.0


def test_skipped_first_step_keeps_the_first_step_quirk_for_the_next_step():
    p = param([1.0, 2.0])
    opt = ref([p], weight_decay=0.1)
    p.grad = torch.tensor([1.0, 1.0])
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    assert opt.state[p]["cm_count"].item() == 0 and opt.state[p]["step"].item() == 0
    p.grad = torch.tensor([2.0, 2.0])
    opt.step()
    assert torch.equal(opt.state[p]["cm_buffer"][0], torch.tensor([2.0, 2.0]))
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(2))


# ------------------------------------------------------------ long runs against SPEC

SPEC_CONFIGS = [
    dict(synced=True),
    dict(synced=False),
    dict(amsgrad=True, weight_decay=0.05),
    dict(topC=1, decay=0.99),
    dict(topC=5, decay=0.99, synced=False, weight_decay=0.01),
    dict(topC=5, decay=0.7, amsgrad=True, synced=False),
]


@pytest.mark.parametrize("cfg", SPEC_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_reference_matches_independent_spec_model_over_200_steps(cfg):
    shapes = [(7,), (3, 4), (), (1,), (33,)]
    params = make_params(shapes, seed=3)
    lr = 1e-2
    model = SpecAdamCM(params, lr=lr, **cfg)
    opt = ref(params, lr=lr, **cfg)
    missing = lambda step: {1} if step % 7 == 3 else ({3} if step % 11 == 5 else ())
    for step in range(200):
        set_grads(params, step, seed=5, missing=missing(step))
        opt.step()
        xs = model.step()
    for i, (p, x) in enumerate(zip(params, xs)):
        # fp32 against fp64: the fp32 run rounds each param once a step, so up to
        # 200 steps x ulp(1) ~ 1.2e-5 absolute, whatever the magnitude of the param.
        torch.testing.assert_close(p.detach().double(), x, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"param {i}: {m}")
        s, ms = opt.state[p], model.state[i]
        assert s["cm_count"].item() == len(ms["B"]), f"param {i}: fill count"
        assert s["step"].item() == ms["step"], f"param {i}: step count"
        torch.testing.assert_close(s["cm_keys"][: len(ms["K"])].double(),
                                   torch.tensor(ms["K"], dtype=torch.float64), rtol=1e-5, atol=0)
        torch.testing.assert_close(s["cm_buffer"][: len(ms["B"])].double(),
                                   torch.stack(ms["B"]), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s["cm_sum"].double(), ms["S"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------ kappa = 0 is AdamW

@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_kappa_zero_is_torch_adamw_bit_for_bit(amsgrad, weight_decay):
    kw = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=weight_decay,
              amsgrad=amsgrad)
    run_lockstep(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw),
                 lambda ps: ref(ps, kappa=0.0, **kw),
                 ODD_SHAPES, steps=200, compare_every=50,
                 missing=lambda step: {2} if step % 5 == 1 else ())
    # the comparison above uses the fp32 tolerance; also demand identical bits at the end
    (oa, pa), (ob, pb) = run_lockstep(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw),
                                      lambda ps: ref(ps, kappa=0.0, **kw),
                                      [(5,), (2, 3)], steps=30, compare_every=30)
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


# ------------------------------------------------------------ properties

@settings(max_examples=30, deadline=None, derandomize=True)  # same examples in every CI run
@given(
    scales=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=25),
    top_c=st.integers(1, 4),
    decay=st.sampled_from([0.0, 0.5, 0.7, 0.99, 1.0]),
    synced=st.booleans(),
    critical=st.sampled_from([0.0, 0.5]),
)
def test_buffer_invariants(scales, top_c, decay, synced, critical):
    params = make_params([(4,), (2, 3)], seed=11)
    opt = ref(params, topC=top_c, decay=decay, synced=synced, critical_test=critical)
    gen = torch.Generator().manual_seed(0)
    for t, scale in enumerate(scales):
        before = [opt.state[p]["cm_keys"].clone() if p in opt.state else None for p in params]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * scale
        opt.step()
        for p, old in zip(params, before):
            s = opt.state[p]
            k = s["cm_count"].item()
            assert 1 <= k <= top_c and k == min(t + 1, top_c)
            # S is a running sum: one rounding per add and per subtract, each up to
            # ulp(|S|) with |S| ~ topC * max scale, so the bound grows with steps and scale.
            torch.testing.assert_close(s["cm_sum"], s["cm_buffer"][:k].sum(0), rtol=1e-5,
                                       atol=1e-6 * max(scales[: t + 1]) * (t + 1))
            assert torch.equal(s["cm_buffer"][k:], torch.zeros_like(s["cm_buffer"][k:]))
            if old is not None:  # keys only decay, except the one slot written this step
                changed = (s["cm_keys"] != old * decay).sum().item()
                assert changed <= 1
