"""What is particular to the Triton backend: plan caching, alignment, specialisation,
chunking, the op, and the GPU-only tests. Its lock step with the reference, for every
optimizer, is in test_matrix.py.

Without a CUDA device the kernels run on CPU tensors under the Triton interpreter
(conftest.py sets TRITON_INTERPRET=1); that is slow, so these tests use small tensors,
tens of steps, and a shrunken chunk size so that tensors still span several chunks.
Tests marked ``gpu`` need a CUDA device and skip, saying so, without one.
"""

import pytest
import torch

import cm_fused
from cm_fused import AdamAM, AdamCM
from cm_fused.contract import StepArgs, Variant
from compare import (TOLERANCE, assert_bit_identical, copy_params, make_params, op_args,
                     run_lockstep, set_grads)
from family import EVERY, FAMILY, make

from triton_common import (DEVICE, HAS_CUDA, REASON, SHAPES, backend_available,  # noqa: F401
                           ref, tri, triton_backend)


def lockstep(cfg, shapes=SHAPES, steps=12, dtype=torch.float32, name="adamcm", **kw):
    return run_lockstep(make(name, "triton", **cfg), make(name, "reference", **cfg), shapes,
                        steps, dtype=dtype, device=DEVICE, **kw)


# ------------------------------------------------------------ backend interface

def test_backend_is_available_and_says_what_it_takes():
    assert cm_fused.backends()["triton"] == "available"
    dev = torch.device(DEVICE)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert triton_backend.unsupported_reason(dev, {dtype}) is None
    reason = triton_backend.unsupported_reason(dev, {torch.float32, torch.float64})
    assert reason and "float64" in reason
    assert "CUDA" in triton_backend.unsupported_reason(torch.device("meta"), {torch.float32})


def test_every_backend_takes_the_one_step_contract():
    """The step's arguments are declared once (cm_fused.contract.StepArgs): each backend's
    step takes that bundle, and the ops' schema is generated from it."""
    import inspect

    from cm_fused import contract, cpu, reference
    for backend in (reference, cpu, triton_backend):
        assert list(inspect.signature(backend.step).parameters) == ["args"]
    schema = str(torch.ops.cm_fused_triton.step_.default._schema)
    assert schema == "cm_fused_triton::step_" + contract.SCHEMA


# ------------------------------------------------------------ long runs, chunking

@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == "adamcm" else pytest.mark.slow)
                                  for n in FAMILY])  # (the others under -m slow)
def test_long_run_matches_reference(small_chunks, monkeypatch, name):
    """60 steps (keys rise and fall many times over, the buffer keeps turning over) on
    small tensors, one of three 16-element chunks (the last one short), some gradients
    missing, every optimizer's "all" configuration."""
    monkeypatch.setattr(small_chunks, "CHUNK", 16)
    monkeypatch.setattr(small_chunks, "BLOCK", 8)
    lockstep({**FAMILY[name].configs["all"], "topC": 3, "decay": 0.9}, name=name,
             shapes=[(37,), (), (3, 5)], steps=60,
             missing=lambda t: {0} if t % 5 == 2 else ({1, 2} if t % 7 == 3 else ()))


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
                              "-k", "test_every_backend_takes_the_one_step_contract"]))
    """))
    out = subprocess.run([sys.executable, str(script), __file__], capture_output=True,
                         text=True, timeout=300, cwd=os.path.dirname(__file__))
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert ("1 error" in out.stdout or "1 failed" in out.stdout) and "skipped" not in out.stdout
    assert "simulated kernel load failure" in out.stdout, \
        out.stdout[-3000:]


def test_many_chunks_per_tensor_and_short_last_chunks(small_chunks, monkeypatch):
    """64-element chunks in loops of 16: 257 = 4 chunks + 1, 66 = 64 + 2."""
    monkeypatch.setattr(small_chunks, "CHUNK", 64)
    monkeypatch.setattr(small_chunks, "BLOCK", 16)
    for name in FAMILY:
        lockstep(FAMILY[name].configs["all"], name=name,
                 shapes=[(257,), (66,), (), (64,), (0,)], steps=4)


# The only constexprs a launch may have: dtypes, on/off switches, tile sizes. Nothing a
# scheduler or a user changes between steps.
STRUCTURAL_CONSTEXPRS = {"G_DT", "HAS_SCALE", "BLOCK", "RBLOCK", "SYNCED", "HAS_RAND",
                         "HAS_FOUND_INF", "CP", "TB", "VARIANT", "P_DT", "M_DT", "V_DT",
                         "X_DT", "B_DT", "S_DT", "LR_IS_PTR", "HAS_MOM", "HAS_X", "MAXIMIZE",
                         "ALIGNED", "NS", "REDUCE", "PHASE", "QB", "DEFER",
                         "ROUNDING", "HAS_S"}


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
            group = opt.param_groups[0]
            group["weight_decay"] = 0.1 * t
            if "lam" in group:  # adaptive memory
                group["lam"] = 0.1 + 0.05 * t
            if "beta_max" in group:
                group["beta_max"] = 0.9 - 0.01 * t
            elif "betas" in group:
                group["betas"] = (0.9 - 0.01 * t, 0.999 - 0.0001 * t)
            else:
                group["momentum"] = 0.9 - 0.01 * t
                for key, value in (("dampening", 0.1 * t), ("alpha", 0.99 - 0.01 * t)):
                    if key in group:
                        group[key] = value
            set_grads(params, t, 1)
            opt.step()
            out.append([(name, spec, const) for name, grid, spec, const, _ in launch.launch_log])
        finally:
            launch.launch_log = None
    return out


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("name", list(EVERY))
def test_changing_hyperparameters_does_not_respecialise_kernels(small_chunks, tensor_lr, name):
    """Triton compiles one kernel per specialisation: constexpr values and argument types
    (not float values). Under the interpreter nothing is compiled, so this compares what
    each launch would be specialised on; the gpu test below counts real compilations."""
    params = make_params(SHAPES, device=DEVICE)
    lr = torch.tensor(1e-3, device=DEVICE) if tensor_lr else 1e-3
    extra = {"sgdcg": dict(momentum=0.9, critical_test=0.2),
             "rmspropcg": dict(momentum=0.9, centered=True), "adamam": {}, "sgdam": {}
             }.get(name, dict(critical_test=0.2))
    if EVERY[name].buffered:
        extra["decay"] = 0.9
    opt = make(name, "triton", lr=lr, **extra)(params)
    specs = _specialisations(small_chunks, opt, params, [1e-3, 5e-4, 0.0, 3e-2])
    # norm (AM: sums), reduce, decide, update: one dtype bucket (AdamCM with fp32 params:
    # update, reduce, decide)
    assert len(specs[0]) == (3 if name == "adamcm" else 4)
    assert all(s == specs[1] for s in specs[1:])
    # the first step differs from later ones only by... nothing: same launches
    assert specs[0] == specs[1]
    constexprs = {k for _, _, const in specs[0] for k, _ in const}
    assert constexprs <= STRUCTURAL_CONSTEXPRS, constexprs - STRUCTURAL_CONSTEXPRS
    assert all(spec.count("fp32") >= 2 for _, spec, _ in specs[0][2:])  # decide, update


def test_topc_beyond_the_backends_bound_is_refused_at_construction():
    p = torch.nn.Parameter(torch.ones(3, device=DEVICE))
    AdamCM([p], backend="triton", topC=triton_backend.CAPABILITIES.max_top_c)
    with pytest.raises(ValueError, match="takes topC <= 256"):
        AdamCM([p], backend="triton", topC=triton_backend.CAPABILITIES.max_top_c + 1)
    opt = AdamCM([p], backend="triton", topC=3)
    with pytest.raises(ValueError, match="takes topC <= 256"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, device=DEVICE))],
                             "topC": 300})
    assert len(opt.param_groups) == 1
    AdamCM([p], backend="reference", topC=300)  # the reference has no bound


def test_pending_inserts_it_cannot_defer_are_refused_and_change_nothing():
    """As the C++ op's: pending inserts are AdamCM's, fp32 params, whole steps."""
    for variant, dtype, phase in ((Variant.ADAM_CG, torch.float32, 0),
                                  (Variant.ADAM_CM, torch.bfloat16, 0),
                                  (Variant.ADAM_CM, torch.float32, 1)):
        args = op_args(variant, dtype=dtype, device=DEVICE)
        args.pending = [torch.tensor(-1, device=DEVICE) for _ in args.params]
        args.phase = phase
        if phase:
            args.reduced = torch.zeros(3, 1, dtype=torch.float64, device=DEVICE)
        before = [[t.clone() for t in a] if isinstance(a, list) else a for a in args.op_args()]
        with pytest.raises(ValueError, match="pending inserts"):
            triton_backend.step(args)
        for a, b in zip(args.op_args(), before):
            if isinstance(a, list):
                assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------ the custom op

@pytest.mark.parametrize("variant", list(Variant), ids=lambda v: v.name)
def test_custom_op_opcheck(variant):
    op = torch.ops.cm_fused_triton.step_.default
    torch.library.opcheck(op, op_args(variant, device=DEVICE).op_args())  # schema, fake, aot


def test_compiled_step_goes_through_the_op_and_matches_eager():
    """Eager steps call the launcher directly; under torch.compile the backend calls the
    custom op, which traces with fullgraph=True and steps bit-identically."""
    eager = op_args(device=DEVICE)
    traced = StepArgs(*[[t.clone() for t in x] if isinstance(x, list) else x
                        for x in eager.op_args()])
    compiled = torch.compile(triton_backend.step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        triton_backend.step(eager)
        compiled(traced)
    for name in ("params", "momenta", "second_moments", "buffers", "keys", "counts", "sums",
                 "steps"):
        for i, (x, y) in enumerate(zip(getattr(eager, name), getattr(traced, name))):
            assert torch.equal(x, y), f"{name}[{i}]"


# ------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none in this process)")
def test_gpu_opcheck_with_aot_dispatch():
    for variant in Variant:
        torch.library.opcheck(torch.ops.cm_fused_triton.step_.default,
                              op_args(variant, device="cuda").op_args())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none in this process)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_real_sizes_match_reference(small_chunks, monkeypatch, dtype):
    from cm_fused.triton import launch
    monkeypatch.setattr(launch, "CHUNK", 8192)
    monkeypatch.setattr(launch, "BLOCK", 512)
    shapes = [(1000, 1000), (4097,), (3, 257, 129), (), (0,), (8193,), (512, 3)]
    for cfg in (dict(), dict(synced=False, amsgrad=True, weight_decay=0.1, topC=3),
                dict(buffer_dtype=torch.bfloat16, critical_test=0.2),
                dict(buffer_dtype=torch.int8, synced=False)):  # (bytes: within 1e-6, exact)
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
    from cm_fused.triton import launch
    for i in range(launch.CACHE_SIZE + 2):  # other plans come and go: the graph's stays
        ps = make_params([(i + 1,)], device="cuda")
        set_grads(ps, 0)
        AdamCM(ps, backend="triton").step()
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
    launch.release_captured_plans()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none in this process)")
@pytest.mark.parametrize("name", list(EVERY))
def test_gpu_whole_iteration_graph_matches_eager(name):
    """torch's whole-iteration recipe (docs/backends.md): warm-up on a side stream,
    zero_grad(set_to_none=True), then forward, backward and step in one capture, whose
    backward allocates new gradient tensors; the replays match the same model trained
    eagerly, with a scheduler changing the tensor lr in place."""
    import copy
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 8)).cuda()
    twin = copy.deepcopy(model)
    cls = EVERY[name].cls

    def make_opt(m):
        lr = torch.tensor(2e-3, device="cuda")
        return cls(m.parameters(), **{**EVERY[name].configs["tensor_lr"], "lr": lr},
                   backend="triton")
    opt, eager = make_opt(model), make_opt(twin)
    batches = [(torch.randn(16, 32, device="cuda"), torch.randn(16, 8, device="cuda"))
               for _ in range(12)]
    static_x, static_y = (t.clone() for t in batches[0])

    def iteration(m, o, x, y):
        o.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            iteration(model, opt, static_x, static_y)
            iteration(twin, eager, x, y)
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.nn.functional.mse_loss(model(static_x), static_y).backward()
        opt.step()
    for t, (x, y) in enumerate(batches[3:], start=3):
        for o in (opt, eager):
            o.param_groups[0]["lr"].fill_(2e-3 / (1 + t))
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        iteration(twin, eager, x, y)
    torch.cuda.synchronize()
    atol, rtol = TOLERANCE[torch.float32]  # (the two backward passes may pick other GEMMs)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    from cm_fused.triton import launch
    launch.release_captured_plans()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none in this process)")
def test_gpu_steps_on_the_current_stream():
    """Gradients written on a side stream and the step launched on it (no sync between):
    the kernels must run on that stream, after the writes."""
    shapes = [(1000, 1000), (4097,), ()]
    a, b = make_params(shapes, device="cuda"), make_params(shapes, device="cuda")
    opt_a, opt_b = AdamAM(a, backend="triton"), AdamAM(b, backend="reference")
    side = torch.cuda.Stream()
    for t in range(5):
        set_grads(b, t, 1)
        opt_b.step()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for p, q in zip(a, b):
                p.grad = q.grad.clone() * 1.0
            opt_a.step()
        torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


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
