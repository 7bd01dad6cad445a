"""The C++ CPU backend (cm_fused::adam_cm_step_) against the reference backend, in lock
step: parameters AND full state compared after every step, over many steps."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import cm_fused.cpu as cpu_backend
from cm_fused import AdamCM
from compare import (ODD_SHAPES, assert_bit_identical, assert_same_state,
                     checkpoint_roundtrip, copy_params, make_params, run_lockstep, set_grads)

_REASON = cpu_backend.unavailable_reason()  # loads the prebuilt extension, or JIT-builds it
if _REASON is not None:
    if os.environ.get("CM_FUSED_REQUIRE_EXT") == "1":
        raise RuntimeError(f"CM_FUSED_REQUIRE_EXT=1 but {_REASON}")
    pytest.skip(f"the C++ extension cannot be built or loaded on this machine: {_REASON}",
                allow_module_level=True)

# ODD_SHAPES (0-dim, 1, 4097, empty, ...) plus a tensor of several 16384-element chunks
# with a ragged tail, so chunked norms and vector tails are both exercised.
SHAPES = ODD_SHAPES + [(40000,)]
STEPS = 80


@pytest.fixture(autouse=True)
def one_thread():
    """Lock-step runs use one intra-op thread: the comparisons do not depend on it (see
    test_bit_identical_whatever_the_thread_count, which sets its own), and an OpenMP pool
    on a busy 2-core machine makes hundreds of tiny reference ops crawl."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def cpu(params, **kw):
    return AdamCM(params, backend="cpu", **kw)


def ref(params, **kw):
    return AdamCM(params, backend="reference", **kw)


def some_missing(step):
    """Gradients that are None on some steps (skipped entirely by both backends)."""
    return {1, 4} if step % 4 == 1 else ({0, 7} if step % 7 == 3 else ())


def lockstep(shapes=SHAPES, steps=STEPS, dtype=torch.float32, missing=lambda s: (), **kw):
    (opt_a, pa), (opt_b, pb) = run_lockstep(lambda p: cpu(p, **kw), lambda p: ref(p, **kw),
                                            shapes, steps, dtype=dtype, missing=missing)
    assert opt_a.backends_in_use == {"cpu": "cpu"}
    return (opt_a, pa), (opt_b, pb)


# ------------------------------------------------------------ lock step vs reference

CONFIGS = {
    "defaults": dict(),  # synced, topC=5, decay=0.7
    "unsynced": dict(synced=False),
    "amsgrad": dict(amsgrad=True),
    "weight_decay": dict(weight_decay=0.1),
    "topC1": dict(topC=1),
    "decay0.99": dict(decay=0.99),
    "critical_test": dict(critical_test=0.3),
    "unsynced_critical": dict(synced=False, critical_test=0.05, decay=0.99),
    "decay0_ties": dict(decay=0.0),  # every key decays to 0: argmin ties, first index wins
    "decay1": dict(decay=1.0, topC=3),
    "beta1_small": dict(betas=(0.3, 0.99)),  # the other branch of torch.lerp's formula
    "tensor_lr": dict(lr=torch.tensor(2e-3), weight_decay=0.05),
    "all": dict(synced=False, amsgrad=True, weight_decay=0.05, topC=3, decay=0.99,
                critical_test=0.1, lr=1e-2, eps=1e-6),
    "eps0": dict(eps=0.0, weight_decay=0.1),  # the first step must not compute 0 / (0 + 0)
}


@pytest.mark.parametrize("missing", [False, True], ids=["all_grads", "some_missing"])
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=str)
def test_matches_reference_step_by_step(cfg, missing):
    lockstep(missing=some_missing if missing else (lambda s: ()), **CONFIGS[cfg])


@pytest.mark.parametrize("dtype,slot", [
    (torch.bfloat16, None), (torch.float16, None),
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
    (torch.bfloat16, torch.float16),
], ids=str)
@pytest.mark.parametrize("cfg", ["defaults", "all_lr1e-3"])
def test_narrow_params_and_slots_match_reference(dtype, slot, cfg):
    """bf16/fp16 storage, fp32 math; tolerance by param dtype (compare.TOLERANCE).

    The state (m, v, buffer, S, counts) comes out bit-identical; parameters can differ by
    an ulp because the reference's fp32 sqrt is MKL's (VML_HA, not always correctly
    rounded) and the kernel's is IEEE. With fp16 parameters at lr=1e-2 such an ulp, kept
    by the trajectory while the value shrinks, can outgrow the fp16 tolerance, so the
    narrow runs use lr=1e-3."""
    kw = CONFIGS["defaults"] if cfg == "defaults" else {**CONFIGS["all"], "lr": 1e-3}
    (opt, params), _ = lockstep(dtype=dtype, buffer_dtype=slot, missing=some_missing,
                                steps=60, **kw)
    st = opt.state[params[2]]
    assert st["cm_buffer"].dtype == (slot or dtype)
    assert st["cm_sum"].dtype == (torch.float32 if (slot or dtype).itemsize < 4
                                  else (slot or dtype))


def test_several_groups_with_their_own_topc():
    def groups(p, backend):
        return AdamCM([{"params": p[:3], "topC": 1, "decay": 0.99},
                       {"params": p[3:6], "topC": 5, "synced": False, "weight_decay": 0.1},
                       {"params": p[6:], "topC": 2, "amsgrad": True, "lr": 1e-2}],
                      backend=backend)
    (opt, params), _ = run_lockstep(lambda p: groups(p, "cpu"), lambda p: groups(p, "reference"),
                                    SHAPES, STEPS, missing=some_missing)
    assert opt.state[params[0]]["cm_buffer"].shape[0] == 1
    assert opt.state[params[7]]["cm_buffer"].shape[0] == 2


def test_eps_zero_first_step_moves_p_by_weight_decay_only():
    """SPEC: the first step's Adam update is zero; with eps=0 the kernel must not compute
    it as 0 / (0 + 0) = NaN (the vector body and the ragged tail alike)."""
    for dtype in (torch.float32, torch.bfloat16):
        params = make_params([(4097,), (3, 5), ()], dtype=dtype)
        before = copy_params(params)
        opt = cpu(params, eps=0.0, lr=0.1, weight_decay=0.5)
        set_grads(params, 0)
        opt.step()
        for p, p0 in zip(params, before):
            expect = (p0.detach().float() * (1 - 0.1 * 0.5)).to(dtype)
            assert torch.equal(p.detach(), expect), dtype
        for t in range(1, 3):
            set_grads(params, t)
            opt.step()
            assert all(p.isfinite().all() for p in params)


# ------------------------------------------------------------ kappa == 0: torch's AdamW

def _adamw_pair(model_a, model_b, **kw):
    return (AdamCM(model_a.parameters(), kappa=0, backend="cpu", **kw),
            torch.optim.AdamW(model_b.parameters(), fused=True, **kw))


def _assert_adamw_identical(opt_a, params_a, opt_b, params_b, where):
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert torch.equal(pa.detach(), pb.detach()), f"{where}: param {i}"
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys(), f"{where}: param {i} state keys"
        for key in sa:
            assert sa[key].dtype == sb[key].dtype, f"{where}: param {i} {key} dtype"
            assert torch.equal(sa[key], sb[key]), f"{where}: param {i} {key}"


@pytest.mark.parametrize("kw", [dict(weight_decay=0.0), dict(weight_decay=0.1),
                                dict(amsgrad=True, weight_decay=0.05, lr=1e-2),
                                dict(amsgrad=True, lr=torch.tensor(3e-3))], ids=str)
def test_kappa_zero_is_torch_fused_adamw_bit_for_bit(kw):
    """kappa=0 through backend='cpu' (torch's fused AdamW code path): params and state
    bit-identical to torch.optim.AdamW(fused=True) over 50 steps, missing grads too."""
    params_a = make_params(SHAPES)
    params_b = copy_params(params_a)
    kw_b = {**kw, "lr": kw["lr"].clone()} if isinstance(kw.get("lr"), torch.Tensor) else kw
    opt_a = AdamCM(params_a, kappa=0, backend="cpu", **kw)
    opt_b = torch.optim.AdamW(params_b, fused=True, **{"weight_decay": 0.0, **kw_b})
    for t in range(50):
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            set_grads(params, t, missing=some_missing(t))
            opt.step()
        _assert_adamw_identical(opt_a, params_a, opt_b, params_b, f"step {t}")
    assert opt_a.backends_in_use == {"cpu": "cpu"}


def _scaler_lockstep(make_opts, steps, overflow_at):
    """Two identical small models, each with its optimizer (``make_opts(model_a, model_b)``)
    and its own GradScaler, stepped on the same data; at the steps in ``overflow_at`` a
    gradient overflows (the step is skipped, the scale halves). Yields
    ``(t, (params_a, params_b), opts, scalers)`` after every step."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = make_opts(*models)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=4)
               for _ in range(2)]
    x = torch.randn(16, 6)
    for t in range(steps):
        for model, opt, scaler in zip(models, opts, scalers):
            opt.zero_grad()
            scaler.scale(model(x + 0.01 * t).pow(2).mean()).backward()
            if t in overflow_at:
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        yield t, tuple(list(m.parameters()) for m in models), opts, scalers


@pytest.mark.parametrize("amsgrad", [False, True])
def test_kappa_zero_with_grad_scaler_is_torch_fused_adamw_bit_for_bit(amsgrad):
    """The same with a real GradScaler (grads unscaled in the fused kernel); the steps whose
    gradients overflow are skipped by both, the scale halving alike."""
    runs = _scaler_lockstep(
        lambda a, b: _adamw_pair(a, b, lr=1e-2, weight_decay=0.01, amsgrad=amsgrad),
        steps=50, overflow_at=(3, 11, 30))
    for t, (params_a, params_b), opts, scalers in runs:
        assert scalers[0].get_scale() == scalers[1].get_scale()
        _assert_adamw_identical(opts[0], params_a, opts[1], params_b, f"step {t}")
    # three skipped steps: the step counts say so
    assert all(s["step"].item() == 47 for s in opts[0].state.values())


def test_auto_picks_the_cpu_backend_without_a_warning():
    params = make_params([(3, 4), (5,)])
    opt = AdamCM(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_grads(params, 0)
        opt.step()
    assert opt.backends_in_use == {"cpu": "cpu"}


def test_non_contiguous_params_match_reference():
    base = torch.randn(6, 5)
    p_cpu = torch.nn.Parameter(base.clone().t())
    p_ref = torch.nn.Parameter(base.clone().t())
    assert not p_cpu.is_contiguous()
    opt_c, opt_r = cpu([p_cpu], weight_decay=0.1), ref([p_ref], weight_decay=0.1)
    for t in range(20):
        g = torch.randn(5, 6, generator=torch.Generator().manual_seed(t))
        p_cpu.grad, p_ref.grad = g.clone(), g.clone()
        opt_c.step()
        opt_r.step()
        assert_same_state(opt_c, [p_cpu], opt_r, [p_ref], torch.float32, f"step {t}")


# ------------------------------------------------------------ GradScaler protocol

def test_grad_scale_and_found_inf_attributes_match_reference():
    """As torch.amp.GradScaler sets them: grads arrive scaled; found_inf skips a step."""
    params_c = make_params(SHAPES)
    params_r = copy_params(params_c)
    opt_c = cpu(params_c, synced=False, weight_decay=0.1, amsgrad=True)
    opt_r = ref(params_r, synced=False, weight_decay=0.1, amsgrad=True)
    for t in range(40):
        scale = 3.0 if t % 2 else 1024.0  # not only powers of two: division must match
        inf = 1.0 if t in (5, 17) else 0.0
        for params, opt in ((params_c, opt_c), (params_r, opt_r)):
            set_grads(params, t, missing=some_missing(t))
            for p in params:
                if p.grad is not None:
                    p.grad *= scale
            opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(inf)
            opt.step()
        assert_same_state(opt_c, params_c, opt_r, params_r, torch.float32, f"step {t}")


@pytest.mark.parametrize("cfg", ["defaults", "all"])
def test_found_inf_leaves_everything_bit_identical(cfg):
    params = make_params(SHAPES)
    opt = cpu(params, **CONFIGS[cfg])
    for t in range(8):
        set_grads(params, t)
        opt.step()
    before = ([p.detach().clone() for p in params],
              [{k: v.clone() for k, v in opt.state[p].items()} for p in params])
    set_grads(params, 8)
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), before[0][i]), f"param {i} moved"
        for k, v in before[1][i].items():
            assert torch.equal(opt.state[p][k], v), f"param {i} {k} changed"


def test_real_amp_grad_scaler_matches_reference():
    runs = _scaler_lockstep(
        lambda a, b: [cpu(a.parameters(), lr=1e-2, weight_decay=0.01),
                      ref(b.parameters(), lr=1e-2, weight_decay=0.01)],
        steps=30, overflow_at=(3, 11))
    for t, (params_a, params_b), opts, scalers in runs:
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_same_state(opts[0], params_a, opts[1], params_b, torch.float32, f"step {t}")
    assert opts[0].backends_in_use == {"cpu": "cpu"}


# ------------------------------------------------------------ checkpoints, determinism

@pytest.mark.parametrize("cfg", [dict(), dict(amsgrad=True, weight_decay=0.1, synced=False),
                                 dict(topC=2, critical_test=0.4),
                                 dict(buffer_dtype=torch.bfloat16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_midway_continues_bit_identically(cfg, dtype):
    a, b = checkpoint_roundtrip(lambda ps: cpu(ps, lr=1e-2, **cfg), SHAPES, 9, 11,
                                dtype=dtype, missing=lambda t: {1} if t == 10 else ())
    assert_bit_identical(*a, *b)
    assert b[0].backends_in_use == {"cpu": "cpu"}


@pytest.mark.parametrize("cfg", [dict(), dict(amsgrad=True, weight_decay=0.1, synced=False,
                                               buffer_dtype=torch.bfloat16)], ids=str)
def test_checkpoint_with_map_location_cpu_continues_bit_identically(cfg):
    a, b = checkpoint_roundtrip(lambda ps: cpu(ps, lr=1e-2, **cfg), SHAPES, 6, 6,
                                map_location="cpu", missing=lambda t: {2} if t == 7 else ())
    assert_bit_identical(*a, *b)
    assert b[0].backends_in_use == {"cpu": "cpu"}


def _run_with_threads(threads, shapes, **kw):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = make_params(shapes, seed=3)
        opt = cpu(params, **kw)
        for t in range(12):
            set_grads(params, t, seed=5)
            torch.manual_seed(t)
            opt.step()
        return opt, params
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("cfg", [dict(), dict(synced=False, critical_test=0.2)], ids=str)
def test_bit_identical_whatever_the_thread_count(cfg):
    # Over 65536 elements in all (csrc/adam_cm.cpp kSerialBelow) and many 16384-element
    # chunks: with 2 threads the chunks are split between threads, with 1 they are not.
    shapes = [(300001,), (70000,), (17,), (), (0,), (40000,)]
    a = _run_with_threads(1, shapes, **cfg)
    b = _run_with_threads(2, shapes, **cfg)
    assert_bit_identical(*a, *b)


# ------------------------------------------------------------ the op itself

def _op_args(amsgrad=True, slot=torch.float32, dtype=torch.float32, optional=True):
    shapes = [(5,), (2, 3), ()]
    C = 3
    g = torch.Generator().manual_seed(0)
    rnd = lambda s, dt=dtype: torch.randn(s, generator=g).to(dt)  # noqa: E731
    params = [rnd(s) for s in shapes]
    return (
        params, [rnd(s) for s in shapes], [rnd(s) for s in shapes],
        [rnd(s).abs() for s in shapes], [rnd(s).abs() for s in shapes] if amsgrad else [],
        [rnd((C, *s), slot) for s in shapes], [rnd((C,), torch.float32).abs() for _ in shapes],
        [torch.tensor(k) for k in (0, 2, 3)], [rnd(s, torch.float32) for s in shapes],
        [torch.tensor(float(k)) for k in (0, 2, 3)],
        1e-3, torch.tensor(2e-3) if optional else None, 0.9, 0.999, 1e-8, 0.01, 0.7, 0.3,
        amsgrad, False,
        torch.tensor(2.0) if optional else None, torch.tensor(0.0) if optional else None,
        torch.rand(len(shapes), generator=g) if optional else None,
    )


@pytest.mark.parametrize("amsgrad,slot,dtype,optional", [
    (True, torch.float32, torch.float32, True), (False, torch.bfloat16, torch.float32, False),
    (True, torch.float16, torch.bfloat16, True)])
def test_opcheck(amsgrad, slot, dtype, optional):
    torch.library.opcheck(torch.ops.cm_fused.adam_cm_step_.default,
                          _op_args(amsgrad, slot, dtype, optional))


def test_op_refuses_bad_arguments_and_changes_nothing():
    args = list(_op_args())
    args[6] = [k.double() for k in args[6]]  # keys must be fp32
    before = [[t.clone() for t in a] if isinstance(a, list) else a for a in args]
    with pytest.raises(RuntimeError, match=r"keys\[0\] has dtype"):
        torch.ops.cm_fused.adam_cm_step_(*args)
    for a, b in zip(args, before):
        if isinstance(a, list):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    args = list(_op_args())
    args[1] = args[1][:2]
    with pytest.raises(RuntimeError, match="grads has 2 tensors"):
        torch.ops.cm_fused.adam_cm_step_(*args)


def test_kernel_build_matches_this_cpu():
    name = cpu_backend.kernel_name()
    assert name in ("AVX2", "DEFAULT")
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert name == "AVX2"


def test_default_kernels_match_reference_too():
    """The portable (non-AVX2) kernel build, as picked on CPUs without AVX2, forced here with
    ATEN_CPU_CAPABILITY=default in a subprocess."""
    script = textwrap.dedent("""
        import sys, torch
        torch.set_num_threads(1)
        sys.path.insert(0, sys.argv[1])
        from compare import run_lockstep, ODD_SHAPES
        from cm_fused import AdamCM
        import cm_fused.cpu
        print("KERNEL:", cm_fused.cpu.kernel_name())
        kw = dict(amsgrad=True, weight_decay=0.1, synced=False, critical_test=0.1)
        for dt, slot in [(torch.float32, None), (torch.bfloat16, torch.float16),
                         (torch.float16, torch.bfloat16)]:
            run_lockstep(lambda p: AdamCM(p, backend="cpu", buffer_dtype=slot, **kw),
                         lambda p: AdamCM(p, backend="reference", buffer_dtype=slot, **kw),
                         ODD_SHAPES + [(40000,)], 40, dtype=dt)
        print("OK")
    """)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "KERNEL: DEFAULT" in out.stdout and "OK" in out.stdout


# ------------------------------------------------------------ loading and fallback

_FALLBACK_SCRIPT = textwrap.dedent("""
    import importlib.util, sys, warnings
    import torch
    real_find_spec = importlib.util.find_spec
    def find_spec(name, *a, **k):  # a prebuilt extension that is not a loadable library
        if name == "cm_fused._C":
            return importlib.util.spec_from_file_location("cm_fused._C", sys.argv[1])
        return real_find_spec(name, *a, **k)
    importlib.util.find_spec = find_spec
    import cm_fused
    from cm_fused import AdamCM
    print("REASON:", cm_fused.backends()["cpu"])
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = AdamCM([p])
        opt.step(); opt.step()
    print("AUTO:", opt.backends_in_use, sum("uses 'reference'" in str(x.message) for x in w))
    try:
        AdamCM([p], backend="cpu").step()
    except RuntimeError as e:
        print("EXPLICIT:", e)
""")


@pytest.mark.parametrize("kind", ["broken", "other_torch", "untagged"])
def test_broken_or_foreign_prebuilt_falls_back_with_a_reason(tmp_path, kind):
    """A prebuilt .so that cannot load, was built for another torch, or carries no build
    tag is not used (one built for another torch or untagged is never even loaded).
    Without JIT the backend is then unavailable with the reason, 'auto' falls back to the
    reference with one warning, and backend='cpu' raises with the reason."""
    content, expect = {
        "broken": (f"\x7fELF garbage CM_FUSED_BUILT_WITH_TORCH={torch.__version__};".encode(),
                   "failed to load"),
        "other_torch": (b"CM_FUSED_BUILT_WITH_TORCH=1.0.0;", "built for torch 1.0.0"),
        "untagged": (b"\x7fELF", "built for torch (unknown)"),
    }[kind]
    so = tmp_path / "_C.cpython-fake.so"
    so.write_bytes(content + b"\0" * 64)
    script = tmp_path / "fallback.py"
    script.write_text(_FALLBACK_SCRIPT)
    env = {**os.environ, "CM_FUSED_NO_JIT": "1"}
    out = subprocess.run([sys.executable, str(script), str(so)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert expect in lines["REASON"] and "CM_FUSED_NO_JIT" in lines["REASON"]
    assert lines["AUTO"] == "{'cpu': 'reference'} 1"
    assert "backend='cpu' cannot step" in lines["EXPLICIT"] and expect in lines["EXPLICIT"]


@pytest.mark.parametrize("require", [False, True])
def test_require_ext_fails_this_module_instead_of_skipping_it(tmp_path, require):
    """With the extension unloadable (no prebuilt, no JIT), this module skips, unless
    CM_FUSED_REQUIRE_EXT=1 (as CI sets it): then it fails, with the reason."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import importlib.util, sys
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a, **k: (
            None if name == "cm_fused._C" else real_find_spec(name, *a, **k))
        import pytest
        sys.exit(pytest.main([sys.argv[1], "-q", "-p", "no:cacheprovider", "-rs",
                              "-k", "test_kernel_build_matches_this_cpu"]))
    """))
    env = {**os.environ, "CM_FUSED_NO_JIT": "1"}
    env.pop("CM_FUSED_REQUIRE_EXT", None)
    if require:
        env["CM_FUSED_REQUIRE_EXT"] = "1"
    out = subprocess.run([sys.executable, str(script), __file__], env=env,
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(__file__))
    log = out.stdout[-3000:] + out.stderr[-3000:]
    if require:
        assert out.returncode not in (0, 5), log
        assert "CM_FUSED_REQUIRE_EXT=1 but" in out.stdout and "skipped" not in out.stdout, log
    else:
        assert out.returncode in (0, 5) and "1 skipped" in out.stdout, log  # 5: none ran
        assert "CM_FUSED_NO_JIT" in out.stdout, log


def test_the_loaded_library_was_built_for_this_torch():
    source, path = cpu_backend.loaded_from()
    assert source in ("prebuilt", "jit"), source
    assert cpu_backend.build_tag(path) == torch.__version__


@pytest.mark.slow
def test_without_a_prebuilt_extension_the_first_use_jit_builds_it(tmp_path):
    """As after CM_FUSED_NO_EXT=1: no cm_fused._C, so the first use compiles the shipped
    sources (into a fresh TORCH_EXTENSIONS_DIR here) and steps with them."""
    script = tmp_path / "jit.py"
    script.write_text(textwrap.dedent("""
        import importlib.util
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a, **k: (
            None if name == "cm_fused._C" else real_find_spec(name, *a, **k))
        import torch, cm_fused.cpu as c
        from cm_fused import AdamCM
        assert c.unavailable_reason() is None, c.unavailable_reason()
        p = torch.nn.Parameter(torch.ones(5)); p.grad = torch.ones(5)
        opt = AdamCM([p], backend="cpu"); opt.step(); opt.step()
        print("LOADED:", c.loaded_from()[0], c.build_tag(c.loaded_from()[1]))
    """))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"LOADED: jit {torch.__version__}" in out.stdout
