"""Each optimizer's reference backend against an independent float64 model of its SPEC
section (tests/spec_model.py) over long runs, and the buffer invariants every optimizer
keeps. (kappa=0 against torch is in test_matrix.py; the hand-computed quirk cases, run on
every backend, in test_spec_cases.py.)"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from compare import make_params, set_grads
from family import ADAPTIVE, FAMILY, make

# Per optimizer: the SPEC model's keywords (the optimizer takes the same ones).
SPEC_CONFIGS = {
    "adamcm": [dict(synced=True), dict(synced=False), dict(amsgrad=True, weight_decay=0.05),
               dict(topC=1, decay=0.99), dict(topC=5, decay=0.99, synced=False,
                                              weight_decay=0.01),
               dict(topC=5, decay=0.7, amsgrad=True, synced=False),
               dict(topC=3, critical_test=0.3, decay=0.9)],
    "adamcg": [dict(synced=True), dict(synced=False), dict(amsgrad=True, weight_decay=0.05),
               dict(topC=1, decay=0.99), dict(topC=4, decay=0.0, synced=False),
               dict(topC=3, critical_test=0.3, decay=0.9, weight_decay=0.01)],
    "sgdcg": [dict(synced=True), dict(momentum=0.9), dict(synced=False, momentum=0.9,
                                                          dampening=0.3, weight_decay=0.05),
              dict(topC=3, decay=0.0), dict(topC=1, decay=0.99, weight_decay=0.01),
              dict(topC=3, critical_test=0.3, momentum=0.5)],
    "rmspropcg": [dict(synced=True), dict(synced=False, momentum=0.9),
                  dict(centered=True, weight_decay=0.05, alpha=0.9),
                  dict(topC=1, decay=0.99, momentum=0.5, centered=True),
                  dict(topC=4, decay=0.0, eps=1e-4)],
}


def _ids(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("name,cfg", [pytest.param(n, c, id=f"{n}-{_ids(c)}")
                                      for n, cs in SPEC_CONFIGS.items() for c in cs])
def test_reference_matches_independent_spec_model_over_200_steps(name, cfg):
    shapes = [(7,), (3, 4), (), (1,), (33,)]
    params = make_params(shapes, seed=3)
    lr = 1e-2
    model = FAMILY[name].spec(params, lr=lr, **cfg)
    opt = make(name, "reference", lr=lr, **cfg)(params)
    missing = lambda step: {1} if step % 7 == 3 else ({3} if step % 11 == 5 else ())  # noqa
    for step in range(200):
        set_grads(params, step, seed=5, missing=missing(step))
        live = sum(p.grad is not None for p in params)
        torch.manual_seed(step)
        opt.step()
        torch.manual_seed(step)  # the optimizer's coin draws, one per tensor with a grad
        xs = model.step(torch.rand(live) if cfg.get("critical_test") else None)
    for i, (p, x) in enumerate(zip(params, xs)):
        # fp32 against fp64: the fp32 run rounds each param once a step, so up to
        # 200 steps x ulp(1) ~ 1.2e-5 absolute, whatever the magnitude of the param.
        torch.testing.assert_close(p.detach().double(), x, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"param {i}: {m}")
        s, buf = opt.state[p], model.state[i]["buf"]
        k = len(buf.slots)
        assert s["cm_count"].item() == k, f"param {i}: fill count"
        assert s["cm_inserts"].item() == buf.inserts, f"param {i}: insert count"
        assert s["step"].item() == model.steps[i], f"param {i}: step count"
        torch.testing.assert_close(s["cm_keys"][:k].double(),
                                   torch.tensor(buf.keys, dtype=torch.float64), rtol=1e-5, atol=0)
        torch.testing.assert_close(s["cm_buffer"][:k].double(), torch.stack(buf.slots),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s["cm_sum"].double(), buf.total, rtol=1e-4, atol=1e-5)


def test_the_spec_runs_replace_and_keep_slots():
    """The comparisons above are not vacuous: in a 200-step run the buffer fills, then
    slots are both replaced and kept."""
    params = make_params([(7,)], seed=3)
    opt = make("adamcg", "reference", topC=2, decay=0.9)(params)
    sums = []
    for step in range(40):
        set_grads(params, step, seed=5)
        opt.step()
        sums.append(opt.state[params[0]]["cm_buffer"].clone())
    changed = [not torch.equal(a, b) for a, b in zip(sums[2:], sums[3:])]
    assert any(changed) and not all(changed)


@pytest.mark.parametrize("name", list(FAMILY))
def test_int8_slots_hold_the_quantized_insert_and_s_sums_what_they_hold(name):
    """buffer_dtype=torch.int8 on the reference, against the SPEC: each insert writes
    the quantization of the inserted value (test_quantize.model, written independently)
    into the slot, unfilled slots stay zero, and S is the running sum of the values the
    filled slots hold (not of the values inserted). Keys come from fp32 norms, so the
    spec's choice of slot is the reference's (test above)."""
    from cm_fused.quantize import dequantize
    from test_quantize import model
    params = make_params([(300,), (3, 5), ()], seed=3)
    opt = make(name, "reference", topC=2, decay=0.9, synced=False, lr=1e-2,
               buffer_dtype=torch.int8)(params)
    inserts = 0
    for step in range(30):
        set_grads(params, step, seed=5)
        before = {p: opt.state[p]["cm_inserts"].item() if p in opt.state else 0
                  for p in params}
        opt.step()
        for p in params:
            st = opt.state[p]
            k = st["cm_count"].item()
            # the value inserted: AdamCM's new momentum (the raw gradient first), else g
            value = p.grad if name != "adamcm" or step == 0 else st["exp_avg"]
            q, scale = model(value)
            if st["cm_inserts"].item() > before[p]:
                inserts += 1
                assert any(torch.equal(st["cm_buffer"][j], q) and
                           torch.equal(st["cm_scales"][j], scale) for j in range(k))
            assert (st["cm_buffer"][k:] == 0).all() and (st["cm_scales"][k:] == 0).all()
            held = dequantize(st["cm_buffer"], st["cm_scales"])
            torch.testing.assert_close(st["cm_sum"], held[:k].sum(0), rtol=1e-5, atol=1e-5)
    assert 30 < inserts < 90  # fills, replacements and kept slots


# ------------------------------------------------------------ properties

@settings(max_examples=20, deadline=None, derandomize=True)  # same examples in every CI run
@given(
    name=st.sampled_from(list(FAMILY)),
    scales=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=25),
    top_c=st.integers(1, 4),
    decay=st.sampled_from([0.0, 0.5, 0.7, 0.99, 1.0]),
    synced=st.booleans(),
    critical=st.sampled_from([0.0, 0.5]),
)
def test_buffer_invariants(name, scales, top_c, decay, synced, critical):
    params = make_params([(4,), (2, 3)], seed=11)
    coin = dict(critical_test=critical) if "critical_test" in FAMILY[name].cls.HYPERPARAMETERS \
        else {}
    opt = make(name, "reference", topC=top_c, decay=decay, synced=synced, **coin)(params)
    key_decay = 1.0 if name == "sgdcg" and decay == 0 else decay  # SGDCG's quirk
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
                changed = (s["cm_keys"] != old * key_decay).sum().item()
                assert changed <= 1


# ------------------------------------------------------------ adaptive memory

AM_SPEC_CONFIGS = {
    "adamam": [dict(), dict(lam=0.0), dict(lam=0.5, weight_decay=0.05),
               dict(betas=(0.8, 0.99), eps=1e-6, lam=0.2, weight_decay=0.01)],
    "sgdam": [dict(), dict(lam=0.0), dict(lam=0.5, weight_decay=0.05, beta_max=0.8)],
}


@pytest.mark.parametrize("name,cfg", [pytest.param(n, c, id=f"{n}-{_ids(c)}")
                                      for n, cs in AM_SPEC_CONFIGS.items() for c in cs])
def test_adaptive_reference_matches_independent_spec_model(name, cfg):
    """100 steps, gradients missing on some: params, d and the last beta. The model
    computes P from v/(1 - beta2^t) under one square root and the sums in float64: the
    two agree only if the reference computes what the SPEC says."""
    shapes = [(7,), (3, 4), (), (1,), (33,)]
    params = make_params(shapes, seed=3)
    lr = 1e-2
    model = ADAPTIVE[name].spec(params, lr=lr, **cfg)
    opt = make(name, "reference", lr=lr, **cfg)(params)
    # tensor 2 first steps late: a fresh tensor beside stepped ones (SGDAM leaves it out
    # of the sums)
    missing = lambda step: {2} if step < 3 else (  # noqa: E731
        {1} if step % 7 == 3 else ({3} if step % 11 == 5 else ()))
    betas = []
    for step in range(100):
        set_grads(params, step, seed=5, missing=missing(step))
        opt.step()
        xs = model.step()
        if name == "sgdam":
            torch.testing.assert_close(opt.last_beta()["mean"].double(),
                                       torch.tensor(model.beta, dtype=torch.float64),
                                       rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}: {m}")
            betas.append(model.beta)
        else:
            betas += [st["beta"] for st in model.state if st is not None]
    for i, (p, x) in enumerate(zip(params, xs)):
        torch.testing.assert_close(p.detach().double(), x, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"param {i}: {m}")
        s = opt.state[p]
        torch.testing.assert_close(s["d"].double(), model.d[i] if name == "sgdam"
                                   else model.state[i]["d"], rtol=1e-4, atol=1e-5)
        if name == "adamam":
            torch.testing.assert_close(s["memory"][2].double(),
                                       torch.tensor(model.state[i]["beta"], dtype=torch.float64),
                                       rtol=1e-4, atol=1e-5)
    bmax = cfg.get("beta_max", cfg.get("betas", (0.89,))[0])
    # not vacuous: beta is interior on some steps, clipped on others
    assert any(0 < b < bmax for b in betas) and any(b in (0.0, bmax) for b in betas)


def test_adamam_with_lam_0_and_beta_pinned_is_adamw(monkeypatch):
    """docs/SPEC.md: with lam = 0 and beta fixed at beta1max, prod = beta1max^(t-1), so
    P = (1 - beta1max^t)(sqrt(v_hat) + eps) and d is Adam's m: AdamW with beta1 = beta1max.
    The test hook pins beta in the reference's decide."""
    import cm_fused.reference as reference
    monkeypatch.setattr(reference, "adam_am_beta",
                        lambda a, sums, first, prev_lr, lr: torch.tensor(a.beta1))
    params = make_params([(7,), (3, 4), ()], seed=3)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=1e-2, betas=(0.85, 0.99), eps=1e-8, weight_decay=0.05)
    opt = make("adamam", "reference", lam=0.0, **kw)(params)
    adamw = torch.optim.AdamW(twins, foreach=False, **kw)
    for step in range(50):
        set_grads(params, step, seed=5)
        set_grads(twins, step, seed=5)
        opt.step()
        adamw.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["d"], adamw.state[q]["exp_avg"], rtol=1e-5,
                                   atol=1e-7)
    assert not torch.equal(params[0].detach(), make_params([(7,)], seed=3)[0].detach())
