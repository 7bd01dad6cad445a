"""8-bit moments (``state_dtype=torch.int8``) and int8 slots without a running sum:
the e4m3 codes against torch's float8 conversion, the blockwise quantizer against a
per-block model written from docs/SPEC.md, every optimizer's step against its
full-precision twin fed the values the codes hold, the fused backends against the
reference, checkpoints (resume, conversion both ways, refusals), and the memory it
saves."""
import io
import math

import pytest
import torch

from compare import OTHER_KERNEL_BUILDS, copy_params, make_params, run_on_kernels, set_grads
from family import ADAPTIVE, EVERY, FAMILY, require, use
from cm_fused.quantize import (QBLOCK, dequantize, dequantize_moment, e4m3_code,
                               e4m3_value, quantize_moment, slot_sum)

INT8 = torch.int8
MIN = 100  # min_8bit_size of the tests: the shapes below fall on both sides of it
SHAPES = [(), (7,), (300,), (17, 40), (4097,), (0,), (99,), (100,)]


# ---------------------------------------------------------------- the codes

def test_e4m3_code_is_torchs_float8_e4m3fn_conversion():
    """Every code's value, every midpoint between two codes (ties go to the even code)
    and its neighbours, random values over the whole range and the subnormal range."""
    codes = torch.arange(127, dtype=torch.int32)
    values = e4m3_value(codes)
    assert torch.equal(values, codes.to(torch.uint8).view(torch.float8_e4m3fn).float())
    mids = (values[:-1] + values[1:]) / 2  # exact in fp32 (5 significant bits)
    up, down = mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(0.0))
    g = torch.Generator().manual_seed(0)
    y = torch.cat([values, mids, up, down, torch.rand(100000, generator=g) * 448,
                   torch.rand(100000, generator=g) * 2 ** -6])
    want = y.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    assert torch.equal(e4m3_code(y), want)
    even = e4m3_code(mids)
    assert torch.equal(even % 2, torch.zeros_like(even)), "ties go to the even code"


def _model(x: torch.Tensor, second: bool):
    """docs/SPEC.md's quantizer, one block at a time in Python, with torch's float8 cast
    as E (tested above)."""
    flat = x.reshape(-1).float()
    codes = torch.zeros(flat.numel(), dtype=torch.uint8)
    scales = []
    for b in range(0, flat.numel(), QBLOCK):
        blk = flat[b:b + QBLOCK]
        if not bool(torch.isfinite(blk).all()):
            scales.append(float("nan"))
            continue
        mag = torch.tensor([math.sqrt(v) for v in blk.double().tolist()]).float() \
            if second else blk.abs()
        scale = (mag.max() / 448.0).item()
        scales.append(scale)
        if not scale > 0:
            continue
        for e in range(blk.numel()):
            c = int((mag[e].abs() / torch.tensor(scale)).clamp(max=448.0)
                    .to(torch.float8_e4m3fn).view(torch.uint8))
            if second and c == 0 and mag[e] > 0:
                c = 1
            if not second and c and blk[e] < 0:
                c |= 0x80
            codes[b + e] = c
    return codes.view(x.shape), torch.tensor(scales, dtype=torch.float32)


@pytest.mark.parametrize("second", [False, True], ids=["momentum", "second"])
def test_quantizer_is_the_per_block_model(second):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7 * QBLOCK + 37, generator=g) * torch.logspace(-12, 3, 7 * QBLOCK + 37)
    if second:
        x = x * x
    blocks = x.view(-1)
    blocks[QBLOCK:2 * QBLOCK] = 0.0                           # an all-zero block
    blocks[2 * QBLOCK + 3] = float("nan")                     # a non-finite block
    blocks[5 * QBLOCK + 9] = float("inf")                     # another
    # the momentum's scale underflows to 0; a second moment's root cannot be that small
    blocks[3 * QBLOCK:4 * QBLOCK] = 1e-44 if second else -1e-43
    blocks[4 * QBLOCK + 5] = -0.0
    # magnitudes far below the block's largest: codes round to 0 (a second moment's to 1)
    blocks[6 * QBLOCK] = 1e10 if second else -1e5
    blocks[6 * QBLOCK + 1:6 * QBLOCK + 4] = 1e-12 if second else -1e-7
    codes, scales = quantize_moment(x, second)
    want_codes, want_scales = _model(x, second)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert torch.equal(codes, want_codes)
    torch.testing.assert_close(scales, want_scales, rtol=0, atol=0, equal_nan=True)
    held = dequantize_moment(codes, scales, second)
    assert held[2 * QBLOCK:3 * QBLOCK].isnan().all(), "a non-finite block reads as NaN"
    assert held[5 * QBLOCK:6 * QBLOCK].isnan().all()
    tiny = held[6 * QBLOCK + 1:6 * QBLOCK + 4]
    assert (tiny > 0).all() if second else (tiny == 0).all()
    assert (held[QBLOCK:2 * QBLOCK] == 0).all()
    assert second or (held[3 * QBLOCK:4 * QBLOCK] == 0).all()
    fine = torch.ones_like(x, dtype=torch.bool)
    fine[QBLOCK:3 * QBLOCK] = False
    fine[3 * QBLOCK:4 * QBLOCK] = second
    fine[5 * QBLOCK:6 * QBLOCK] = False
    # each value within the code's precision (3 mantissa bits) of the block's normal range
    scale_of = scales.repeat_interleave(QBLOCK)[:x.numel()]
    mag = x.sqrt() if second else x.abs()
    normal = fine & (mag >= scale_of * 2 ** -6)
    got = held.sqrt() if second else held
    rel = ((got - (mag if second else x)).abs() / mag)[normal]
    assert rel.max() <= 2 ** -4 * (1 + 1e-6)
    if second:  # a positive second moment never reads as 0
        assert (held[fine & (x > 0)] > 0).all()
    else:
        assert (torch.sign(held[fine & (held != 0)]) == torch.sign(x[fine & (held != 0)])).all()


# ---------------------------------------------------------------- the step

def _moment_keys(opt, group):
    roles = opt.spec.roles(group)
    return [(k, second) for k, second in ((roles.momenta, False), (roles.second_moments, True))
            if k is not None]


def _feed_twin(opt8, twin, params8, params):
    """The twin's moments := the values opt8's codes hold (and, where opt8 keeps no
    running sum, the twin's S := the sum of its slots, as the update reads it)."""
    group = opt8.param_groups[0]
    for p8, p in zip(params8, params):
        st8, st = opt8.state.get(p8), twin.state.get(p)
        if not st8:
            continue
        for key, second in _moment_keys(opt8, group):
            if st8[key].dtype == torch.uint8:
                st[key].copy_(dequantize_moment(st8[key], st8["moment_scales"][int(second)],
                                                second))
        if "cm_sum" in st and "cm_sum" not in st8:  # slot 0 first, then each in turn
            held = dequantize(st["cm_buffer"], st["cm_scales"])
            total = held[0].clone()
            for j in range(1, held.shape[0]):
                total = total + held[j]
            st["cm_sum"].copy_(total)


def _check_against_twin(opt8, twin, params8, params, what):
    group = opt8.param_groups[0]
    for i, (p8, p) in enumerate(zip(params8, params)):
        assert torch.equal(p8, p) or (p8.isnan().any() and torch.allclose(
            p8, p, rtol=0, atol=0, equal_nan=True)), f"{what}: param {i}"
        assert not p8.isnan().any(), f"{what}: param {i} is NaN"
        st8, st = opt8.state.get(p8), twin.state.get(p)
        if not st8:
            continue
        for key, second in _moment_keys(opt8, group):
            if p.numel() < MIN:
                assert torch.equal(st8[key], st[key]), f"{what}: {key} of param {i}"
                continue
            codes, scales = quantize_moment(st[key], second)
            assert torch.equal(st8[key], codes), f"{what}: {key} codes of param {i}"
            assert torch.equal(st8["moment_scales"][int(second)], scales), \
                f"{what}: {key} scales of param {i}"
        for key in ("cm_buffer", "cm_keys", "cm_scales", "max_exp_avg_sq", "grad_avg"):
            if key in st:
                assert torch.equal(st8[key], st[key]), f"{what}: {key} of param {i}"


SLOTS = {"fp32": {}, "int8_no_sum": dict(buffer_dtype=INT8, topC=3),
         "int8_sum": dict(buffer_dtype=INT8, topC=9)}
# (RMSpropCG's "all" is centered, which 8-bit moments refuse: its "momentum" instead)
STEP_CASES = [pytest.param(n, c, s, id=f"{n}-{c}-{s}") for n in EVERY
              for c in ("defaults", "momentum" if n == "rmspropcg" else "all")
              for s in (SLOTS if n in FAMILY else ("fp32",))]


@pytest.mark.parametrize("name,config,slots", STEP_CASES)
def test_the_step_is_the_full_precision_step_on_the_held_values(name, config, slots):
    """docs/SPEC.md: the step reads a moment as the values its codes hold, computes as
    with full-precision state, and writes the new value back quantized. Its twin (no
    8-bit state) is given those values before every step: the params must agree to the
    bit, and the codes must be the twin's new moments quantized. Many steps with an lr
    schedule, a missing gradient, sizes on both sides of min_8bit_size."""
    kw = {**EVERY[name].configs[config], **SLOTS[slots]}
    cls = EVERY[name].cls
    params8 = make_params(SHAPES)
    params = copy_params(params8)
    opt8 = cls(params8, backend="reference", state_dtype=INT8, min_8bit_size=MIN, **kw)
    twin = cls(params, backend="reference", **kw)
    if slots == "int8_no_sum":
        assert all("cm_sum" not in opt8.state[p] for p in params8 if opt8.state.get(p))
    base = [g["lr"] for g in opt8.param_groups]
    for t in range(14):
        for opt in (opt8, twin):
            for g, lr in zip(opt.param_groups, base):
                if not isinstance(lr, torch.Tensor):
                    g["lr"] = lr * (1 + 0.5 * math.cos(t))  # a schedule
        missing = (lambda s: {2} if s % 4 == 3 else set())(t)
        set_grads(params8, t, missing=missing)
        set_grads(params, t, missing=missing)
        _feed_twin(opt8, twin, params8, params)
        torch.manual_seed(t)  # (the same critical_test coins)
        opt8.step()
        torch.manual_seed(t)
        twin.step()
        _check_against_twin(opt8, twin, params8, params, f"{name} {config} {slots} step {t}")
    if slots == "int8_no_sum":
        assert all("cm_sum" not in opt8.state[p] for p in params8 if opt8.state.get(p))
    if slots == "int8_sum":
        assert all("cm_sum" in opt8.state[p] for p in params8 if opt8.state.get(p))


# The fused backends against the reference, in lock step: every variant they step 8-bit
# moments of (the critical-buffer ones). The C++ kernel: one tensor of several of its
# 16384-element chunks, its 256-element blocks cut short at a tensor's end.
CPU_SHAPES = [*SHAPES, (40000,)]
# The Triton kernels (interpreted on the CPU: small tensors), whose programs are chunks of
# 1024 elements (the small_chunks fixture): 1100 = a chunk and a short one, 666 and 300
# blocks cut short, 7 and 99 below min_8bit_size. The same roles at the same positions
# as CPU_SHAPES (3: subnormal scales, 4: a non-finite block, 8: SPREAD).
TRITON_SHAPES = [(), (7,), (300,), (17, 40), (1100,), (0,), (99,), (100,), (2, 333)]
# (codes that round to 0: the momentum's stay 0 whatever their sign, the second
# moment's are raised to 1)
SPREAD = 10.0 ** (-2.5 * (torch.arange(40000) % 5))


def _lockstep_cases(default) -> list:
    """pytest params (name, config, slots, dtype) of every critical-buffer variant in its
    defaults and its richest configuration, every slot layout, fp32 and bf16 params;
    marked slow unless ``default(name, config, slots, dtype)``."""
    return [pytest.param(n, c, s, d, id=f"{n}-{c}-{s}-{str(d)[6:]}",
                         marks=() if default(n, c, s, d) else pytest.mark.slow)
            for n in FAMILY for c in ("defaults", "momentum" if n == "rmspropcg" else "all")
            for s in SLOTS for d in (torch.float32, torch.bfloat16)]


# (by default each variant's richest configuration in fp32 with every slot layout and in
# bf16 without the running sum, and its defaults all-8-bit in fp32: without amsgrad, the
# C++ encoder takes the second moments' roots from the update; the rest under -m slow:
# the reference's side is slow)
CPU_CASES = _lockstep_cases(
    lambda n, c, s, d: (d == torch.float32 or s == "int8_no_sum") if c != "defaults"
    else (s == "int8_no_sum" and d == torch.float32))
# (interpreted: by default each variant once, every slot layout and both dtypes among
# them, ~3 s each; the rest under -m slow)
TRITON_CASES = _lockstep_cases(lambda *case: case in {
    ("adamcm", "all", "int8_no_sum", torch.float32),
    ("adamcg", "all", "fp32", torch.float32), ("sgdcg", "all", "int8_sum", torch.bfloat16),
    ("rmspropcg", "momentum", "int8_no_sum", torch.bfloat16)})


def _near_boundaries(qmax: float, absmax: float, seed: int) -> torch.Tensor:
    """A block of QBLOCK values, the largest magnitude ``absmax``, the others within six
    ulps of a rounding boundary of the block's quantizer (qmax 448: midpoints between two
    e4m3 codes of the magnitude; 127: the int8 slots' k + 1/2), chosen where the product
    with the scale's reciprocal rounds to another code than the quotient by the scale,
    which the reference takes: a kernel that multiplies instead gets each of them wrong."""
    scale = torch.tensor(absmax) / qmax
    if qmax == 448.0:
        values = e4m3_value(torch.arange(127, dtype=torch.int32))
        mids = (values[:-1] + values[1:]) / 2

        def code(t):
            return t.abs().clamp(max=448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        mids = torch.arange(-127, 127).float() + 0.5

        def code(t):
            return t.round().clamp(-127, 127)
    x, near = mids * scale, [mids * scale]
    for direction in (float("inf"), float("-inf")):
        step = x
        for _ in range(6):
            step = step.nextafter(torch.tensor(direction))
            near.append(step)
    x = torch.cat(near)
    x = x[(x.abs() <= absmax) & (code(x / scale) != code(x * (1 / scale)))]
    assert x.numel() >= 20, "too few values at a boundary to test"
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(x.numel(), generator=g)][:QBLOCK - 1]
    if qmax == 448.0:  # both signs of the momentum
        x = torch.where(torch.rand(x.shape, generator=g) < 0.5, -x, x)
    return torch.cat([torch.tensor([absmax]), x, torch.zeros(QBLOCK - 1 - x.numel())])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name,kw", [("sgdcg", dict(momentum=0.9)),
                                     ("rmspropcg", dict(alpha=0.0, momentum=0.9))])
def test_codes_at_rounding_boundaries_are_the_references(backend, name, kw):
    """Quotients by a block's scale at a rounding boundary (see _near_boundaries) give the
    reference's codes: the first step stores the gradient as SGD's momentum and in the
    first int8 slot, and RMSprop with alpha 0 its square, whose root is what is encoded.
    (Multiplying by the scale's reciprocal is the tempting shortcut: docs/SPEC.md defines
    the quotient, and random values meet such boundaries a few times in a million.)"""
    require(backend)
    g = torch.cat([_near_boundaries(448.0, 3.7, 0), _near_boundaries(127.0, 0.3, 1),
                   _near_boundaries(448.0, 1e-5, 2), _near_boundaries(127.0, 77.3, 3),
                   torch.randn(37, generator=torch.Generator().manual_seed(4))])
    cls = FAMILY[name].cls
    p_test = [torch.nn.Parameter(torch.zeros_like(g))]
    p_ref = copy_params(p_test)
    opts = [cls(ps, backend=b, lr=1e-3, state_dtype=INT8, buffer_dtype=INT8, topC=3,
                min_8bit_size=0, **kw) for ps, b in ((p_test, backend), (p_ref, "reference"))]
    for ps, opt in zip((p_test, p_ref), opts):
        ps[0].grad = g.clone()
        opt.step()
    assert opts[0].backends_in_use == {"cpu": backend}
    st_a, st_b = opts[0].state[p_test[0]], opts[1].state[p_ref[0]]
    assert st_a.keys() == st_b.keys()
    for k, v in st_a.items():
        if isinstance(v, torch.Tensor) and k != "cm_keys":
            assert _state_equal(v, st_b[k]), k
    assert _state_equal(p_test[0], p_ref[0])


def _state_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and (
        torch.equal(a, b) or (a.is_floating_point() and bool(torch.isnan(a).any())
                              and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)))


# A quiet NaN with the sign bit set, as x86 makes them (0 * inf), per gradient dtype: its
# square and root keep the sign (a Python -nan loses it in a cast to bf16).
_NEGATIVE_NAN = {torch.float32: (torch.int32, -0x400000), torch.bfloat16: (torch.int16, -0x40)}


def _non_finite(g: torch.Tensor) -> None:
    """An infinity in g's second block and a negative NaN in its last."""
    g[300] = float("inf")
    bits, pattern = _NEGATIVE_NAN[g.dtype]
    g.view(-1)[-5:-4].view(bits).fill_(pattern)
    assert g.view(-1)[-5].isnan()


def _lockstep_with_reference(backend, name, config, slots, dtype, shapes, steps,
                             resume_at=None):
    """``backend`` writes the reference's bytes: params, codes, moment scales, slots,
    slot scales, counts, after every step (an lr schedule, missing gradients, a step
    skipped by found_inf, an infinite gradient in the one but last; ``resume_at``: its
    optimizer is replaced by a new one loading its checkpoint before that step)."""
    require(backend)
    kw = {**FAMILY[name].configs[config], **SLOTS[slots]}
    cls = FAMILY[name].cls
    p_test = make_params(shapes, dtype=dtype)
    p_ref = copy_params(p_test)

    def new(ps, b):
        return cls(ps, backend=b, state_dtype=INT8, min_8bit_size=MIN, **kw)

    opts = [new(p_test, backend), new(p_ref, "reference")]
    base = opts[0].param_groups[0]["lr"]
    for t in range(steps):
        if t == resume_at:
            sd = _roundtrip(opts[0].state_dict())
            opts[0] = new(p_test, backend)
            opts[0].load_state_dict(sd)
        missing = {2, 8} if t % 4 == 3 else ({5} if t % 5 == 1 else set())
        skip = t == steps - 5
        for opt, ps in zip(opts, (p_test, p_ref)):
            if not isinstance(base, torch.Tensor):
                opt.param_groups[0]["lr"] = base * (1 + 0.5 * math.cos(t))
            set_grads(ps, t, missing=missing)
            if ps[8].grad is not None:  # magnitudes 10 decades apart in every block
                ps[8].grad *= SPREAD[:ps[8].numel()].view(ps[8].shape).to(dtype)
            if ps[3].grad is not None:  # subnormal momentum scales: |x| / scale > 448
                ps[3].grad *= 3e-42
            if t == steps - 2:  # non-finite blocks: NaN scales, zero codes (docs/SPEC.md)
                _non_finite(ps[4].grad)
            if skip:
                opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
            torch.manual_seed(t)  # (the same critical_test coins)
            opt.step()
            if skip:
                opt.grad_scale = opt.found_inf = None
        assert opts[0].backends_in_use == {"cpu": backend}
        for i, (a, b) in enumerate(zip(p_test, p_ref)):
            assert _state_equal(a, b), f"step {t}: param {i}"
            st_a, st_b = opts[0].state.get(a, {}), opts[1].state.get(b, {})
            assert st_a.keys() == st_b.keys(), f"step {t}: param {i}"
            for k, v in st_a.items():
                if k == "cm_keys":  # (the fused norms sum in another order: ulps apart)
                    torch.testing.assert_close(v, st_b[k], rtol=1e-5, atol=0, equal_nan=True)
                elif isinstance(v, torch.Tensor):
                    assert _state_equal(v, st_b[k]), f"step {t}: {k} of param {i}"
    st = opts[0].state[p_test[-1]]
    assert "moment_scales" in st or (name == "sgdcg" and "momentum" not in kw)
    assert ("cm_sum" in st) == (slots != "int8_no_sum")


@pytest.mark.parametrize("name,config,slots,dtype", CPU_CASES)
def test_cpu_steps_8bit_moments_as_the_reference(name, config, slots, dtype):
    _lockstep_with_reference("cpu", name, config, slots, dtype, CPU_SHAPES, 14)


@pytest.mark.parametrize("name,config,slots,dtype", TRITON_CASES)
def test_triton_steps_8bit_moments_as_the_reference(small_chunks, name, config, slots,
                                                    dtype):
    """(and resumes from a checkpoint midway with the same bytes)"""
    _lockstep_with_reference("triton", name, config, slots, dtype, TRITON_SHAPES, 8,
                             resume_at=4)


@pytest.mark.parametrize("capability", OTHER_KERNEL_BUILDS)
def test_other_kernel_builds_step_8bit_state_as_the_reference(capability):
    """The kernel builds this process does not run (forced with ATEN_CPU_CAPABILITY in a
    subprocess; the portable one's codecs run on at::vec's generic vectors): the lock step
    of each critical-buffer variant with int8 slots, without and with the running sum (AdamCM without amsgrad: the roots from the update; AdamCG with
    it), and AdamAM/SGDAM each step from the reference's state."""
    require("cpu")
    run_on_kernels(capability, """
        import test_moments8 as t
        configs = dict(adamcm="defaults", adamcg="all", sgdcg="all", rmspropcg="momentum")
        for name, config in configs.items():
            for slots in ("int8_no_sum", "int8_sum"):
                t._lockstep_with_reference("cpu", name, config, slots, torch.float32,
                                           t.CPU_SHAPES, 6)
        for name in t.ADAPTIVE:
            t._am_steps_from_the_reference_state("cpu", name, "all", torch.float32,
                                                 t.CPU_SHAPES, 4)
        print("OK")
    """)


# Adaptive memory on the fused backends: its beta comes from sums over whole tensors,
# which the kernels add in another order than the reference (ulps apart, as with
# full-precision state), so a new moment can land on the other side of a code's rounding
# boundary, and over many steps the two trajectories part. Each step therefore starts
# the backend from the reference's state, and must end in the reference's: params and
# scales to fp32 rounding, codes to the bit but for such boundaries (one code step, a
# few elements in ten thousand).
AM_CASES = [pytest.param(n, c, d, id=f"{n}-{c}-{str(d)[6:]}",
                         marks=() if d == torch.float32 else pytest.mark.slow)
            for n in ADAPTIVE for c in ("defaults", "all") for d in (torch.float32, torch.bfloat16)]
# (interpreted: by default each variant once, in bf16 and fp32 between them)
TRITON_AM_CASES = [pytest.param(*p.values, id=p.id, marks=() if p.id in {
    "adamam-all-float32", "sgdam-all-bfloat16"} else pytest.mark.slow) for p in AM_CASES]


def _signed_codes(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int32)
    return torch.where((c & 0x80) != 0, -(c & 0x7F), c & 0x7F)


def _am_steps_from_the_reference_state(backend, name, config, dtype, shapes, steps):
    """``steps`` steps (an lr schedule, missing gradients, magnitudes 10 decades apart in
    every block of tensor 8, a step skipped by found_inf, an infinite gradient in tensor
    4 in the last), each from the reference's state: ``backend`` must end each in the
    reference's (the step it skips to the bit). Returns (codes a step apart, codes)."""
    require(backend)
    cls, kw = ADAPTIVE[name].cls, ADAPTIVE[name].configs[config]
    p_ref = make_params(shapes, dtype=dtype)
    p_test = copy_params(p_ref)
    ref, test = (cls(ps, backend=b, state_dtype=INT8, min_8bit_size=MIN, **kw)
                 for ps, b in ((p_ref, "reference"), (p_test, backend)))
    base = ref.param_groups[0]["lr"]
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    moments = {k for k, _ in _moment_keys(ref, ref.param_groups[0])}
    flips = codes = 0
    for t in range(steps):
        with torch.no_grad():
            for a, b in zip(p_test, p_ref):
                a.copy_(b)
        test.load_state_dict(_roundtrip(ref.state_dict()))
        missing = {2, 8} if t % 4 == 3 else set()
        skip = t == steps - 3
        for opt, ps in ((ref, p_ref), (test, p_test)):
            if not isinstance(base, torch.Tensor):
                opt.param_groups[0]["lr"] = base * (1 + 0.5 * math.cos(t))
            set_grads(ps, t, missing=missing)
            if ps[8].grad is not None:  # magnitudes 10 decades apart in every block
                ps[8].grad *= SPREAD[:ps[8].numel()].view(ps[8].shape).to(dtype)
            if t == steps - 1:  # non-finite blocks: NaN scales, zero codes (docs/SPEC.md)
                _non_finite(ps[4].grad)
            if skip:
                opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
            opt.step()
            if skip:
                opt.grad_scale = opt.found_inf = None
        assert test.backends_in_use == {"cpu": backend}
        for i, (a, b) in enumerate(zip(p_test, p_ref)):
            if skip:  # nothing written: both still hold the state they started from
                assert _state_equal(a, b), f"step {t}: param {i}"
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * 1e-2, equal_nan=True,
                                       msg=lambda m: f"step {t} param {i}: {m}")
            st_a, st_b = test.state.get(a, {}), ref.state.get(b, {})
            assert st_a.keys() == st_b.keys(), f"step {t}: param {i}"
            for k, v in st_a.items():
                if skip:
                    assert _state_equal(v, st_b[k]), f"step {t}: {k} of param {i}"
                if v.dtype == torch.uint8:
                    step = (_signed_codes(v) - _signed_codes(st_b[k])).abs()
                    assert step.numel() == 0 or int(step.max()) <= 1, f"step {t}: {k} of param {i}"
                    flips += int(step.sum())
                    codes += v.numel()
                elif k in moments:  # (a tensor below min_8bit_size: the param's dtype)
                    # beta's error is the sums', relative to the tensor's largest terms:
                    # where (1 - beta) g and beta d nearly cancel, the element's own
                    # relative error is larger
                    largest = float(st_b[k].abs().amax()) if v.numel() else 0.0
                    torch.testing.assert_close(v, st_b[k], rtol=rtol, atol=rtol * largest,
                                               equal_nan=True,
                                               msg=lambda m: f"step {t} {k} param {i}: {m}")
                else:
                    torch.testing.assert_close(v, st_b[k], rtol=1e-5, atol=0, equal_nan=True,
                                               msg=lambda m: f"step {t} {k} param {i}: {m}")
    assert "moment_scales" in test.state[p_test[-1]]
    assert flips <= 1e-3 * codes, f"{flips} of {codes} codes a step apart"
    return flips, codes


@pytest.mark.parametrize("name,config,dtype", AM_CASES)
def test_cpu_steps_adaptive_memory_8bit_moments_as_the_reference(name, config, dtype):
    _am_steps_from_the_reference_state("cpu", name, config, dtype, CPU_SHAPES, 10)


@pytest.mark.parametrize("name,config,dtype", TRITON_AM_CASES)
def test_triton_steps_adaptive_memory_8bit_moments_as_the_reference(small_chunks, name,
                                                                    config, dtype):
    _am_steps_from_the_reference_state("triton", name, config, dtype, TRITON_SHAPES, 8)


@pytest.mark.parametrize("top_c,state_dtype,buffer_dtype,kept", [
    (8, INT8, INT8, False), (9, INT8, INT8, True), (1, INT8, INT8, False),
    (8, None, INT8, True), (8, INT8, None, True), (8, INT8, torch.bfloat16, True)])
def test_which_buffers_keep_a_running_sum(top_c, state_dtype, buffer_dtype, kept):
    """docs/SPEC.md: none with 8-bit moments, int8 slots and topC <= 8."""
    params = make_params([(300,), (3,)])
    opt = FAMILY["adamcg"].cls(params, backend="reference", topC=top_c, min_8bit_size=MIN,
                               state_dtype=state_dtype, buffer_dtype=buffer_dtype)
    _run(opt, params, 1)
    assert all(("cm_sum" in opt.state[p]) == kept for p in params)


@pytest.mark.parametrize("name,backend", [(n, b) for n in EVERY for b in ("reference", "cpu")])
def test_a_skipped_step_changes_no_code(name, backend):
    require(backend)
    cls = EVERY[name].cls
    params = make_params([(700,), (3,)])
    opt = cls(params, backend=backend, state_dtype=INT8, min_8bit_size=MIN,
              **EVERY[name].configs["defaults"])
    for t in range(3):
        set_grads(params, t)
        opt.step()
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    p_before = [p.detach().clone() for p in params]
    set_grads(params, 3)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(a, b) for a, b in zip(params, p_before))


def test_bf16_params_keep_8bit_moments_and_train():
    """bf16 params: the moments are codes (not bf16), and AdamCM still descends a
    quadratic as it does with bf16 moments."""
    losses = {}
    for state_dtype in (None, INT8):
        torch.manual_seed(0)
        target = torch.randn(4096)
        p = torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16))
        opt = FAMILY["adamcm"].cls([p], lr=1e-2, backend="reference", state_dtype=state_dtype)
        for _ in range(150):
            p.grad = (p.float() - target).bfloat16()
            opt.step()
        losses[state_dtype] = ((p.float() - target) ** 2).mean().item()
        want = torch.uint8 if state_dtype else torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == want
    assert losses[INT8] < 0.05 and losses[INT8] < 2 * losses[None] + 1e-3, losses


# ---------------------------------------------------------------- checkpoints

def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        set_grads(params, t)
        opt.step()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


RESUMES = [("adamcm", dict(buffer_dtype=INT8, topC=3)), ("adamcg", dict(amsgrad=True)),
           ("rmspropcg", dict(momentum=0.5, weight_decay=0.01)), ("sgdam", dict(lr=1e-2)),
           ("adamam", {})]


@pytest.mark.parametrize("name,kw,backend", [(n, k, "reference") for n, k in RESUMES] + [
    ("adamcm", dict(buffer_dtype=INT8, topC=3), "cpu"), ("adamcm", {}, "cpu"),
    ("sgdcg", dict(momentum=0.9, buffer_dtype=INT8, topC=9), "cpu"), ("adamam", {}, "cpu"),
    ("sgdam", dict(lr=1e-2), "cpu"),
    # (interpreted, 7-13 s each: under -m slow. By default each step of the adaptive
    # lock-step test resumes from the reference's checkpoint, and the critical-buffer
    # variants resume midway in theirs.)
    *(pytest.param(n, k, "triton", marks=pytest.mark.slow)
      for n, k in (("adamam", {}), ("sgdam", dict(lr=1e-2))))],
    ids=lambda v: v if isinstance(v, str) else "")
def test_resume_midway_is_bit_identical(request, name, kw, backend):
    use(backend, request)
    cls = EVERY[name].cls
    p_full, p_a = make_params(SHAPES), make_params(SHAPES)
    full = cls(p_full, backend=backend, state_dtype=INT8, min_8bit_size=MIN, **kw)
    first = cls(p_a, backend=backend, state_dtype=INT8, min_8bit_size=MIN, **kw)
    _run(full, p_full, 10)
    _run(first, p_a, 5)
    sd = _roundtrip(first.state_dict())
    p_b = copy_params(p_a)
    second = cls(p_b, backend=backend, state_dtype=INT8, min_8bit_size=MIN, **kw)
    second.load_state_dict(sd)
    _run(second, p_b, 5, start=5)
    for a, b in zip(p_full, p_b):
        assert torch.equal(a, b)
    for a, b in zip(p_full, p_b):
        for k, v in full.state.get(a, {}).items():
            assert torch.equal(v, second.state[b][k]), k


def test_a_full_precision_checkpoint_loads_into_8bit_state_and_back():
    """The optimizer's state_dtype wins over the checkpoint's: moments are quantized (or
    dequantized, exactly), the running sum dropped (or summed from the slots)."""
    kw = dict(buffer_dtype=INT8, topC=3)
    params = make_params(SHAPES)
    fp = FAMILY["adamcm"].cls(params, backend="reference", **kw)
    _run(fp, params, 6)
    sd = _roundtrip(fp.state_dict())
    p8 = copy_params(params)
    opt8 = FAMILY["adamcm"].cls(p8, backend="reference", state_dtype=INT8, min_8bit_size=MIN,
                                **kw)
    opt8.load_state_dict(sd)
    assert opt8.param_groups[0]["state_dtype"] == INT8
    for p, q in zip(params, p8):
        st, st8 = fp.state[p], opt8.state[q]
        if q.numel() >= MIN:
            for key, second in (("exp_avg", False), ("exp_avg_sq", True)):
                codes, scales = quantize_moment(st[key], second)
                assert torch.equal(st8[key], codes) and \
                    torch.equal(st8["moment_scales"][int(second)], scales)
        else:
            assert torch.equal(st8["exp_avg"], st["exp_avg"]) and "moment_scales" not in st8
        assert "cm_sum" not in st8
    _run(opt8, p8, 2, start=6)  # it steps from there

    back = FAMILY["adamcm"].cls(copy_params(p8), backend="reference", **kw)
    back.load_state_dict(_roundtrip(opt8.state_dict()))
    assert back.param_groups[0]["state_dtype"] is None
    for q, r in zip(p8, back.param_groups[0]["params"]):
        st8, st = opt8.state[q], back.state[r]
        assert "moment_scales" not in st and st["exp_avg"].dtype == torch.float32
        if q.numel() >= MIN:
            assert torch.equal(st["exp_avg_sq"], dequantize_moment(
                st8["exp_avg_sq"], st8["moment_scales"][1], True))
        assert torch.equal(st["cm_sum"], slot_sum(st8["cm_buffer"], st8["cm_scales"]))
    _run(back, back.param_groups[0]["params"], 2, start=8)


def test_a_checkpoint_of_codes_without_scales_is_refused_and_changes_nothing():
    params = make_params([(300,)])
    opt = FAMILY["adamcm"].cls(params, backend="reference", state_dtype=INT8, min_8bit_size=MIN)
    _run(opt, params, 2)
    sd = opt.state_dict()
    del sd["state"][0]["moment_scales"]
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises(ValueError, match="moment_scales"):
        opt.load_state_dict(sd)
    assert all(torch.equal(v, before[k]) for k, v in opt.state[params[0]].items())


@pytest.mark.parametrize("change", [dict(state_dtype=None), dict(min_8bit_size=10 ** 6),
                                    dict(buffer_dtype=INT8)])
def test_a_layout_change_after_the_first_step_is_refused(change):
    params = make_params([(300,)])
    opt = FAMILY["adamcm"].cls(params, backend="reference", state_dtype=INT8, min_8bit_size=MIN,
                               topC=3)
    _run(opt, params, 2)
    before = params[0].detach().clone()
    opt.param_groups[0].update(change)
    set_grads(params, 2)
    with pytest.raises(RuntimeError, match="cannot change after the first step"):
        opt.step()
    assert torch.equal(params[0], before)


# ---------------------------------------------------------------- backends, validation

@pytest.mark.parametrize("name", list(EVERY))
def test_triton_steps_8bit_moments_of_every_variant(small_chunks, name):
    """backend="triton" refuses none (Capabilities.eight_bit_moments): AdamAM and SGDAM
    were the last."""
    require("triton")
    params = make_params([(300,)])
    opt = EVERY[name].cls(params, backend="triton", state_dtype=INT8, min_8bit_size=MIN,
                          **EVERY[name].configs["defaults"])
    _run(opt, params, 1)
    assert opt.backends_in_use == {"cpu": "triton"}
    for key, _ in _moment_keys(opt, opt.param_groups[0]):
        assert opt.state[params[0]][key].dtype == torch.uint8, key


@pytest.mark.parametrize("name", list(EVERY))
def test_auto_steps_8bit_moments_of_every_variant_on_cpu(name):
    require("cpu")
    params = make_params([(300,)])
    opt = EVERY[name].cls(params, state_dtype=INT8, min_8bit_size=MIN,
                          **EVERY[name].configs["defaults"])
    set_grads(params, 0)
    opt.step()
    assert opt.backends_in_use == {"cpu": "cpu"}


@pytest.mark.parametrize("name", list(EVERY))
def test_a_param_of_no_elements_keeps_8bit_moments_on_cpu(name):
    """min_8bit_size=0: a 0-element tensor's codes (no blocks, no scales) step beside a
    full one's."""
    require("cpu")
    params = make_params([(0,), (300,)])
    opt = EVERY[name].cls(params, backend="cpu", state_dtype=INT8, min_8bit_size=0,
                          **EVERY[name].configs["defaults"])
    _run(opt, params, 2)
    assert opt.backends_in_use == {"cpu": "cpu"}
    group = opt.param_groups[0]
    for p in params:
        for key, _ in _moment_keys(opt, group):
            assert opt.state[p][key].dtype == torch.uint8, key


@pytest.mark.parametrize("name", list(FAMILY))
def test_8bit_moments_need_the_buffer(name):
    with pytest.raises(ValueError, match="state_dtype"):
        FAMILY[name].cls(make_params([(3,)]), kappa=0.0, state_dtype=INT8)


def test_8bit_moments_refuse_centered_rmsprop():
    """Rounding square_avg makes square_avg - grad_avg^2 negative (NaN params: found
    with the twin test above)."""
    with pytest.raises(ValueError, match="centered"):
        FAMILY["rmspropcg"].cls(make_params([(3,)]), centered=True, state_dtype=INT8,
                                backend="reference")
    opt = FAMILY["rmspropcg"].cls(make_params([(3,)]), state_dtype=INT8, backend="reference")
    opt.param_groups[0]["centered"] = True
    with pytest.raises(ValueError, match="centered"):
        opt.step()


def test_memory_of_all_8bit_adamcm_on_gpt2_shapes():
    """docs/SPEC.md's layout on the tensors of one GPT-2 block (and its embeddings) at
    width 256: with 8-bit moments and slots at topC 5, every state tensor counted, at
    most 8 B per parameter, fp32 AdamW's footprint."""
    d = 256
    shapes = [(4 * d, d), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d),
              (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    params = make_params(shapes)
    opt = FAMILY["adamcm"].cls(params, backend="reference", state_dtype=INT8,
                               buffer_dtype=INT8, topC=5)
    _run(opt, params, 1)
    state = sum(v.numel() * v.element_size() for st in opt.state.values()
                for v in st.values() if isinstance(v, torch.Tensor))
    per_param = state / sum(p.numel() for p in params)
    assert per_param <= 8.0, per_param
