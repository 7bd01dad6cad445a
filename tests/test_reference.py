"""The reference backend against shared/SPEC.md over long runs: an independent float64
model, torch.optim.AdamW at kappa=0, and buffer invariants. (The hand-computed quirk cases,
run on every backend, are in test_spec_cases.py.)"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from cm_fused import AdamCM
from compare import ODD_SHAPES, make_params, run_lockstep, set_grads
from spec_model import SpecAdamCM


def ref(params, **kw):
    return AdamCM(params, backend="reference", **kw)


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
