"""Stochastic rounding of bf16/fp16 params (``stochastic_rounding=True``): the SPEC's
hash and rounding rule against an independent model in Python integers, unbiasedness,
every backend writing the reference's bits in lock step, resume, and refusals."""
import copy
import math
import struct

import pytest
import torch

from cm_fused import reference, registry, rounding
from cm_fused.contract import Variant
from compare import copy_params, make_params, op_args, set_grads, settled, through_bytes
from family import BACKENDS, EVERY, FAMILY, FUSED_BACKENDS, interpreted, make, use

NARROW = (torch.bfloat16, torch.float16)
SHAPES = [(), (1,), (4097,), (3, 5), (0,), (2, 33)]
CPU_SHAPES = SHAPES + [(40000,)]  # several of the C++ kernel's chunks, a ragged tail
STEPS = {"cpu": 24, "triton": 8, "reference": 24}


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------ the definition

def _mix(x: int) -> int:  # docs/SPEC.md, in Python integers
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2 ** 32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2 ** 32
    return x ^ (x >> 15)


def test_the_hash_is_the_specs():
    assert [_mix(v) for v in (0, 1, 2, 0xFFFFFFFF)] == [rounding.mix(v) for v in
                                                      (0, 1, 2, 0xFFFFFFFF)]
    key = rounding.tensor_key(1234, 5)
    assert key == _mix(_mix(1234) ^ 5)
    bits = rounding.element_bits(torch.tensor(key), torch.tensor(7.0), torch.tensor(2 ** 32 - 2),
                                 5)
    k = _mix(key ^ 7)
    assert bits.tolist() == [_mix(k ^ ((2 ** 32 - 2 + e) % 2 ** 32)) for e in range(5)]
    u = rounding.uniform(bits)
    assert u.tolist() == [(b >> 8) / 2 ** 24 for b in bits.tolist()]


def _neighbours(x: float, dtype):
    """The two values of ``dtype`` around x, by walking its bit patterns (model)."""
    y = torch.tensor([x]).to(dtype)
    bits = y.view(torch.int16).item() & 0xFFFF
    up = (bits + 1) if bits < 0x8000 else (bits - 1 if bits != 0x8000 else 1)
    down = (bits - 1) if 0 < bits < 0x8000 else (0x8001 if bits == 0 else bits + 1)
    as_value = lambda b: torch.tensor([b - 2 ** 16 if b >= 2 ** 15 else b],  # noqa: E731
                                      dtype=torch.int16).view(dtype).item()
    return y.item(), as_value(up), as_value(down)


@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_the_rounding_rule_is_the_specs(dtype):
    """Each element against a model in float64: the round-to-nearest value y, or its
    neighbour on x's side when u < |x − y| / |neighbour − y|."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=gen) * torch.logspace(-9, 4.5, 3000)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, -3.0, 6e-8, -6e-8, 1e-40, 65519.0,
                                    3e38, -3e38])])
    u = torch.rand(x.shape, generator=gen)
    got = rounding.stochastic_round(x, dtype, u)
    for xi, ui, gi in zip(x.tolist(), u.tolist(), got.float().tolist()):
        y, up, down = _neighbours(xi, dtype)
        if xi == y or math.isinf(y):
            want = y
        else:
            n = up if xi > y else down
            want = n if ui < abs(xi - y) / abs(n - y) else y
        assert struct.pack("f", gi) == struct.pack("f", want), (xi, ui, gi, want)
    assert (got.float() != x.to(dtype).float()).sum() > 500  # not vacuous
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")])
    out = rounding.stochastic_round(specials, dtype, torch.zeros(3))
    assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf")


@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_rounding_is_unbiased(dtype):
    """The mean of many rounded values converges to x: over 4000 steps' bits, each x's
    mean error in standard errors (z) is under 5, the z of 512 values average about 0
    with a spread about 1 (independent draws); round to nearest is biased."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(512, generator=gen) + 0.5) * 2.0 ** torch.randint(-20, 10, (512,),
                                                                        generator=gen)
    n, total = 4000, torch.zeros(512, dtype=torch.float64)
    key = torch.tensor(rounding.tensor_key(3, 9))
    for step in range(1, n + 1):
        u = rounding.uniform(rounding.element_bits(key, torch.tensor(float(step)),
                                                   torch.tensor(0), 512))
        total += rounding.stochastic_round(x, dtype, u).double()
    y, up, down = (torch.tensor(v, dtype=torch.float64)
                   for v in zip(*(_neighbours(v, dtype) for v in x.tolist())))
    xd = x.double()
    far = torch.where(xd > y, up, down)
    p = ((xd - y) / (far - y)).abs()
    sigma = (far - y).abs() * (p * (1 - p)).sqrt() / math.sqrt(n)
    z = (total / n - xd) / sigma
    assert z.abs().max() < 5 and z.mean().abs() < 0.2 and 0.8 < z.std() < 1.25, z
    assert ((y - xd).abs() > 5 * sigma).float().mean() > 0.5  # nearest is biased


# ------------------------------------------------------------ the optimizers

def _drive(opt, params, start, steps):
    for t in range(start, start + steps):
        set_grads(params, t, missing={1, 4} if t % 3 == 1 else ())
        torch.manual_seed(t)
        opt.step()


def _within_an_ulp(a, b, dtype):
    """a and b (bf16/fp16) equal, or neighbours (their bit patterns one apart)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return bool((((ia - ib).abs() <= 1) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("name,dtype,backend", interpreted(
    [(n, d, b) for n in EVERY for d in NARROW for b in FUSED_BACKENDS],
    # (fp16 on Triton: the op test below; bf16 of the other optimizers under -m slow)
    keep=lambda c: c[1] == torch.bfloat16 and c[0] in ("adamcm", "sgdam")))
def test_fused_backends_write_the_reference_bits(name, backend, dtype, request):
    """Every optimizer's "all" configuration, with a gradient missing on some steps: the
    params of every fused backend are the reference's, bit for bit, step after step, and
    so is the state; and rounding moved them off round-to-nearest's values.

    AdamAM and SGDAM: their beta comes from sums the fused kernels add in fp32 and the
    reference in fp64, so the value to round can be an fp32 ulp apart, and then its
    rounding too: there, params and state to within a bf16/fp16 ulp, nearly all equal."""
    use(backend, request)
    kw = {**EVERY[name].configs["all"], "lr": 1e-3, "stochastic_rounding": True,
          "rounding_seed": 77}
    exact = EVERY[name].buffered
    # (AdamAM/SGDAM: their fp32-summed beta drifts more over the C++ kernel's big tensor)
    params_a = make_params(CPU_SHAPES if backend == "cpu" and exact else SHAPES, dtype)
    params_b, params_n = copy_params(params_a), copy_params(params_a)
    opt_a = make(name, backend, **kw)(params_a)
    opt_b = make(name, "reference", **kw)(params_b)
    opt_n = make(name, "reference", **{**kw, "stochastic_rounding": False})(params_n)
    equal = total = 0
    for t in range(STEPS[backend]):
        for params, opt in ((params_a, opt_a), (params_b, opt_b), (params_n, opt_n)):
            set_grads(params, t, missing={1, 4} if t % 3 == 1 else ())
            torch.manual_seed(t)
            opt.step()
        for i, (pa, pb) in enumerate(zip(params_a, params_b)):
            if exact:  # (a NaN's bits are the conversion's: torch's CPU one and c10's differ;
                # centered RMSprop's fp16 state underflows to NaN, as torch's does)
                same = (pa.view(torch.int16) == pb.view(torch.int16)) | (pa.isnan() & pb.isnan())
                assert bool(same.all()), (t, i)
            else:
                assert _within_an_ulp(pa, pb, dtype), (t, i)
                equal, total = equal + int((pa == pb).sum()), total + pa.numel()
            sa, sb = settled(opt_a, pa), settled(opt_b, pb)
            for key in sa:
                narrow = sa[key].dtype == dtype and not exact  # (AM's d, cancelling)
                loose = key == "cm_keys" or not (exact or key == "step")
                torch.testing.assert_close(
                    sa[key], sb[key], rtol=(2 ** -7 if narrow else 1e-5) if loose else 0,
                    atol=1e-4 if narrow else 0, equal_nan=True,
                    msg=lambda m: f"step {t} param {i} {key}: {m}")
    assert exact or equal >= 0.99 * total, (equal, total)
    differs = sum(int((a != n).sum()) for a, n in zip(params_b, params_n))
    assert differs > 100, differs  # the rounding is not round to nearest


@pytest.mark.parametrize("dtype", NARROW, ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("variant", list(Variant), ids=lambda v: v.name)
def test_the_rounding_rows_reach_the_kernels(variant, backend, dtype, request):
    """The op itself, every variant, with rows the optimizers' runs never make: element
    offsets other than 0 (a shard's, one wrapping mod 2^32) and keys with the top bit
    set, six steps, against the reference's bits."""
    use(backend, request)
    args = op_args(variant, dtype=dtype, optional=False)
    args.lr = 0.05
    args.rounding = torch.tensor([[0xF00DFACE, 2 ** 32 - 3], [0x12345678, 123456789],
                                  [0x9E3779B9, 7]], dtype=torch.int64)
    a, b = args, copy.deepcopy(args)
    for t in range(6):
        registry.module(backend).step(a)
        reference.step(b)
        for i, (pa, pb) in enumerate(zip(a.params, b.params)):
            # (a NaN's bits are the conversion's: torch's CPU one and c10's differ)
            same = (pa.view(torch.int16) == pb.view(torch.int16)) | (pa.isnan() & pb.isnan())
            assert bool(same.all()), (t, i)


@pytest.mark.parametrize("name,backend", interpreted(
    [(n, b) for n in ("adamcm", "adamam", "sgdcg") for b in BACKENDS],
    keep=lambda c: c[0] == "adamcm"))
def test_resume_midway_is_bit_identical(name, backend, request):
    """The seed is a hyperparameter, in the checkpoint's groups: a run saved and loaded
    into a fresh optimizer after 5 steps draws what the run that went on drew."""
    use(backend, request)
    kw = {**EVERY[name].configs["all"], "stochastic_rounding": True, "rounding_seed": 5}
    steps = STEPS[backend] // 2
    params, half = make_params(SHAPES, torch.bfloat16), make_params(SHAPES, torch.bfloat16)
    _drive(make(name, backend, **kw)(params), params, 0, 2 * steps)
    first = make(name, backend, **kw)(half)
    _drive(first, half, 0, steps)
    saved = through_bytes(first.state_dict())
    assert saved["param_groups"][0]["rounding_seed"] == 5
    fresh = make(name, backend, **{**kw, "rounding_seed": 0})(half)  # the checkpoint's wins
    fresh.load_state_dict(saved)
    _drive(fresh, half, steps, steps)
    for a, b in zip(params, half):
        assert torch.equal(a, b)


def test_a_tensor_draws_by_its_position_among_all_params():
    """The keys follow the optimizer's params: a param removed from an earlier group
    moves the later ones' positions, and the next step draws with their new keys (the
    table a group's step built is not kept past such a change)."""
    ps = make_params([(64,), (64,), (64,)], torch.bfloat16)
    opt = EVERY["sgdcg"].cls([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2,
                             stochastic_rounding=True, rounding_seed=9, backend="reference")

    def keys():
        for p in ps:
            p.grad = torch.full_like(p, 0.3)
        opt.step()
        tables = [opt._runner._lists[id(g)]["__rounding__"][1] for g in opt.param_groups]
        return [int(k) for t in tables for k in t[:, 0]]

    assert keys() == [rounding.tensor_key(9, i) for i in range(3)]
    opt.param_groups[0]["params"].pop(0)
    assert keys() == [rounding.tensor_key(9, i) for i in range(2)]


def test_the_seed_and_the_tensor_change_the_bits():
    kw = dict(lr=1e-2, stochastic_rounding=True, backend="reference")
    outs = []
    for seed in (0, 1):
        params = make_params([(64,), (64,)], torch.bfloat16)
        params[1].data.copy_(params[0].data)
        opt = EVERY["sgdcg"].cls(params, rounding_seed=seed, **kw)
        for p in params:
            p.grad = torch.full_like(p, 0.3)
        opt.step()
        outs.append(params)
    assert not torch.equal(outs[0][0], outs[1][0])  # another seed
    assert not torch.equal(outs[0][0], outs[0][1])  # another tensor, the same values


@pytest.mark.parametrize("name", list(EVERY))
def test_refusals(name):
    cls = EVERY[name].cls
    p32 = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="stochastic_rounding=True rounds bf16 and fp16"):
        cls([p32], stochastic_rounding=True, backend="reference")
    pb = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    opt = cls([pb], stochastic_rounding=True, backend="reference")
    with pytest.raises(ValueError, match="float32"):
        opt.add_param_group({"params": [p32]})
    assert len(opt.param_groups) == 1
    for seed in (-1, 2 ** 32, 1.5, True):
        with pytest.raises(ValueError, match="rounding_seed"):
            cls([pb], rounding_seed=seed, backend="reference")
    # a param turned fp32 after construction: refused at the step, nothing changed
    pb.data = pb.data.float()
    pb.grad = torch.ones(3)
    with pytest.raises(ValueError, match="float32"):
        opt.step()
    assert not opt.state
    if name in FAMILY:
        with pytest.raises(ValueError, match="kappa"):
            cls([pb], stochastic_rounding=True, kappa=0.0, backend="reference")
