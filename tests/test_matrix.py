"""The lock-step matrix: optimizer × backend × dtype × config.

Every fused backend runs in lock step with the reference, parameters AND full state
compared after every step (tests/compare.py, tolerance by dtype; fill and step counts
exact), over odd sizes (0-dim, 1, 4097, empty), gradients missing on some steps, every
optimizer's configurations (tests/family.py), narrow dtypes, GradScaler with skipped
steps, and save/load midway (bit-identical). ``kappa=0`` of every optimizer on every
backend is its torch counterpart, bit for bit.

The Triton backend runs under the interpreter without a GPU: fewer steps, smaller chunks.
"""
import inspect

import pytest
import torch

from cm_fused import registry
from cm_fused.contract import MUTATED, Phase, Variant
from compare import (TOLERANCE, assert_bit_identical, assert_same_state,
                     checkpoint_roundtrip, copy_params, make_params, op_args, run_lockstep,
                     scaler_lockstep, set_grads, settled, snapshot, assert_unchanged)
from family import (BACKENDS, EVERY, FAMILY, FUSED_BACKENDS, cases, interpreted, make,
                    require)

# 0-dim, 1, 4097 (several Triton chunks, the last one element), empty, 2-d; the C++
# backend also gets a tensor of several 16384-element chunks with a ragged tail.
SHAPES = [(), (1,), (4097,), (3, 5), (0,), (2, 33)]
CPU_SHAPES = SHAPES + [(40000,)]
STEPS = {"cpu": 40, "triton": 10, "reference": 40}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def use(backend, request):
    """Require the backend; the Triton one gets interpreter-sized chunks."""
    require(backend)
    if backend == "triton":
        request.getfixturevalue("small_chunks")
    return CPU_SHAPES if backend == "cpu" else SHAPES


def some_missing(step):
    """Gradients that are None on some steps (skipped entirely by both sides); tensor 3's
    first step comes after the others' (a fresh tensor beside stepped ones)."""
    if step == 0:
        return {3}
    return {1, 4} if step % 4 == 1 else ({0, 2} if step % 7 == 3 else ())


# ------------------------------------------------------------ a step split in two

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [v for v in Variant if v != Variant.SGD_AM],
                         ids=lambda v: v.name)
def test_split_step_with_exchanged_sums_is_the_whole_step(variant, backend, request):
    """REDUCE writes each tensor's sums into ``reduced`` and changes nothing else; UPDATE
    decides from ``reduced`` (what the optimizer all-reduces for sharded tensors): the
    two make the whole step. (SGD_AM splits across groups: the lock-step tests.)"""
    use(backend, request)
    module = registry.module(backend)
    whole, split, fresh = op_args(variant), op_args(variant), op_args(variant)
    module.step(whole)
    split.reduced = torch.zeros(3, variant.sums_per_tensor, dtype=torch.float64)
    split.phase = int(Phase.REDUCE)
    module.step(split)
    for name in MUTATED:
        if name != "reduced":
            assert_tensors(getattr(split, name), getattr(fresh, name), exact=True)
    if variant.buffered:  # the sums of squares of the unscaled gradients
        want = [torch.sum((g.double() / 2.0) ** 2) for g in fresh.grads]
        torch.testing.assert_close(split.reduced[:, 0], torch.stack(want))
    split.phase = int(Phase.UPDATE)
    module.step(split)
    for name in MUTATED:
        if name != "reduced":
            assert_tensors(getattr(split, name), getattr(whole, name),
                           exact=backend != "reference")
    if variant.buffered:  # the keys come from `reduced`: 4x the sums is 2x the keys
        doubled, quadrupled = op_args(variant), op_args(variant)
        doubled.grads = [g * 2 for g in doubled.grads]
        module.step(doubled)
        quadrupled.reduced = split.reduced * 4
        quadrupled.phase = int(Phase.UPDATE)
        module.step(quadrupled)
        assert_tensors(quadrupled.keys, doubled.keys, exact=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slot", [torch.float32, torch.int8], ids=str)
def test_a_step_with_pending_inserts_writes_them_first(backend, slot, request):
    """StepArgs.pending (AdamCM): a step given inserts that an earlier step left pending
    is that step on the buffer with those inserts written (the fused backends leave
    their own inserts pending in turn; written here for the comparison)."""
    from cm_fused.reference import flush_all
    use(backend, request)
    module = registry.module(backend)
    given, flushed = op_args(Variant.ADAM_CM, slot=slot), op_args(Variant.ADAM_CM, slot=slot)
    given.pending = [torch.tensor(-1), torch.tensor(1), torch.tensor(0)]  # counts 0, 2, 3
    flushed.pending = [t.clone() for t in given.pending]
    flush_all(flushed)
    assert not all(torch.equal(a, b) for a, b in zip(given.sums, flushed.sums))  # (not vacuous)
    flushed.pending = []
    module.step(given)
    module.step(flushed)
    flush_all(given)
    for name in MUTATED:
        if name not in ("reduced", "pending"):
            assert_tensors(getattr(given, name), getattr(flushed, name), exact=True)
    assert all(t.item() == -1 for t in given.pending)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("then", ["kappa0", "compiled"])
def test_pending_inserts_across_a_switch_to_kappa0_or_to_compiled_steps(backend, then,
                                                                        request):
    """AdamCM's fused steps leave inserts pending; a later step writes them first: one that
    runs torch's code (kappa turned to 0, which changes the momentum a pending insert
    would write), or a compiled step, which leaves its own pending too (a graph replays
    it unseen: flush_buffers still writes them). The run stays in lock step with the
    reference."""
    shapes = use(backend, request)
    kw = dict(topC=2, decay=0.9, synced=False)
    params, twin = make_params(shapes), make_params(shapes)
    opt, ref = make("adamcm", backend, **kw)(params), make("adamcm", "reference", **kw)(twin)
    step, left = opt.step, []  # left: whether steps 3.. left inserts pending
    for t in range(6):
        if t == 3:
            if then == "kappa0":
                opt.param_groups[0]["kappa"] = ref.param_groups[0]["kappa"] = 0.0
            else:
                torch._dynamo.reset()
                step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
        if t == 2:  # (not vacuous: inserts are pending when the switch comes)
            assert any(opt.state[p]["cm_pending"].item() >= 0 for p in params)
        for ps, fn in ((params, step), (twin, ref.step)):
            set_grads(ps, t)
            fn()
        assert_same_state(opt, params, ref, twin, torch.float32, f"step {t}")
        if t >= 3:
            left.append(any(opt.state[p]["cm_pending"].item() >= 0 for p in params))
            opt.flush_buffers()  # (as a reader of the buffer between steps would)
            assert all(opt.state[p]["cm_pending"].item() == -1 for p in params)
    assert any(left) == (then == "compiled")
    for p, q in zip(params, twin):
        torch.testing.assert_close(opt.state[p]["cm_buffer"], ref.state[q]["cm_buffer"],
                                   rtol=1e-6, atol=1e-7)


def test_an_always_flushed_group_is_written_once_then_costs_nothing(monkeypatch):
    """A group whose deferring step was compiled is flushed before every step that does
    not defer (its graph may replay unseen), also after load_state_dict. With CPU state
    only tensors holding an insert are written: kappa=0 steps after compiled ones write
    each pending insert once, then nothing, and stay in lock step with the reference."""
    import cm_fused.pending as pending_inserts
    require("cpu")
    params, twin = make_params(CPU_SHAPES), make_params(CPU_SHAPES)
    kw = dict(topC=2, decay=0.9, synced=False)
    opt, ref = make("adamcm", "cpu", **kw)(params), make("adamcm", "reference", **kw)(twin)
    torch._dynamo.reset()
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    for t in range(3):
        for ps, fn in ((params, step), (twin, ref.step)):
            set_grads(ps, t)
            fn()
    pending = sum(opt.state[p]["cm_pending"].item() >= 0 for p in params)
    assert pending > 0  # (not vacuous)
    written, flush = [], pending_inserts.flush_pending

    def counted(*args):
        written.append(args[-1].item())
        flush(*args)

    monkeypatch.setattr(pending_inserts, "flush_pending", counted)
    opt.param_groups[0]["kappa"] = ref.param_groups[0]["kappa"] = 0.0
    for t in range(3, 6):
        for ps, fn in ((params, opt.step), (twin, ref.step)):
            set_grads(ps, t)
            fn()
        assert len(written) == pending and min(written) >= 0, (t, written)
        assert_same_state(opt, params, ref, twin, torch.float32, f"step {t}")
    # torch's load_state_dict replaces the group dicts: the new one is marked in its turn
    # (the compiled graph may replay the deferring step without tracing it again).
    opt.load_state_dict(opt.state_dict())
    opt.flush_buffers()
    assert opt._pending.may_pend(opt.param_groups[0])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("phase", [Phase.REDUCE, Phase.UPDATE], ids=lambda p: p.name)
def test_split_step_opcheck(backend, phase, request):
    """The ops' schema, fake and autograd checks with ``reduced`` (mutated by REDUCE)."""
    use(backend, request)
    registry.module(backend).unavailable_reason()  # loads the op
    namespace = {"cpu": torch.ops.cm_fused, "triton": torch.ops.cm_fused_triton}[backend]
    args = op_args(Variant.ADAM_AM)
    args.reduced = torch.rand(3, 4, dtype=torch.float64)
    args.phase = int(phase)
    torch.library.opcheck(namespace.step_.default, args.op_args())


def assert_tensors(got: list, want: list, exact: bool) -> None:
    for a, b in zip(got, want, strict=True):
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


# ------------------------------------------------------------ fused vs reference

# (AdamAM's interpreted Triton kernels are the slowest: its defaults and "all" by default,
# its other configurations under -m slow)
@pytest.mark.parametrize("name,cfg,backend", interpreted(
    [(c.values[0], c.values[1], b) for c in cases(members=EVERY) for b in FUSED_BACKENDS],
    keep=lambda c: c[0] != "adamam" or c[1] in ("defaults", "all")))
def test_lockstep_with_reference(name, cfg, backend, request):
    shapes = use(backend, request)
    kw = EVERY[name].configs[cfg]
    (opt, _), _ = run_lockstep(make(name, backend, **kw), make(name, "reference", **kw),
                               shapes, STEPS[backend], missing=some_missing)
    assert opt.backends_in_use == {"cpu": backend}


NARROW = [(torch.bfloat16, None), (torch.float16, None), (torch.float32, torch.bfloat16),
          (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name,dtype,slot", [
    pytest.param(n, d, s, id=f"{n}-{d}-{s}") for n, m in EVERY.items() for d, s in NARROW
    if m.buffered or s is None])  # adaptive memory has no slots
def test_narrow_params_and_slots_with_reference(name, dtype, slot, backend, request):
    """bf16/fp16 storage, fp32 math; the tolerance of the narrowest dtype involved.

    State comes out bit-identical in most steps; parameters can differ by an ulp (the
    reference's fp32 sqrt is a vector library's, not always correctly rounded), and with
    fp16 parameters at lr=1e-2 such an ulp can outgrow the fp16 tolerance: lr=1e-3."""
    shapes = use(backend, request)
    buffered = EVERY[name].buffered
    narrow = max((d for d in (dtype, slot) if d is not None), key=lambda d: TOLERANCE[d][1])
    kw = {**EVERY[name].configs["all"], "lr": 1e-3}
    if buffered:
        kw["buffer_dtype"] = slot
    steps = STEPS[backend] // 2

    def with_dtype(factory):
        def f(params):
            for p in params:
                p.data = p.data.to(dtype)
            return factory(params)
        return f
    (opt, params), _ = run_lockstep(with_dtype(make(name, backend, **kw)),
                                    with_dtype(make(name, "reference", **kw)), shapes, steps,
                                    dtype=narrow, missing=some_missing)
    st = opt.state[params[2]]
    assert all(p.isfinite().float().mean() > 0.99 for p in params if p.numel())  # not vacuous
    assert params[2].dtype == dtype
    if not buffered:
        assert st["d"].dtype == dtype
        return
    assert st["cm_buffer"].dtype == (slot or dtype)
    assert st["cm_sum"].dtype == (torch.float32 if (slot or dtype).itemsize < 4
                                  else (slot or dtype))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(FAMILY))
def test_int8_slots_match_reference_byte_for_byte(name, dtype, backend, request):
    """buffer_dtype=torch.int8: the quantized bytes, their scales, S, the params and every
    other state entry come out exactly as the reference's (keys: to the rounding of the
    norms' summation order), through fills, replacements, a missing gradient, a skipped
    (found_inf) step and an infinite gradient element, whose block turns NaN."""
    shapes = [*use(backend, request), (300,)]  # two blocks of a slot, the second short
    kw = {**FAMILY[name].configs["all"], "buffer_dtype": torch.int8}
    params_a = make_params(shapes, dtype)
    params_b = copy_params(params_a)
    opt_a, opt_b = make(name, backend, **kw)(params_a), make(name, "reference", **kw)(params_b)
    steps = STEPS[backend] // 2
    for t in range(steps):
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            set_grads(params, t, missing=some_missing(t))
            if t == steps - 2:
                params[-1].grad[260] = float("inf")
            opt.found_inf = torch.tensor(1.0 if t == 2 else 0.0)
            torch.manual_seed(t)
            opt.step()
        for i, (pa, pb) in enumerate(zip(params_a, params_b)):
            exact = dict(rtol=0, atol=0, equal_nan=True, msg=lambda m: f"step {t} {i}: {m}")
            torch.testing.assert_close(pa, pb, **exact)
            sa, sb = settled(opt_a, pa), settled(opt_b, pb)
            assert sa.keys() == sb.keys()
            for key in sa:
                if key == "cm_keys":
                    torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=0)
                else:
                    torch.testing.assert_close(sa[key], sb[key], **exact)
    last = settled(opt_a, params_a[-1])
    assert last["cm_buffer"].dtype == torch.int8 and last["cm_sum"].dtype == torch.float32
    assert last["cm_inserts"].item() >= 3  # not vacuous: fills and replacements happened
    assert last["cm_scales"][:, 1].isnan().any()  # the block with the infinity
    assert (last["cm_scales"][:, 0] > 0).any() and last["cm_buffer"].abs().max() == 127


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", list(EVERY))
def test_grad_scaler_with_skipped_steps_matches_reference(name, backend, request):
    """torch.amp.GradScaler hands the optimizer grad_scale and found_inf: gradients (and
    keys) are unscaled in the kernel, and the overflowing steps change nothing."""
    use(backend, request)
    kw = dict(EVERY[name].configs["all"])
    runs = scaler_lockstep(lambda a, b: [make(name, backend, **kw)(a),
                                         make(name, "reference", **kw)(b)],
                           steps=12, overflow_at=(3, 8))
    for t, (params_a, params_b), opts, scalers in runs:
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_same_state(opts[0], params_a, opts[1], params_b, torch.float32, f"step {t}")
    # two skipped steps: the step counts say so
    assert all(s["step"].item() == 10 for s in opts[0].state.values())


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", list(EVERY))
def test_grad_scale_and_found_inf_attributes_match_reference(name, backend, request):
    """As GradScaler sets them, with scales that are not powers of two (the division must
    round as the reference's) and found_inf set on some steps."""
    shapes = use(backend, request)
    params_a = make_params(shapes)
    params_b = copy_params(params_a)
    kw = EVERY[name].configs["all"]
    opt_a, opt_b = make(name, backend, **kw)(params_a), make(name, "reference", **kw)(params_b)
    for t in range(STEPS[backend] // 2):
        scale = 3.0 if t % 2 else 1024.0
        inf = 1.0 if t in (3, 6) else 0.0
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            set_grads(params, t, missing=some_missing(t))
            for p in params:
                if p.grad is not None:
                    p.grad *= scale
            opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(inf)
            torch.manual_seed(t)
            opt.step()
        assert_same_state(opt_a, params_a, opt_b, params_b, torch.float32, f"step {t}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EVERY))
def test_found_inf_changes_nothing_at_all(name, backend, request):
    shapes = use(backend, request)
    params = make_params(shapes)
    opt = make(name, backend, **EVERY[name].configs["all"])(params)
    for t in range(4):
        set_grads(params, t)
        opt.step()
    before = snapshot(opt, params)
    set_grads(params, 4, missing=(1,))
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert_unchanged(opt, params, before)
    # a fresh tensor's first step is skipped as well: its next step is again a first step
    fresh = torch.nn.Parameter(torch.ones(5))
    opt.add_param_group({"params": [fresh]})
    fresh.grad = torch.ones(5)
    opt.step()
    assert torch.equal(fresh.detach(), torch.ones(5))
    assert opt.state[fresh]["step"].item() == 0
    if EVERY[name].buffered:
        assert opt.state[fresh]["cm_count"].item() == 0


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", list(EVERY))
def test_several_groups_with_their_own_hyperparameters(name, backend, request):
    shapes = use(backend, request)
    extra = EVERY[name].configs["all"]

    buffered = EVERY[name].buffered
    if buffered:
        own = [dict(topC=1, decay=0.99), dict(topC=5, synced=False, weight_decay=0.1),
               dict(topC=2, lr=1e-2)]
    else:  # SGDAM: one beta from every group's sums (lam and beta_max shared)
        own = [dict(lr=3e-3), dict(weight_decay=0.1), dict(lr=1e-2)]
    shared = {k: extra[k] for k in ("lam", "beta_max") if k in extra and name == "sgdam"}
    extra = {k: v for k, v in extra.items() if k not in shared}

    def groups(backend):
        def f(p):
            return EVERY[name].cls([
                {"params": p[:2], **own[0]}, {"params": p[2:4], **own[1]},
                {"params": p[4:], **extra, **own[2]}], backend=backend, **shared)
        return f
    (opt, params), _ = run_lockstep(groups(backend), groups("reference"), shapes,
                                    STEPS[backend] // 2, missing=some_missing)
    if buffered:
        assert opt.state[params[0]]["cm_buffer"].shape[0] == 1
        assert opt.state[params[5]]["cm_buffer"].shape[0] == 2


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", list(EVERY))
def test_mixed_dtypes_in_one_group_share_the_synced_key(name, backend, request):
    """fp32, bf16 and fp16 params in one group (Triton: three dtype buckets): one synced
    key for the group (SGDAM: one beta), and the reference's trajectory."""
    shapes = use(backend, request)
    kw = dict(topC=2) if EVERY[name].buffered else {}
    kinds = [torch.float32, torch.bfloat16, torch.float16] * 3

    def mixed(factory):
        def f(params):
            for p, d in zip(params, kinds):
                p.data = p.data.to(d)
            return factory(params)
        return f
    (opt, params), _ = run_lockstep(mixed(make(name, backend, **kw)),
                                    mixed(make(name, "reference", **kw)), shapes,
                                    STEPS[backend] // 4, dtype=torch.bfloat16)
    if not EVERY[name].buffered:
        return
    keys = [opt.state[p]["cm_keys"] for p in params]
    assert all(torch.equal(k, keys[0]) for k in keys[1:])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", list(EVERY))
def test_non_contiguous_params_match_reference(name, backend, request):
    """Fused kernels step a contiguous copy of a strided parameter and write it back."""
    use(backend, request)
    base = torch.randn(6, 5)
    p_fused = torch.nn.Parameter(base.clone().t())
    p_ref = torch.nn.Parameter(base.clone().t())
    assert not p_fused.is_contiguous()
    kw = {k: v for k, v in EVERY[name].configs["all"].items() if k != "critical_test"}
    opt_f, opt_r = make(name, backend, **kw)([p_fused]), make(name, "reference", **kw)([p_ref])
    for t in range(6):
        g = torch.randn(5, 6, generator=torch.Generator().manual_seed(t))
        p_fused.grad, p_ref.grad = g.clone(), g.clone()
        opt_f.step()
        opt_r.step()
        assert_same_state(opt_f, [p_fused], opt_r, [p_ref], torch.float32, f"step {t}")
    assert not p_fused.is_contiguous()


# ------------------------------------------------------------ checkpoints

# (Triton, interpreted: AdamCM in both dtypes and SGDAM by default, the others under
# -m slow; the checkpoint code is the engine's, the same for every backend)
@pytest.mark.parametrize("name,dtype,backend", interpreted(
    [(n, d, b) for n in EVERY for d in (torch.float32, torch.bfloat16) for b in BACKENDS],
    keep=lambda c: c[0] == "adamcm" or (c[0] == "sgdam" and c[1] == torch.float32)))
def test_save_load_midway_continues_bit_identically(name, backend, dtype, request):
    """Saved through bytes, loaded with weights_only=True into a fresh optimizer: the rest
    of the run is bit-identical to an uninterrupted one (critical_test included: the
    coin draws follow torch's seeded generator)."""
    shapes = use(backend, request)
    kw = dict(EVERY[name].configs["all"])
    if EVERY[name].buffered:  # (both narrow slot dtypes, one per param dtype)
        kw["buffer_dtype"] = torch.int8 if dtype == torch.float32 else torch.bfloat16
    before, after = (3, 3) if backend == "triton" else (7, 8)
    a, b = checkpoint_roundtrip(make(name, backend, **kw), shapes, before, after, dtype=dtype,
                                map_location="cpu",
                                missing=lambda t: {1} if t == before + 1 else ())
    assert_bit_identical(*a, *b)
    assert b[0].backends_in_use == {"cpu": backend}


# ------------------------------------------------------------ kappa = 0 is torch's

KAPPA0_CONFIGS = {
    "adamcm": [dict(), dict(weight_decay=0.1, amsgrad=True, maximize=True),
               dict(lr=torch.tensor(3e-3), betas=(0.8, 0.99), eps=1e-7)],
    "adamcg": [dict(), dict(weight_decay=0.1, amsgrad=True, maximize=True),
               dict(lr=torch.tensor(3e-3), betas=(0.8, 0.99), eps=1e-7),
               dict(weight_decay=0.1, decoupled_weight_decay=True)],
    "sgdcg": [dict(lr=1e-2), dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.1,
                                  maximize=True),
              dict(lr=torch.tensor(3e-3), momentum=0.5),
              dict(lr=1e-2, momentum=0.9, nesterov=True)],
    "rmspropcg": [dict(), dict(momentum=0.9, centered=True, weight_decay=0.1, alpha=0.9,
                               maximize=True),
                  dict(lr=torch.tensor(3e-3), momentum=0.5, eps=1e-6)],
}


def _torch_twin(name, backend, kw):
    """torch's optimizer as kappa=0 runs it on this backend: the for-loop on the
    reference; fused on the fused backends (foreach where torch has no fused kernel)."""
    member = FAMILY[name]
    # our defaults where torch's differ (AdamW's weight_decay is 0.01, AdamCM's 0)
    known = inspect.signature(member.torch_cls.__init__).parameters
    kw = {**{k: v for k, v in member.cls.HYPERPARAMETERS.items()
             if k in known and k not in ("foreach", "fused")}, **kw}
    kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    if backend == "reference":
        impl = dict(foreach=False)
    else:
        impl = dict(fused=True) if member.torch_fused else dict(foreach=True)
    return lambda params: member.torch_cls(params, **impl, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,i", [(n, i) for n, cs in KAPPA0_CONFIGS.items()
                                    for i in range(len(cs))])
def test_kappa_zero_is_torch_bit_for_bit(name, i, backend, request):
    """Params and full state bit-identical to torch's optimizer every step, 30 steps,
    some gradients missing (none on the first step: torch's fused SGD itself fails when a
    tensor's first momentum step comes after the others'; ours takes that case, tested
    in test_steps.py)."""
    shapes = use(backend, request)
    kw = KAPPA0_CONFIGS[name][i]
    params_a = make_params(shapes)
    params_b = copy_params(params_a)
    opt_a = make(name, backend, kappa=0.0, **kw)(params_a)
    opt_b = _torch_twin(name, backend, kw)(params_b)
    for t in range(30):
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            set_grads(params, t, missing=some_missing(t) if t else ())
            opt.step()
        assert_bit_identical(opt_a, params_a, opt_b, params_b)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", [n for n, m in FAMILY.items() if m.torch_fused])
def test_kappa_zero_with_grad_scaler_is_torch_fused_bit_for_bit(name, backend, request):
    """kappa=0 on a fused backend is torch's fused kernel, GradScaler inputs included: the
    overflowing steps are skipped by both, the scale halving alike."""
    use(backend, request)
    kw = KAPPA0_CONFIGS[name][1]
    runs = scaler_lockstep(lambda a, b: [make(name, backend, kappa=0.0, **kw)(a),
                                         _torch_twin(name, backend, kw)(b)],
                           steps=20, overflow_at=(3, 11))
    for t, (params_a, params_b), opts, scalers in runs:
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_bit_identical(opts[0], params_a, opts[1], params_b)



# ------------------------------------------------------------ torch.compile

# Inductor compiles the reference for ~15 s per optimizer on 2 cores: AdamCM stands for
# the family there; aot_eager traces every optimizer on both backends.
COMPILE_CASES = [pytest.param(n, b, c, id=f"{n}-{b}-{c}") for n in EVERY
                 for b in ("reference", "cpu") for c in ("inductor", "aot_eager")
                 if not (c == "inductor" and b == "reference" and n != "adamcm")]


@pytest.mark.parametrize("name,backend,compiler", COMPILE_CASES)
def test_compiled_step_traces_whole_and_matches_eager(name, backend, compiler, request):
    """torch.compile(opt.step, fullgraph=True), from the very first step: no graph break,
    and the same trajectory as eager steps (the C++ step is one custom op in the graph:
    bit-identical; the compiled reference may round differently: within tolerance).
    kappa=0 too (torch's for-loop code, traced)."""
    use(backend, request)
    shapes = [(5,), (3, 4), ()]
    kw = {k: v for k, v in EVERY[name].configs["all"].items() if k != "critical_test"}
    for kappa in (1.0, 0.0) if EVERY[name].buffered else (None,):
        torch._dynamo.reset()
        params_e, params_c = make_params(shapes), make_params(shapes)
        with_kappa = {} if kappa is None else dict(kappa=kappa)
        opt_e = make(name, backend, **with_kappa, **kw)(params_e)
        opt_c = make(name, backend, **with_kappa, **kw)(params_c)
        compiled = torch.compile(opt_c.step, fullgraph=True, backend=compiler)
        for t in range(4):
            set_grads(params_e, t)
            set_grads(params_c, t)
            opt_e.step()
            compiled()
        if backend == "cpu" and kappa != 0:
            assert_bit_identical(opt_e, params_e, opt_c, params_c)
        else:
            assert_same_state(opt_e, params_e, opt_c, params_c, torch.float32, f"kappa {kappa}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name,kappa", [(n, k) for n in EVERY
                                        for k in ((1.0, 0.0) if EVERY[n].buffered else (None,))])
def test_compiled_step_traces_a_group_once_not_per_tensor(name, kappa, backend):
    """torch.compile of the step over a group of many tensors of assorted shapes: one
    graph, however many tensors, for the first step (its state allocated outside the
    graph, by _init_group) and every later one: no recompilation (kappa=0, torch's own
    code, too; on the C++ backend AdamCM's deferred inserts, whose bookkeeping
    _init_group does)."""
    from torch._dynamo.utils import counters
    require(backend)
    graphs = {}
    for n in (5, 20):
        torch._dynamo.reset()
        counters.clear()
        params = make_params([(3,), (4, 5), (), (7, 2), (16,)] * (n // 5))
        opt = make(name, backend, **({} if kappa is None else dict(kappa=kappa)))(params)
        step = torch.compile(opt.step, backend="eager")
        for t in range(5):
            set_grads(params, t)
            step()
        graphs[n] = counters["stats"]["unique_graphs"]  # a recompilation adds graphs
    assert graphs == {5: 1, 20: 1}
