"""docs/SPEC.md's quirks, pinned by hand-computed cases on tiny tensors, on every backend
that can run here (the fused ones included: exact ties and edge cases never arise in
random lock-step runs). The insert rule's cases run for every optimizer; each
optimizer's own quirks have their own cases."""
import math

import pytest
import torch

import cm_fused
from compare import settled
from family import ADAPTIVE, BACKENDS, FAMILY, require


@pytest.fixture(params=BACKENDS)
def backend(request):
    require(request.param)
    return request.param


@pytest.fixture
def make(backend):
    """AdamCM on the backend under test."""
    return lambda params, **kw: FAMILY["adamcm"].cls(params, backend=backend, **kw)


@pytest.fixture(params=list(FAMILY))
def make_any(request, backend):
    """Every optimizer of the family on the backend under test (lr 0: the insert rule's
    cases look at the buffer, not at the parameter)."""
    cls = FAMILY[request.param].cls
    return lambda params, **kw: cls(params, backend=backend, **{"lr": 0.0, **kw})


def param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def test_maximize_is_minimizing_the_negated_gradient(make_any):
    """maximize=True with g steps exactly as maximize=False with -g (keys included: a
    norm does not see the sign), on every backend and optimizer."""
    a, b = param([1.0, -2.0, 0.5]), param([1.0, -2.0, 0.5])
    opt_a = make_any([a], lr=0.1, weight_decay=0.1, maximize=True)
    opt_b = make_any([b], lr=0.1, weight_decay=0.1)
    for g in ([3.0, 0.0, -1.0], [0.5, 2.0, 1.0], [-1.0, 1.0, 4.0]):
        a.grad, b.grad = torch.tensor(g), -torch.tensor(g)
        opt_a.step()
        opt_b.step()
    assert torch.equal(a.detach(), b.detach()) and not torch.equal(a.detach(),
                                                                    torch.tensor([1.0, -2.0, 0.5]))
    for key, value in settled(opt_a, a).items():
        assert torch.equal(value, settled(opt_b, b)[key]), key


def test_int8_slots_round_ties_to_even_and_poison_only_a_non_finite_block(make_any):
    """8-bit slots, hand-computed, on every backend: the first insert of every optimizer
    is the raw gradient. Block 0's largest magnitude 127 makes its scale exactly 1, so
    the halves are ties (to even); block 1 (all zeros) stays zero with scale 0; block 2
    holds an infinity, so it is NaN throughout with a NaN scale; and S adds exactly the
    values held (block 0: the rounded gradient, not the gradient)."""
    from cm_fused.quantize import QBLOCK
    g = torch.zeros(2 * QBLOCK + 5)
    g[:7] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.25])
    g[2 * QBLOCK + 1] = float("inf")
    p = torch.nn.Parameter(torch.zeros_like(g))
    opt = make_any([p], topC=2, buffer_dtype=torch.int8)
    p.grad = g.clone()
    opt.step()
    st = settled(opt, p)
    q, scales, S = st["cm_buffer"][0], st["cm_scales"][0], st["cm_sum"]
    assert q[:7].tolist() == [127, 0, 2, 2, -2, 0, 3]
    assert scales[0].item() == 1.0 and scales[1].item() == 0.0 and scales[2].isnan()
    assert (q[QBLOCK:] == 0).all() and (st["cm_buffer"][1] == 0).all()
    assert S[:7].tolist() == [127.0, 0.0, 2.0, 2.0, -2.0, 0.0, 3.0]
    assert (S[QBLOCK:2 * QBLOCK] == 0).all() and S[2 * QBLOCK:].isnan().all()


# ------------------------------------------------------------ AdamCM

def test_first_step_moves_only_by_weight_decay_and_seeds_buffer_with_raw_gradient(make):
    p = param([1.0, -2.0, 4.0])
    g = torch.tensor([3.0, 0.0, 4.0])
    opt = make([p], lr=0.1, weight_decay=0.5, topC=3, decay=0.5)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0, 4.0]) * (1 - 0.1 * 0.5),
                               rtol=0, atol=0)
    s = settled(opt, p)
    assert torch.equal(s["exp_avg"], torch.zeros(3))
    assert torch.equal(s["exp_avg_sq"], torch.zeros(3))
    assert torch.equal(s["cm_buffer"][0], g)  # the raw gradient, not a momentum
    assert torch.equal(s["cm_buffer"][1:], torch.zeros(2, 3))
    assert torch.equal(s["cm_sum"], g)
    assert s["cm_count"].item() == 1 and s["step"].item() == 1
    assert s["cm_keys"].tolist() == [5.0 * 0.5, 0.0, 0.0]  # ||g|| = 5, decayed once


def test_first_step_without_weight_decay_leaves_param_bit_identical(make):
    p = param([0.3, -0.7])
    opt = make([p], lr=1.0)
    p.grad = torch.tensor([10.0, -3.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.3, -0.7]))


def test_synced_key_is_sum_of_per_tensor_norms_not_global_norm(make_any):
    a, b = param([3.0, 4.0]), param([0.0, 12.0])
    opt = make_any([a, b], decay=1.0)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])
    opt.step()
    assert settled(opt, a)["cm_keys"][0].item() == 17.0  # 5 + 12, the global norm is 13
    assert settled(opt, b)["cm_keys"][0].item() == 17.0
    c, d = param([3.0, 4.0]), param([0.0, 12.0])
    opt = make_any([c, d], decay=1.0, synced=False)
    c.grad, d.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0])
    opt.step()
    assert settled(opt, c)["cm_keys"][0].item() == 5.0
    assert settled(opt, d)["cm_keys"][0].item() == 12.0


def test_second_step_aggregate_uses_pre_insert_buffer_and_v_tracks_aggregate(make):
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    x0 = [0.5, -1.0]
    g1, g2 = [1.0, 2.0], [-3.0, 0.5]
    p = param(x0)
    opt = make([p], lr=lr, betas=(b1, b2), eps=eps, topC=5)
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
    s = settled(opt, p)
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


def inserted(opt, p):
    """What a later step inserts, without weight decay: AdamCM the momentum, the
    critical-gradients optimizers the gradient."""
    return settled(opt, p)["exp_avg"] if type(opt) is FAMILY["adamcm"].cls else p.grad


# ------------------------------------------------------------ the insert rule, every optimizer


def test_replacement_is_strictly_greater_than_the_min_key(make_any):
    p = param([0.0, 0.0])
    opt = make_any([p], topC=2, decay=1.0)  # decay 1: keys are the norms themselves
    _drive(opt, p, [[1.0, 0.0], [2.0, 0.0]])
    s = settled(opt, p)
    assert s["cm_keys"].tolist() == [1.0, 2.0] and s["cm_count"].item() == 2
    before = s["cm_buffer"].clone()
    _drive(opt, p, [[0.0, 1.0]])  # key 1.0 == min key: no replacement
    s = settled(opt, p)
    assert torch.equal(s["cm_buffer"], before) and s["cm_keys"].tolist() == [1.0, 2.0]
    _drive(opt, p, [[0.0, 1.5]])  # 1.5 > 1.0: replaces slot 0
    s = settled(opt, p)
    assert s["cm_keys"].tolist() == [1.5, 2.0]
    assert torch.equal(s["cm_buffer"][1], before[1])
    assert torch.equal(s["cm_buffer"][0], inserted(opt, p))
    torch.testing.assert_close(s["cm_sum"], s["cm_buffer"].sum(0))


def test_tie_on_min_key_replaces_first_index(make_any):
    p = param([0.0, 0.0])
    opt = make_any([p], topC=3, decay=1.0)
    _drive(opt, p, [[5.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    s = settled(opt, p)
    assert s["cm_keys"].tolist() == [5.0, 2.0, 2.0]
    before = s["cm_buffer"].clone()
    _drive(opt, p, [[3.0, 0.0]])
    s = settled(opt, p)
    assert s["cm_keys"].tolist() == [5.0, 3.0, 2.0]
    assert torch.equal(s["cm_buffer"][2], before[2]) and not torch.equal(s["cm_buffer"][1],
                                                                         before[1])


def test_critical_test_one_always_replaces_the_min_slot(make_any):
    p = param([0.0, 0.0])
    if "critical_test" not in make_any([p]).HYPERPARAMETERS:  # RMSpropCG: priority only
        with pytest.raises(TypeError, match="critical_test"):
            make_any([p], critical_test=1.0)
        return
    opt = make_any([p], topC=2, decay=1.0, critical_test=1.0)
    _drive(opt, p, [[4.0, 0.0], [3.0, 0.0], [0.0, 1.0]])  # key 1 < min key 3
    assert settled(opt, p)["cm_keys"].tolist() == [4.0, 1.0]


def test_tensor_without_grad_is_skipped_entirely(make):
    a, b = param([1.0, 1.0]), param([2.0, 2.0])
    opt = make([a, b], weight_decay=0.1, lr=0.1, decay=0.5)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])
    opt.step()
    sb = {k: v.clone() for k, v in settled(opt, b).items()}
    b_before = b.detach().clone()
    a.grad, b.grad = torch.tensor([0.0, 2.0]), None
    opt.step()
    assert torch.equal(b.detach(), b_before)  # no weight decay either
    for k, v in sb.items():
        assert torch.equal(settled(opt, b)[k], v), k  # keys not decayed, step not advanced
    # a's synced key no longer includes b's norm: 0.5 * ||(0, 2)||
    assert settled(opt, a)["cm_keys"][1].item() == 0.5 * 2.0


def test_skipped_first_step_keeps_the_first_step_quirk_for_the_next_step(make_any):
    p = param([1.0, 2.0])
    opt = make_any([p])
    p.grad = torch.tensor([1.0, 1.0])
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    assert settled(opt, p)["cm_count"].item() == 0 and settled(opt, p)["step"].item() == 0
    p.grad = torch.tensor([2.0, 2.0])
    opt.step()
    assert torch.equal(settled(opt, p)["cm_buffer"][0], torch.tensor([2.0, 2.0]))
    if "exp_avg" in settled(opt, p) and type(opt) is FAMILY["adamcm"].cls:
        assert torch.equal(settled(opt, p)["exp_avg"], torch.zeros(2))  # CM: m <- 0 first


def test_first_step_with_eps_zero_moves_only_by_weight_decay(make):
    p = param([1.0, -3.0])
    opt = make([p], lr=0.5, eps=0.0, weight_decay=0.2)
    p.grad = torch.tensor([2.0, 1.0])
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, -3.0]) * (1 - 0.5 * 0.2))


def test_found_inf_on_a_later_step_changes_nothing(make):
    p = param([1.0, -3.0, 0.5])
    opt = make([p], weight_decay=0.1, amsgrad=True, topC=2)
    _drive(opt, p, [[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [3.0, 1.0, 0.0]])
    before = p.detach().clone(), {k: v.clone() for k, v in settled(opt, p).items()}
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    _drive(opt, p, [[9.0, 9.0, 9.0]])  # would replace a slot if it were not skipped
    assert torch.equal(p.detach(), before[0])
    for k, v in before[1].items():
        assert torch.equal(settled(opt, p)[k], v), k


# ------------------------------------------------------------ AdamCG

def test_adamcg_first_step_is_an_ordinary_adam_step(backend):
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    p = param([0.5, -1.0, 2.0])
    g = torch.tensor([3.0, -4.0, 0.0])
    opt = FAMILY["adamcg"].cls([p], lr=lr, betas=(b1, b2), eps=eps, backend=backend)
    p.grad = g.clone()
    opt.step()
    m = (1 - b1) * g
    v = (1 - b2) * g * g
    want = torch.tensor([0.5, -1.0, 2.0]) - (lr / (1 - b1)) * m / (
        v.sqrt() / math.sqrt(1 - b2) + eps)
    torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)
    s = settled(opt, p)
    assert torch.equal(s["cm_buffer"][0], g) and torch.equal(s["cm_sum"], g)
    assert s["cm_count"].item() == 1 and s["step"].item() == 1


def test_adamcg_aggregates_before_adam_inserts_raw_gradient_and_decays_coupled(backend):
    """Step 2: u = g2 + S/k (S before the insert) + wd·p; Adam runs on u; the buffer
    gets the raw g2 (no weight decay, no aggregate)."""
    lr, b1, b2, eps, wd = 0.05, 0.8, 0.99, 1e-8, 0.1
    x0 = torch.tensor([0.5, -1.0])
    g1, g2 = torch.tensor([1.0, 2.0]), torch.tensor([-3.0, 0.5])
    p = torch.nn.Parameter(x0.clone())
    opt = FAMILY["adamcg"].cls([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                               topC=4, backend=backend)
    p.grad = g1.clone()
    opt.step()
    u1 = g1 + wd * x0
    m1, v1 = (1 - b1) * u1, (1 - b2) * u1 * u1
    x1 = x0 - (lr / (1 - b1)) * m1 / (v1.sqrt() / math.sqrt(1 - b2) + eps)
    torch.testing.assert_close(p.detach(), x1, rtol=1e-6, atol=1e-7)
    p.grad = g2.clone()
    opt.step()
    u2 = g2 + g1 / 1 + wd * x1
    m2 = b1 * m1 + (1 - b1) * u2
    v2 = b2 * v1 + (1 - b2) * u2 * u2
    x2 = x1 - (lr / (1 - b1 ** 2)) * m2 / (v2.sqrt() / math.sqrt(1 - b2 ** 2) + eps)
    s = settled(opt, p)
    torch.testing.assert_close(p.detach(), x2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s["exp_avg"], m2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s["exp_avg_sq"], v2, rtol=1e-6, atol=1e-8)
    assert torch.equal(s["cm_buffer"][1], g2)  # the raw gradient
    assert torch.equal(s["cm_sum"], g1 + g2)


# ------------------------------------------------------------ SGDCG

def test_sgdcg_stores_weight_decay_in_the_buffer_and_first_momentum_step_copies(backend):
    lr, wd, mu, damp = 0.1, 0.5, 0.9, 0.25
    x0 = torch.tensor([1.0, -2.0])
    g1, g2 = torch.tensor([0.5, 1.0]), torch.tensor([2.0, -1.0])
    p = torch.nn.Parameter(x0.clone())
    opt = FAMILY["sgdcg"].cls([p], lr=lr, weight_decay=wd, momentum=mu, dampening=damp,
                              topC=3, backend=backend)
    p.grad = g1.clone()
    opt.step()
    d1 = g1 + wd * x0  # the stored value includes weight decay (quirk)
    x1 = x0 - lr * d1  # the first momentum step copies d: buf = d1
    s = settled(opt, p)
    torch.testing.assert_close(s["cm_buffer"][0], d1, rtol=0, atol=0)
    torch.testing.assert_close(s["momentum_buffer"], d1, rtol=0, atol=0)
    torch.testing.assert_close(p.detach(), x1, rtol=1e-6, atol=1e-7)
    p.grad = g2.clone()
    opt.step()
    d2 = g2 + wd * x1
    a2 = d2 + d1 / 1  # the buffer before the insert
    buf = mu * d1 + (1 - damp) * a2
    torch.testing.assert_close(s["cm_buffer"][1], d2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s["momentum_buffer"], buf, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(p.detach(), x1 - lr * buf, rtol=1e-6, atol=1e-7)


def test_sgdcg_decay_zero_means_keys_never_decay(backend):
    """SGDCG's quirk: decay=0 leaves the keys as they were written (the others zero
    them every step)."""
    p = param([0.0, 0.0])
    opt = FAMILY["sgdcg"].cls([p], lr=0.0, topC=3, decay=0.0, backend=backend)
    _drive(opt, p, [[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    assert settled(opt, p)["cm_keys"].tolist() == [5.0, 2.0, 1.0]
    q = param([0.0, 0.0])
    other = FAMILY["adamcg"].cls([q], lr=0.0, topC=3, decay=0.0, backend=backend)
    _drive(other, q, [[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    assert settled(other, q)["cm_keys"].tolist() == [0.0, 0.0, 0.0]


def test_sgdcg_without_momentum_steps_by_the_aggregate(backend):
    p = param([1.0, 1.0])
    opt = FAMILY["sgdcg"].cls([p], lr=0.5, topC=2, backend=backend)
    _drive(opt, p, [[2.0, 0.0], [0.0, 4.0]])
    # step 1: p -= 0.5 * g1; step 2: p -= 0.5 * (g2 + g1)
    assert torch.equal(p.detach(), torch.tensor([1.0 - 1.0 - 1.0, 1.0 - 2.0]))
    assert "momentum_buffer" not in settled(opt, p)


# ------------------------------------------------------------ RMSpropCG

def test_rmspropcg_steps_with_the_buffer_mean_alone(backend):
    """RMSpropCG's quirk: after the first step, u = S/k (the buffer before this step's
    insert), so this step's gradient moves nothing until it is in the buffer: below, the
    second element has g = 0 on step 1 and stays put on step 2 although g2 = 3 there."""
    lr, alpha, eps = 0.1, 0.9, 1e-8
    x0 = torch.tensor([1.0, -1.0])
    g1, g2 = torch.tensor([2.0, 0.0]), torch.tensor([-5.0, 3.0])
    p = torch.nn.Parameter(x0.clone())
    opt = FAMILY["rmspropcg"].cls([p], lr=lr, alpha=alpha, eps=eps, topC=3, backend=backend)
    p.grad = g1.clone()
    opt.step()
    sq1 = (1 - alpha) * g1 * g1
    x1 = x0 - lr * g1 / (sq1.sqrt() + eps)  # the first step is an ordinary RMSprop step
    torch.testing.assert_close(p.detach(), x1, rtol=1e-6, atol=1e-7)
    p.grad = g2.clone()
    opt.step()
    sq2 = alpha * sq1 + (1 - alpha) * g1 * g1  # u = S/k = g1, not g2
    x2 = x1 - lr * g1 / (sq2.sqrt() + eps)
    s = settled(opt, p)
    torch.testing.assert_close(p.detach(), x2, rtol=1e-6, atol=1e-7)
    assert p.detach()[1].item() == x0[1].item()
    torch.testing.assert_close(s["square_avg"], sq2, rtol=1e-6, atol=0)
    assert torch.equal(s["cm_buffer"][1], g2) and torch.equal(s["cm_sum"], g1 + g2)


# ------------------------------------------------------------ adaptive memory

def _adam_am_p(v, step, b1, b2, eps, prod):
    return max(1 - b1 * prod, 1.1754943508222875e-38) * ((v / (1 - b2 ** step)).sqrt() + eps)


def test_adamam_first_two_steps_by_hand(backend):
    """Step 1: beta = beta1max, d = (1-beta)g/(1+lam P). Step 2: beta from the two planes,
    with prev_lr, decoupled weight decay and the product of past betas in P."""
    lr, b1, b2, eps, wd, lam = 0.05, 0.8, 0.99, 1e-8, 0.1, 0.3
    x0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    g1 = torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    g2 = torch.tensor([-1.0, -1.0, 0.25], dtype=torch.float64)  # beta ~0.61: interior
    p = torch.nn.Parameter(x0.float())
    opt = cm_fused.AdamAM([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, lam=lam,
                          backend=backend)
    p.grad = g1.float()
    opt.step()
    v1 = (1 - b2) * g1 * g1
    P1 = _adam_am_p(v1, 1, b1, b2, eps, 1.0)
    d1 = (1 - b1) * g1 / (1 + lam * P1)
    x1 = x0 * (1 - lr * wd) - lr * d1 / P1
    s = settled(opt, p)
    torch.testing.assert_close(p.detach().double(), x1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s["d"].double(), d1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s["memory"].double(),
                               torch.tensor([b1, lr, b1], dtype=torch.float64), rtol=1e-7, atol=0)
    p.grad = g2.float()
    opt.step()
    v2 = b2 * v1 + (1 - b2) * g2 * g2
    P2 = _adam_am_p(v2, 2, b1, b2, eps, b1)
    delta, R = d1 - g2, 1 + lam * P2
    W = 1 / (P2 * R)
    D = float((delta * delta * W).sum())
    M = float((delta * (g2 + lam * P2 * d1) * W).sum())
    Z = wd * float((x1 * delta).sum())
    G = (1 + wd * lr) * lr * float((g2 * (d1 / P2 + wd * x1)).sum()) / lr
    beta = min(max((G - M - Z) / D, 0.0), b1)
    assert 0 < beta < b1, beta  # an interior beta: the case is not a clip
    d2 = ((1 - beta) * g2 + (lam * P2 + beta) * d1) / R
    x2 = x1 * (1 - lr * wd) - lr * d2 / P2
    torch.testing.assert_close(s["memory"][2].double(), torch.tensor(beta, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["d"].double(), d2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.detach().double(), x2, rtol=1e-6, atol=1e-6)
    assert s["step"].item() == 2


def test_sgdam_first_two_steps_by_hand_with_one_beta_over_two_groups(backend):
    """Step 1: no direction yet, d = g, beta 0. Step 2: one beta from the sums over both
    groups (each with its own lr and weight decay), D = sum |d-g|^2,
    N = sum (1+lam)<g,d> - <d-g, g+lam d>."""
    lam, bmax = 0.2, 0.9
    xa0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    xb0 = torch.tensor([0.5], dtype=torch.float64)
    ga = [torch.tensor([0.5, 1.0]), torch.tensor([1.5, 0.0])]  # beta ~0.54: interior
    gb = [torch.tensor([2.0]), torch.tensor([0.5])]
    a, b = torch.nn.Parameter(xa0.float()), torch.nn.Parameter(xb0.float())
    opt = cm_fused.SGDAM([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.05,
                                                        "weight_decay": 0.5}],
                         lam=lam, beta_max=bmax, backend=backend)
    a.grad, b.grad = ga[0].clone(), gb[0].clone()
    opt.step()
    da, db = ga[0].double(), gb[0].double() + 0.5 * xb0
    xa1, xb1 = xa0 - 0.1 * da, xb0 - 0.05 * db
    torch.testing.assert_close(a.detach().double(), xa1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.detach().double(), xb1, rtol=1e-6, atol=1e-7)
    assert opt.last_beta()["mean"].item() == 0.0
    a.grad, b.grad = ga[1].clone(), gb[1].clone()
    opt.step()
    g2a, g2b = ga[1].double(), gb[1].double() + 0.5 * xb1
    D = sum(float(((d - g) ** 2).sum()) for d, g in ((da, g2a), (db, g2b)))
    N = sum((1 + lam) * float((g * d).sum()) - float(((d - g) * (g + lam * d)).sum())
            for d, g in ((da, g2a), (db, g2b)))
    beta = min(max(N / D, 0.0), bmax)
    assert 0 < beta < bmax, beta
    torch.testing.assert_close(opt.last_beta()["mean"].double(),
                               torch.tensor(beta, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    for p, x1, d, g, lr in ((a, xa1, da, g2a, 0.1), (b, xb1, db, g2b, 0.05)):
        d2 = (beta + lam) / (1 + lam) * d + (1 - beta) / (1 + lam) * g
        torch.testing.assert_close(settled(opt, p)["d"].double(), d2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.detach().double(), x1 - lr * d2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["adamam", "sgdam"])
def test_adaptive_lr_zero_moves_nothing_but_keeps_memory(name, backend):
    """lr = 0 (a scheduler's warm-up start): params stay, d and v still learn, and
    AdamAM's G term is 0 (not 0/0)."""
    p = param([1.0, -2.0, 0.5])
    opt = ADAPTIVE[name].cls([p], lr=0.0, weight_decay=0.1, backend=backend)
    for g in ([3.0, 0.0, -1.0], [0.5, 2.0, 1.0], [-1.0, 1.0, 4.0]):
        p.grad = torch.tensor(g)
        opt.step()
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0, 0.5]))
    assert settled(opt, p)["d"].abs().sum() > 0
    assert all(v.isfinite() for v in opt.last_beta().values())
