"""The Triton backend against the reference, in lock-step, params and full state.

Without a CUDA device the kernels run on CPU tensors under the Triton interpreter
(conftest.py sets TRITON_INTERPRET=1); that is slow, so these tests use small tensors,
tens of steps, and a shrunken chunk size so that tensors still span several chunks.
Tests marked ``gpu`` need a CUDA device and skip, saying so, without one.
"""

import pytest
import torch

import cm_fused
from cm_fused import AdamCM
from compare import (TOLERANCE, assert_bit_identical, assert_same_state, assert_unchanged,
                     checkpoint_roundtrip, copy_params, make_params, run_lockstep, set_grads,
                     snapshot)

try:
    import triton  # noqa: F401
except ImportError as e:  # the only reason to skip: no Triton at all
    pytest.skip(f"triton is not importable ({e})", allow_module_level=True)

import cm_fused.triton as triton_backend  # noqa: E402

# Triton imports, so the backend must work: a kernel that fails to load (or a
# TRITON_INTERPRET=0 without a CUDA device) fails every test, with the reason.
REASON = triton_backend.unavailable_reason()

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Shapes for lock-step runs: 0-dim, 1, odd, empty, and 4097 (several chunks, the last
# one a single element, with the chunk sizes set below).
SHAPES = [(), (1,), (4097,), (3, 5), (0,), (2, 33)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 1024 elements in loops of 256: 4097 elements = 5 chunks, the last one
    element long. (Interpreter cost grows with the number of programs, not their width.)"""
    if REASON is not None:
        pytest.fail(f"triton is importable but the triton backend is unavailable: {REASON}",
                    pytrace=False)
    from cm_fused.triton import launch
    monkeypatch.setattr(launch, "CHUNK", 1024)
    monkeypatch.setattr(launch, "BLOCK", 256)
    yield launch


def tri(**kw):
    return lambda params: AdamCM(params, backend="triton", **kw)


def ref(**kw):
    return lambda params: AdamCM(params, backend="reference", **kw)


def lockstep(cfg, shapes=SHAPES, steps=12, dtype=torch.float32, **kw):
    return run_lockstep(tri(**cfg), ref(**cfg), shapes, steps, dtype=dtype, device=DEVICE,
                        **kw)


# ------------------------------------------------------------ backend interface

def test_backend_is_available_and_says_what_it_takes():
    assert cm_fused.backends()["triton"] == "available"
    dev = torch.device(DEVICE)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert triton_backend.unsupported_reason(dev, {dtype}) is None
    reason = triton_backend.unsupported_reason(dev, {torch.float32, torch.float64})
    assert reason and "float64" in reason
    assert "CUDA" in triton_backend.unsupported_reason(torch.device("meta"), {torch.float32})


def test_backend_signature_is_the_reference_one():
    import inspect

    from cm_fused import reference
    assert (inspect.signature(triton_backend.adam_cm_step)
            == inspect.signature(reference.adam_cm_step))


def test_first_step_quirk_raw_gradient_in_slot_zero_and_only_weight_decay_moves_p():
    (opt, params), _ = lockstep(dict(lr=0.1, weight_decay=0.5, topC=3), steps=1)
    set_grads(before := copy_params(make_params(SHAPES)), 0, 1)  # the grads step 0 used
    for p, p0 in zip(params, before):
        st = opt.state[p]
        torch.testing.assert_close(p.detach().cpu(), p0.detach() * (1 - 0.1 * 0.5))
        assert torch.equal(st["cm_buffer"][0].cpu(), p0.grad)
        assert torch.equal(st["cm_sum"].cpu(), p0.grad)
        assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()
        assert st["cm_count"].item() == 1 and st["step"].item() == 1


# ------------------------------------------------------------ lock-step vs reference

@pytest.mark.parametrize("cfg", [
    dict(),
    dict(synced=False),
    dict(amsgrad=True, weight_decay=0.1),
    dict(synced=False, amsgrad=True, weight_decay=0.05, topC=1),
    dict(topC=5, decay=0.99),
    dict(topC=2, decay=0.7, synced=False, lr=1e-2),
    dict(topC=3, critical_test=0.4),
    dict(topC=1, critical_test=1.0, synced=False),
    dict(betas=(0.6, 0.9), eps=1e-6, lr=3e-2),  # lerp's large-weight formula (1-b1 > .5)
    dict(decay=0.0),  # every key decays to 0: exact ties, the first index is replaced
    dict(eps=0.0, weight_decay=0.1),  # the first step must not compute 0 / (0 + 0)
], ids=str)
def test_matches_reference(cfg):
    lockstep(cfg, steps=8)


def test_long_run_matches_reference(small_chunks, monkeypatch):
    """100 steps (keys rise and fall many times over, the buffer keeps turning over) on
    small tensors, one of three 16-element chunks (the last one short), some gradients
    missing, amsgrad, weight decay."""
    monkeypatch.setattr(small_chunks, "CHUNK", 16)
    monkeypatch.setattr(small_chunks, "BLOCK", 8)
    lockstep(dict(amsgrad=True, weight_decay=0.05, topC=3, decay=0.9, lr=1e-2),
             shapes=[(37,), (), (3, 5)], steps=100,
             missing=lambda t: {0} if t % 5 == 2 else ({1, 2} if t % 7 == 3 else ()))


def test_eps_zero_first_step_moves_p_by_weight_decay_only():
    """SPEC: the first step's Adam update is zero; with eps=0 it is not computed as
    0 / (0 + 0) = NaN. Later steps stay finite."""
    params = make_params([(4097,), (3, 5), ()], device=DEVICE)
    before = copy_params(params)
    opt = AdamCM(params, backend="triton", eps=0.0, lr=0.1, weight_decay=0.5)
    set_grads(params, 0, 1)
    opt.step()
    for p, p0 in zip(params, before):
        assert torch.equal(p.detach(), p0.detach() * (1 - 0.1 * 0.5))
    for t in range(1, 3):
        set_grads(params, t, 1)
        opt.step()
        assert all(p.isfinite().all() for p in params)


def test_kernels_that_fail_to_load_fail_the_tests_not_skip_them(tmp_path):
    """With triton importable, a backend whose kernels cannot load is an error to see,
    not a reason to skip this module: run one test of it in a subprocess where loading
    the kernels raises."""
    import os
    import subprocess
    import sys
    import textwrap
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import sys
        import pytest
        import cm_fused.triton as t
        def broken():
            raise ImportError("simulated kernel load failure")
        t._op_module = broken
        sys.exit(pytest.main([sys.argv[1], "-q", "-p", "no:cacheprovider", "-rfEs",
                              "-k", "test_backend_signature_is_the_reference_one"]))
    """))
    out = subprocess.run([sys.executable, str(script), __file__], capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(__file__))
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert ("1 error" in out.stdout or "1 failed" in out.stdout) and "skipped" not in out.stdout
    assert "simulated kernel load failure" in out.stdout, \
        out.stdout[-3000:]


def test_insert_decisions_both_accept_and_reject():
    """The lock-step gradients rise and fall; make sure the buffer both replaced and kept
    slots, so the decision comparison above is not vacuous."""
    params = make_params([(7,)], device=DEVICE)
    opt = AdamCM(params, backend="triton", topC=2, decay=0.99, synced=False)
    sums = []
    for t in range(14):
        set_grads(params, t, 1)
        opt.step()
        sums.append(opt.state[params[0]]["cm_sum"].clone())
    changed = [not torch.equal(a, b) for a, b in zip(sums[2:], sums[3:])]
    assert any(changed) and not all(changed)


def test_missing_gradients_skip_tensors_entirely():
    lockstep(dict(weight_decay=0.1), steps=7,
             missing=lambda t: {0, 2} if t % 3 == 1 else ({5} if t == 0 else ()))


def test_several_groups_with_their_own_topc():
    def make(backend):
        def f(params):
            return AdamCM([
                {"params": params[:2], "topC": 1},
                {"params": params[2:4], "topC": 5, "synced": False, "lr": 1e-2},
                {"params": params[4:], "topC": 3, "amsgrad": True, "weight_decay": 0.1},
            ], backend=backend)
        return f
    run_lockstep(make("triton"), make("reference"), SHAPES, 7, device=DEVICE)


def test_many_chunks_per_tensor_and_short_last_chunks(small_chunks, monkeypatch):
    """64-element chunks in loops of 16: 257 = 4 chunks + 1, 66 = 64 + 2."""
    monkeypatch.setattr(small_chunks, "CHUNK", 64)
    monkeypatch.setattr(small_chunks, "BLOCK", 16)
    lockstep(dict(amsgrad=True, weight_decay=0.1), shapes=[(257,), (66,), (), (64,), (0,)],
             steps=4)


@pytest.mark.parametrize("dtype,slot", [
    (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16), (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
], ids=str)
def test_narrow_params_and_slots(dtype, slot):
    """Tolerance of the narrowest dtype involved (compare.TOLERANCE): an fp32 param with
    bf16 slots is compared at bf16 tolerance (slots round the same fp32 value, which may
    differ from the reference's in the last fp32 bit)."""
    narrow = max((d for d in (dtype, slot) if d is not None),
                 key=lambda d: TOLERANCE[d][1])

    def as_dtype(make):
        def f(params):
            for p in params:
                p.data = p.data.to(dtype)
            return make(params)
        return f
    cfg = dict(buffer_dtype=slot, amsgrad=True, weight_decay=0.1)
    (opt, params), _ = run_lockstep(as_dtype(tri(**cfg)), as_dtype(ref(**cfg)), SHAPES, 5,
                                    dtype=narrow, device=DEVICE)
    st = opt.state[params[2]]
    assert params[2].dtype == dtype and st["exp_avg"].dtype == dtype
    assert st["cm_buffer"].dtype == (slot or dtype)
    assert st["cm_sum"].dtype == (torch.float32 if (slot or dtype).itemsize < 4
                                  else (slot or dtype))


def test_mixed_dtypes_in_one_group_share_the_synced_key():
    """fp32, bf16 and fp16 params in one group: three dtype buckets, one synced key."""
    kinds = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16,
             torch.float16]

    def mixed(make):
        def f(params):
            for p, d in zip(params, kinds):
                p.data = p.data.to(d)
            return make(params)
        return f
    (opt, params), _ = run_lockstep(mixed(tri(topC=2)), mixed(ref(topC=2)), SHAPES, 6,
                                    dtype=torch.bfloat16, device=DEVICE)
    keys = [opt.state[p]["cm_keys"] for p in params]
    for k in keys[1:]:
        assert torch.equal(k, keys[0])  # one key for the whole group, every bucket


# ------------------------------------------------------------ GradScaler protocol

def with_scaler(make, scale, found_inf=0.0):
    def f(params):
        opt = make(params)
        opt.grad_scale = torch.tensor(scale, device=DEVICE)
        opt.found_inf = torch.tensor(found_inf, device=DEVICE)
        return opt
    return f


def test_grad_scale_is_divided_out_of_gradients_and_keys():
    cfg = dict(synced=False, topC=2)
    run_lockstep(with_scaler(tri(**cfg), 3.0), with_scaler(ref(**cfg), 3.0), SHAPES, 8,
                 device=DEVICE)


def test_found_inf_changes_nothing_at_all():
    params = make_params(SHAPES, device=DEVICE)
    opt = AdamCM(params, backend="triton", topC=2, amsgrad=True, weight_decay=0.1,
                 critical_test=0.5)
    for t in range(4):
        set_grads(params, t, 1)
        opt.step()
    before = snapshot(opt, params)
    set_grads(params, 4, 1, missing=(1,))
    params[2].grad[7] = float("inf")
    opt.grad_scale = torch.tensor(2.0, device=DEVICE)
    opt.found_inf = torch.tensor(1.0, device=DEVICE)
    opt.step()
    assert_unchanged(opt, params, before)
    # a fresh tensor's first step is skipped as well: its state stays all zero
    fresh = torch.nn.Parameter(torch.ones(5, device=DEVICE))
    opt.add_param_group({"params": [fresh]})
    fresh.grad = torch.ones(5, device=DEVICE)
    opt.step()
    assert torch.equal(fresh.detach(), torch.ones(5, device=DEVICE))
    assert opt.state[fresh]["cm_count"].item() == 0 and opt.state[fresh]["step"].item() == 0
    assert not opt.state[fresh]["cm_buffer"].any()


def test_amp_grad_scaler_steps_like_the_reference():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(),
                                  torch.nn.Linear(4, 1)).to(DEVICE) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [AdamCM(models[0].parameters(), lr=1e-2, backend="triton"),
            AdamCM(models[1].parameters(), lr=1e-2, backend="reference")]
    scalers = [torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10) for _ in range(2)]
    x = torch.randn(16, 6, device=DEVICE)
    for t in range(5):
        for model, opt, scaler in zip(models, opts, scalers):
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean()).backward()
            if t == 2:
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        assert_same_state(opts[0], list(models[0].parameters()), opts[1],
                          list(models[1].parameters()), torch.float32, f"step {t}")
    assert scalers[0].get_scale() == 2.0 ** 9


# ------------------------------------------------------------ checkpoints, lr

@pytest.mark.parametrize("cfg", [dict(topC=2, amsgrad=True, weight_decay=0.1),
                                 dict(buffer_dtype=torch.bfloat16, critical_test=0.3)],
                         ids=str)
def test_save_load_midway_continues_bit_identically(cfg):
    a, b = checkpoint_roundtrip(tri(lr=1e-2, **cfg), SHAPES, 3, 3, device=DEVICE,
                                missing=lambda t: {1} if t == 4 else ())
    assert_bit_identical(*a, *b)


def test_tensor_lr_matches_float_lr():
    cfg = dict(weight_decay=0.1)
    run_lockstep(lambda ps: AdamCM(ps, lr=torch.tensor(2e-3, device=DEVICE),
                                   backend="triton", **cfg),
                 ref(lr=2e-3, **cfg), SHAPES, 8, device=DEVICE)


# The only constexprs a launch may have: dtypes, on/off switches, tile sizes. Nothing a
# scheduler or a user changes between steps.
STRUCTURAL_CONSTEXPRS = {"G_DT", "HAS_SCALE", "BLOCK", "RBLOCK", "SYNCED", "HAS_RAND",
                         "HAS_FOUND_INF", "CP", "TB", "P_DT", "M_DT", "V_DT", "VM_DT",
                         "B_DT", "S_DT", "LR_IS_PTR", "AMSGRAD", "ALIGNED"}


def _specialisations(launch, opt, params, lrs):
    """The launches of one step per lr value: (kernel, specialisation) lists."""
    out = []
    for t, lr in enumerate(lrs):
        launch.launch_log = []
        try:
            if isinstance(opt.param_groups[0]["lr"], torch.Tensor):
                opt.param_groups[0]["lr"].fill_(lr)
            else:
                opt.param_groups[0]["lr"] = lr
            opt.param_groups[0]["weight_decay"] = 0.1 * t
            opt.param_groups[0]["betas"] = (0.9 - 0.01 * t, 0.999 - 0.0001 * t)
            set_grads(params, t, 1)
            opt.step()
            out.append([(name, spec, const) for name, grid, spec, const in launch.launch_log])
        finally:
            launch.launch_log = None
    return out


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_changing_hyperparameters_does_not_respecialise_kernels(small_chunks, tensor_lr):
    """Triton compiles one kernel per specialisation: constexpr values and argument types
    (not float values). Under the interpreter nothing is compiled, so this compares what
    each launch would be specialised on; the gpu test below counts real compilations."""
    params = make_params(SHAPES, device=DEVICE)
    lr = torch.tensor(1e-3, device=DEVICE) if tensor_lr else 1e-3
    opt = AdamCM(params, lr=lr, backend="triton", critical_test=0.2, decay=0.9)
    specs = _specialisations(small_chunks, opt, params, [1e-3, 5e-4, 0.0, 3e-2])
    assert len(specs[0]) == 4  # norm, reduce, decide, update: one dtype bucket
    assert all(s == specs[1] for s in specs[1:])
    # the first step differs from later ones only by... nothing: same launches
    assert specs[0] == specs[1]
    constexprs = {k for _, _, const in specs[0] for k, _ in const}
    assert constexprs <= STRUCTURAL_CONSTEXPRS, constexprs - STRUCTURAL_CONSTEXPRS
    assert all(spec.count("fp32") >= 2 for _, spec, _ in specs[0][2:])  # decide, update


def test_unaligned_storage_takes_the_masked_path_and_matches(small_chunks):
    """Params that are views at an odd offset (4-byte aligned only): the bucket is not
    marked aligned (no 16-byte vector hints), and the step is still right."""
    def odd_views(make):
        def f(params):
            for p in params:
                flat = torch.zeros(p.numel() + 1, dtype=p.dtype, device=p.device)
                flat[1:] = p.data.flatten()
                p.data = flat[1:].view(p.shape)
            return make(params)
        return f
    shapes = [(4097,), (3, 5), ()]
    run_lockstep(odd_views(tri(topC=2)), odd_views(ref(topC=2)), shapes, 4, device=DEVICE)
    aligned = [b.aligned for plan in small_chunks._cache.values() for b in plan.buckets]
    assert aligned[-1] is False
    run_lockstep(tri(topC=2), ref(topC=2), [(64,), (8, 4)], 2, device=DEVICE)
    aligned = [b.aligned for plan in small_chunks._cache.values() for b in plan.buckets]
    assert aligned[-1] is True


def test_tables_are_cached_on_data_pointers(small_chunks):
    params = make_params(SHAPES, device=DEVICE)
    opt = AdamCM(params, backend="triton")
    set_grads(params, 0, 1)
    opt.step()
    builds = small_chunks.stats["builds"]
    for t in range(1, 3):
        for p in params:  # same grad storage each step: no rebuild
            p.grad.copy_(torch.randn_like(p.grad))
        opt.step()
    assert small_chunks.stats["builds"] == builds
    set_grads(params, 3, 1)  # new grad tensors: new pointers, a new table
    keep = [p.grad for p in params]  # keep old storage alive so the pointers must differ
    for p in params:
        p.grad = p.grad.clone()
    opt.step()
    assert small_chunks.stats["builds"] == builds + 1
    del keep


# ------------------------------------------------------------ the custom op

def _op_args(device, n=3):
    params = make_params([(5,), (), (2, 3)][:n], device=device)
    set_grads(params, 0, 1)
    C = 2
    args = (
        [p.detach() for p in params], [p.grad for p in params],
        [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [],
        [torch.zeros((C, *p.shape), device=device) for p in params],
        [torch.zeros(C, device=device) for p in params],
        [torch.zeros((), dtype=torch.int64, device=device) for p in params],
        [torch.zeros_like(p) for p in params],
        [torch.zeros((), device=device) for p in params],
        1e-2, None, 0.9, 0.999, 1e-8, 0.1, 0.7, 0.0, False, True, None, None, None)
    return args


def test_custom_op_schema_and_opcheck():
    op = torch.ops.cm_fused_triton.adam_cm_step_.default
    schema = str(op._schema)
    assert "Tensor(a0!)[] params" in schema and "Tensor[] grads" in schema
    assert "float lr" in schema and "Tensor? lr_tensor" in schema
    torch.library.opcheck(op, _op_args(DEVICE))  # schema, fake, autograd, aot dispatch


def test_compiled_step_goes_through_the_op_and_matches_eager():
    """Eager steps call the launcher directly; under torch.compile the backend calls the
    custom op, which traces with fullgraph=True and steps bit-identically."""
    def step(args):
        triton_backend.adam_cm_step(*args[:10], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                    weight_decay=0.1, decay=0.7, critical_test=0.0,
                                    amsgrad=False, synced=True)
    eager = _op_args(DEVICE)
    traced = [[t.clone() for t in x] if isinstance(x, list) else x for x in eager]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        step(eager)
        compiled(traced)
    for name, xs, ys in zip(MUTATED_NAMES, eager[:10], traced[:10]):
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert torch.equal(x, y), f"{name}[{i}]"


MUTATED_NAMES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                 "buffers", "keys", "counts", "sums", "steps")


# ------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none in this process)")
def test_gpu_opcheck_with_aot_dispatch():
    torch.library.opcheck(torch.ops.cm_fused_triton.adam_cm_step_.default,
                          _op_args("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none in this process)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_sizes_match_reference(small_chunks, monkeypatch, dtype):
    from cm_fused.triton import launch
    monkeypatch.setattr(launch, "CHUNK", 8192)
    monkeypatch.setattr(launch, "BLOCK", 512)
    shapes = [(1000, 1000), (4097,), (3, 257, 129), (), (0,), (8193,), (512, 3)]
    for cfg in (dict(), dict(synced=False, amsgrad=True, weight_decay=0.1, topC=3),
                dict(buffer_dtype=torch.bfloat16, critical_test=0.2)):
        run_lockstep(tri(**cfg), ref(**cfg), shapes, 30, dtype=dtype, device="cuda",
                     compare_every=5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none in this process)")
def test_gpu_two_runs_are_bit_identical():
    runs = []
    for _ in range(2):
        params = make_params([(1000, 1000), (4097,), (3, 5)], device="cuda")
        opt = AdamCM(params, backend="triton", amsgrad=True, critical_test=0.1)
        for t in range(20):
            set_grads(params, t, 1)
            torch.manual_seed(t)
            opt.step()
        runs.append((opt, params))
    assert_bit_identical(*runs[0], *runs[1])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none in this process)")
def test_gpu_cuda_graph_replay_matches_eager():
    shapes = [(300, 7), (4097,), (), (64,)]
    eager_p = make_params(shapes, device="cuda")
    graph_p = copy_params(eager_p)
    lr = torch.tensor(1e-2, device="cuda")
    eager = AdamCM(eager_p, lr=lr.clone(), backend="triton", amsgrad=True)
    graphed = AdamCM(graph_p, lr=lr.clone(), backend="triton", amsgrad=True)
    scale = torch.tensor(2.0, device="cuda")
    found = torch.tensor(0.0, device="cuda")
    for opt in (eager, graphed):
        opt.grad_scale, opt.found_inf = scale, found
    static_grads = [torch.zeros(s, device="cuda") for s in shapes]
    for p, g in zip(graph_p, static_grads):
        p.grad = g
    # warm up (state created, tables cached) on a side stream, then capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for t in range(3):
            set_grads(eager_p, t, 1)
            eager.step()
            for g, e in zip(static_grads, eager_p):
                g.copy_(e.grad)
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for t in range(3, 12):
        set_grads(eager_p, t, 1)
        for g, e in zip(static_grads, eager_p):
            g.copy_(e.grad)
        if t == 7:  # a skipped step, and a scheduler changing the tensor lr in place
            found.fill_(1.0)
        eager.param_groups[0]["lr"].fill_(1e-2 / (1 + t))
        graphed.param_groups[0]["lr"].fill_(1e-2 / (1 + t))
        eager.step()
        graph.replay()
        found.fill_(0.0)
    torch.cuda.synchronize()
    assert_bit_identical(eager, eager_p, graphed, graph_p)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none in this process)")
def test_gpu_ten_thousand_small_tensors(monkeypatch):
    from cm_fused.triton import launch
    monkeypatch.setattr(launch, "CHUNK", 8192)
    monkeypatch.setattr(launch, "BLOCK", 512)
    gen = torch.Generator().manual_seed(0)
    shapes = [(int(n),) for n in torch.randint(0, 300, (10_000,), generator=gen)]
    run_lockstep(tri(topC=2), ref(topC=2), shapes, 3, device="cuda", compare_every=3)


def _compiled_count(kernel):
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(c[0]) for c in caches.values())
    cache = getattr(kernel, "cache", None)
    if cache is not None:
        return sum(len(c) for c in cache.values())
    pytest.skip("this Triton version exposes no kernel cache to count")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none in this process)")
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_gpu_changing_lr_does_not_recompile(small_chunks, tensor_lr):
    from cm_fused.triton import kernels
    ks = [kernels._norm_kernel, kernels._reduce_kernel, kernels._decide_kernel,
          kernels._update_kernel]
    params = make_params([(1000,), (3, 5)], device="cuda")
    lr = torch.tensor(1e-3, device="cuda") if tensor_lr else 1e-3
    opt = AdamCM(params, lr=lr, backend="triton")
    _specialisations(small_chunks, opt, params, [1e-3])
    before = [_compiled_count(k) for k in ks]
    _specialisations(small_chunks, opt, params, [5e-4, 0.0, 3e-2, 1e-5])
    assert [_compiled_count(k) for k in ks] == before


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none in this process)")
def test_gpu_tensor_past_two_to_the_31_elements():
    """A bf16 tensor of 2^31 + 5 elements (~28 GiB with its state): its last elements,
    past int32 offsets, step exactly like the same values in a small tensor. With topC=1
    and two steps the parameter does not depend on the key, and the insert decision is
    the same for both (the gradient's norm is the same at both steps)."""
    n = 2 ** 31 + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2 ** 30:
        pytest.skip(f"needs ~40 GiB of free GPU memory, {free / 2 ** 30:.0f} GiB free")
    pattern = torch.linspace(-2, 2, 1024, device="cuda").to(torch.bfloat16)
    big = torch.nn.Parameter(pattern.repeat(n // 1024 + 1)[:n].contiguous())
    tail = big.detach()[-1024:].clone()
    small = torch.nn.Parameter(tail.clone())
    cfg = dict(topC=1, synced=False, weight_decay=0.1, lr=1e-2)
    opt_big = AdamCM([big], backend="triton", **cfg)
    opt_small = AdamCM([small], backend="reference", **cfg)
    for t in range(2):
        big.grad = (big.detach() * (1 + t)).to(torch.bfloat16)
        small.grad = (small.detach() * (1 + t)).to(torch.bfloat16)
        opt_big.step()
        opt_small.step()
        sb, ss = opt_big.state[big], opt_small.state[small]
        atol, rtol = TOLERANCE[torch.bfloat16]
        torch.testing.assert_close(big.detach()[-1024:].float(), small.detach().float(),
                                   atol=atol, rtol=rtol)
        for key in ("exp_avg", "exp_avg_sq", "cm_sum"):
            torch.testing.assert_close(sb[key][-1024:].float(), ss[key].float(),
                                       atol=atol, rtol=rtol)
        torch.testing.assert_close(sb["cm_buffer"][:, -1024:].float(),
                                   ss["cm_buffer"].float(), atol=atol, rtol=rtol)
        assert torch.equal(sb["cm_count"], ss["cm_count"])
    del big, opt_big
    torch.cuda.empty_cache()
