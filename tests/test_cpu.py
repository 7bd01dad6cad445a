"""What is particular to the C++ CPU backend (cm_fused::step_): thread-count determinism,
the op (opcheck, argument checks), the kernel builds, loading and fallbacks. Its lock step
with the reference, for every optimizer, is in test_matrix.py."""
import dataclasses
import os
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

import cm_fused.cpu as cpu_backend
from cm_fused import AdamCM
from cm_fused.contract import Variant
from compare import (OTHER_KERNEL_BUILDS, assert_bit_identical, make_params, op_args,
                     run_on_kernels, set_grads)
from family import EVERY, make

_REASON = cpu_backend.unavailable_reason()  # loads the prebuilt extension, or JIT-builds it
if _REASON is not None:
    if os.environ.get("CM_FUSED_REQUIRE_EXT") == "1":
        raise RuntimeError(f"CM_FUSED_REQUIRE_EXT=1 but {_REASON}")
    pytest.skip(f"the C++ extension cannot be built or loaded on this machine: {_REASON}",
                allow_module_level=True)


def test_auto_picks_the_cpu_backend_without_a_warning():
    params = make_params([(3, 4), (5,)])
    opt = AdamCM(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_grads(params, 0)
        opt.step()
    assert opt.backends_in_use == {"cpu": "cpu"}


def _run_with_threads(threads, shapes, name, **kw):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = make_params(shapes, seed=3)
        opt = make(name, "cpu", **kw)(params)
        for t in range(12):
            set_grads(params, t, seed=5)
            torch.manual_seed(t)
            opt.step()
        return opt, params
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("cfg", ["defaults", "all"])
@pytest.mark.parametrize("name", list(EVERY))
def test_bit_identical_whatever_the_thread_count(name, cfg):
    # Over 65536 elements in all (csrc/passes.h kSerialBelow) and many 16384-element
    # chunks: with 2 threads the chunks are split between threads, with 1 they are not.
    shapes = [(300001,), (70000,), (17,), (), (0,), (40000,)]
    kw = EVERY[name].configs[cfg]
    a = _run_with_threads(1, shapes, name, **kw)
    b = _run_with_threads(2, shapes, name, **kw)
    assert_bit_identical(*a, *b)


# ------------------------------------------------------------ deferred inserts

@pytest.mark.parametrize("slot", [None, torch.bfloat16, torch.int8], ids=str)
def test_adamcm_defers_its_inserts_and_flush_buffers_writes_them(slot):
    """AdamCM on fp32 params folds the norm into its update pass and writes each insert
    at the start of the next step (cm_pending). Mid-run the live state has inserts
    pending; flush_buffers() writes them, and then opt.state is the reference's, bit for
    bit; later steps (with nothing pending after the flush) stay in lock step; a
    checkpoint holds nothing pending; diagnostics see the flushed buffer."""
    shapes = [(300,), (3, 5), (), (20000,)]
    kw = dict(topC=3, decay=0.9, synced=False, buffer_dtype=slot, critical_test=0.2)
    params, twin = make_params(shapes), make_params(shapes)
    opt, ref = AdamCM(params, backend="cpu", **kw), AdamCM(twin, backend="reference", **kw)
    pending_seen = 0
    for t in range(12):
        for ps, o in ((params, opt), (twin, ref)):
            set_grads(ps, t)
            torch.manual_seed(t)
            o.step()
        pending_seen += sum(opt.state[p]["cm_pending"].item() >= 0 for p in params)
        if t in (4, 9):
            if t == 9:
                assert [d.keys() for d in opt.buffer_diagnostics()] != []  # (it flushes)
            else:
                opt.flush_buffers()
            assert all(opt.state[p]["cm_pending"].item() == -1 for p in params)
            _assert_same_bits(opt, params, ref, twin)
    assert pending_seen >= 10  # not vacuous: most steps left an insert pending
    sd = opt.state_dict()
    assert all(s["cm_pending"].item() == -1 for s in sd["state"].values())
    _assert_same_bits(opt, params, ref, twin)


@pytest.mark.parametrize("slot", [None, torch.int8])
@pytest.mark.parametrize("scaled", [False, True])
def test_one_pass_has_the_two_pass_bits(slot, scaled, monkeypatch):
    """The single pass sums each chunk's squared gradient in its update loop, in the order
    of the two-pass step's norm pass: the keys after every step, and every state entry
    after a flush, are the two-pass step's bits. Sizes give odd numbers of blocks, a last
    single block, tails, and chunks (16,384 elements) that end mid-tensor."""
    shapes = [(300,), (3, 5), (), (112,), (83,), (117,), (151,), (181,), (16384 + 83,),
              (16384 + 117,), (20000,)]
    kw = dict(topC=3, decay=0.9, synced=False, buffer_dtype=slot, critical_test=0.2)
    one, two = make_params(shapes), make_params(shapes)
    o1, o2 = AdamCM(one, backend="cpu", **kw), AdamCM(two, backend="cpu", **kw)
    scale = torch.tensor(64.0)
    for t in range(30):  # (a wrong order changes a key's last bit in a few % of steps)
        for ps, o, defer in ((one, o1, True), (two, o2, False)):
            set_grads(ps, t)
            if scaled:  # GradScaler's path: g / grad_scale
                for p in ps:
                    p.grad.mul_(scale)
                o.grad_scale = scale
            monkeypatch.setattr(cpu_backend, "CAPABILITIES",
                                dataclasses.replace(cpu_backend.CAPABILITIES, defers_inserts=defer))
            torch.manual_seed(t)
            o.step()
        for p, q in zip(one, two):
            assert torch.equal(o1.state[p]["cm_keys"], o2.state[q]["cm_keys"]), t
    assert any(o1.state[p]["cm_pending"].item() >= 0 for p in one)  # it did defer
    o1.flush_buffers()
    assert_bit_identical(o1, one, o2, two)


def _assert_same_bits(opt, params, ref, twin):
    """Every param and state entry bit for bit, but the keys: to the rounding of the norms'
    summation order (the reference's vector_norm, the kernel's chunked sums)."""
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
        a, b = opt.state[p], ref.state[q]
        assert a.keys() == b.keys()
        for key in a:
            tol = dict(rtol=1e-6, atol=0) if key == "cm_keys" else dict(rtol=0, atol=0)
            torch.testing.assert_close(a[key], b[key], **tol, msg=lambda m: f"{key}: {m}")


def test_the_op_refuses_pending_inserts_it_cannot_defer():
    args = op_args(Variant.ADAM_CM)
    pending = [torch.tensor(-1), torch.tensor(1), torch.tensor(0)]
    for change, match in [(dict(variant=int(Variant.ADAM_CG)), "pending inserts are AdamCM"),
                          (dict(phase=1, reduced=torch.zeros(3, 1, dtype=torch.float64)),
                           "in a whole step"),
                          (dict(pending=pending[:2]), "pending has 2 tensors"),
                          (dict(pending=[pending[0], torch.tensor(3), pending[2]]),
                           r"pending\[1\] = 3 is not a slot"),
                          (dict(pending=[torch.tensor(0), *pending[1:]]),
                           r"pending\[0\] = 0 is not a slot of a buffer holding 0"),
                          (dict(params=[p.bfloat16() for p in args.params]), "float32 params")]:
        args = op_args(Variant.ADAM_CM)
        args.pending = [t.clone() for t in pending]
        for key, value in change.items():
            setattr(args, key, value)
        if "params" in change:  # (the rest of the state in the params' dtype)
            for name in ("grads", "momenta", "second_moments", "extras"):
                setattr(args, name, [t.bfloat16() for t in getattr(args, name)])
        before = [[t.clone() for t in a] if isinstance(a, list) else a for a in args.op_args()]
        with pytest.raises(RuntimeError, match=match):
            torch.ops.cm_fused.step_(*args.op_args())
        for a, b in zip(args.op_args(), before):
            if isinstance(a, list):
                assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------ the op itself



@pytest.mark.parametrize("variant", list(Variant), ids=lambda v: v.name)
@pytest.mark.parametrize("extras,slot,dtype,optional", [
    (True, torch.float32, torch.float32, True), (False, torch.bfloat16, torch.float32, False),
    (True, torch.float16, torch.bfloat16, True), (True, torch.int8, torch.float32, True)])
def test_opcheck(variant, extras, slot, dtype, optional):
    torch.library.opcheck(torch.ops.cm_fused.step_.default,
                          op_args(variant, extras, slot, dtype, optional).op_args())


def test_op_refuses_bad_arguments_and_changes_nothing():
    args = op_args()
    args.keys = [k.double() for k in args.keys]  # keys must be fp32
    before = [[t.clone() for t in a] if isinstance(a, list) else a for a in args.op_args()]
    with pytest.raises(RuntimeError, match=r"keys\[0\] has dtype"):
        torch.ops.cm_fused.step_(*args.op_args())
    for a, b in zip(args.op_args(), before):
        if isinstance(a, list):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    for change, match in [(dict(grads=op_args().grads[:2]), "grads has 2 tensors"),
                          (dict(momenta=[]), "momenta has 0 tensors"),
                          (dict(variant=7), "unknown variant 7"),
                          (dict(variant=int(Variant.SGD_CG)), "takes no second_moments"),
                          (dict(phase=1), "reduced must be given for"),
                          (dict(reduced=torch.zeros(3, 1, dtype=torch.float64)),
                           "reduced must be given only for"),
                          (dict(phase=2, reduced=torch.zeros(3, 4, dtype=torch.float64)),
                           r"shape \[3, 1\]"),
                          (dict(phase=3), "unknown phase 3"),
                          (dict(scales=[torch.zeros(3, 1)] * 3), "scales is given"),
                          (dict(int8=True, scales=[]), "scales is empty"),
                          (dict(int8=True, scales=[torch.zeros(3, 2)] * 3),
                           r"scales\[0\] has 6 elements, expected 3")]:
        args = op_args(slot=torch.int8) if change.pop("int8", False) else op_args()
        for key, value in change.items():
            setattr(args, key, value)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.cm_fused.step_(*args.op_args())


@pytest.mark.parametrize("threads", [1, 2])
def test_square_sums_is_each_tensors_sum_of_squares(threads):
    """The fused clip's norm pass on the C++ backend: per tensor, whatever the thread
    count (several chunks, ragged tails, 16-bit dtypes, a strided tensor, zero elements);
    refuses what it cannot read."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_square_sums()
    finally:
        torch.set_num_threads(before)


def _check_square_sums():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g) * s for n, s in
               [(1, 3.0), (0, 1.0), (40000, 0.01), (16384, 1.0), (17, 1e-20), (100003, 2.0)]]
    tensors += [torch.randn(999, generator=g).bfloat16(), torch.randn(70, generator=g).half(),
                torch.randn(300, 200, generator=g).t()]
    got = cpu_backend.square_sums(tensors)
    want = torch.stack([t.double().square().sum() for t in tensors])
    assert got.dtype == torch.float64 and got.shape == (len(tensors),)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert cpu_backend.square_sums([]).shape == (0,)
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is Long"):
        cpu_backend.square_sums([torch.ones(3), torch.ones(3, dtype=torch.long)])
    torch.library.opcheck(torch.ops.cm_fused.square_sums.default, (tensors[:3],))


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return set()


def test_kernel_build_matches_this_cpu():
    """The build of torch's own capability (so that torch.lerp and the kernels use the same
    fused multiply-adds), where the CPU has its instruction sets."""
    name, cap = cpu_backend.kernel_name(), torch.backends.cpu.get_cpu_capability()
    assert name in ("AVX512", "AVX2", "DEFAULT")
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to check the pick against")
    avx2 = {"avx2", "fma", "f16c", "bmi1", "bmi2"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    want = ("AVX512" if cap == "AVX512" and avx512 else
            "AVX2" if cap in ("AVX2", "AVX512") and avx2 else
            "DEFAULT")
    assert name == want, (cap, sorted(f for f in flags if f.startswith("avx")))


@pytest.mark.parametrize("capability", OTHER_KERNEL_BUILDS)
def test_other_kernel_builds_match_reference_too(capability):
    """The kernel builds this process does not run (the portable one, as picked on CPUs
    without AVX2; AVX2 on an AVX-512 CPU), forced with ATEN_CPU_CAPABILITY in a
    subprocess: 20 steps of every optimizer in lock step with the reference. Adaptive
    memory's beta comes from sums over whole tensors, which torch (the reference) and the
    kernels add in orders that depend on the build; with torch's and the kernels' AVX2
    builds, SGDAM's fp16 moments part by two ulps within 5 steps (2 of 40,000 elements),
    so under AVX2 SGDAM runs in fp32 and bf16 here (and test_moments8 steps its 8-bit
    state from the reference's each step)."""
    run_on_kernels(capability, f"""
        from compare import run_lockstep, ODD_SHAPES
        from family import EVERY, make
        for name, member in EVERY.items():
            kw = member.configs["all"]
            for dt, slot in [(torch.float32, None), (torch.bfloat16, torch.float16),
                             (torch.float16, torch.bfloat16)]:
                if {capability!r} == "avx2" and name == "sgdam" and dt == torch.float16:
                    continue
                slots = dict(buffer_dtype=slot) if member.buffered else {{}}
                run_lockstep(make(name, "cpu", **slots, **kw),
                             make(name, "reference", **slots, **kw),
                             ODD_SHAPES + [(40000,)], 20, dtype=dt)
        print("OK")
    """)


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
    started = time.perf_counter()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"LOADED: jit {torch.__version__}" in out.stdout
    # one line says what is happening before the wait (and the README says how long)
    said = [ln for ln in out.stderr.splitlines() if "compiling the C++ CPU kernel" in ln]
    assert len(said) == 1 and "no prebuilt extension" in said[0], out.stderr[-2000:]
    print(f"JIT build and two steps: {time.perf_counter() - started:.1f} s")
