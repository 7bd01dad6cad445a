"""The Triton launcher's host side: the pointer tables (plans) each group owns, their
reuse across steps, new gradients, alignment buckets, stale addresses, and the plans a
CUDA graph captured. Kernels run under the interpreter without a CUDA device (see
test_triton.py); some tests stub the launches, timing only the host's work."""

import gc
import weakref

import pytest
import torch

from cm_fused import AdamCM
from compare import TOLERANCE, copy_params, make_params, run_lockstep, set_grads
from family import EVERY

from triton_common import DEVICE, SHAPES, backend_available, ref, tri  # noqa: F401


def plans_of(opt) -> list:
    """The plans the optimizer's groups own (their step-counter lists hold them)."""
    return [plan for lists in opt._runner._lists.values() if "step" in lists
            for plan in lists["step"].plans.values()]


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
    (opt, _), _ = run_lockstep(odd_views(tri(topC=2)), odd_views(ref(topC=2)), shapes, 4,
                               device=DEVICE)
    assert [b.aligned for plan in plans_of(opt) for b in plan.buckets] == [False]
    (opt, _), _ = run_lockstep(tri(topC=2), ref(topC=2), [(64,), (8, 4)], 2, device=DEVICE)
    assert [b.aligned for plan in plans_of(opt) for b in plan.buckets] == [True]


def test_plans_a_captured_graph_uses_are_never_freed(small_chunks, monkeypatch):
    """While a CUDA graph captures (simulated: the check is patched), a plan the step
    uses is kept for good, so that nothing (other plans, a rebuild of the group's own)
    can free the tables the graph reads; a step with tensors never stepped eagerly is
    refused then, with the reason (its tables would need host-to-device copies)."""
    params = make_params(SHAPES)
    opt = AdamCM(params, backend="triton")
    set_grads(params, 0)
    opt.step()  # warm-up: state and tables
    monkeypatch.setattr(small_chunks, "_capturing", lambda t: True)
    opt.step()  # "captured" (a graph's gradients are static tensors: the same pointers)
    assert len(small_chunks._captured) == 1
    other = make_params([(3,)])
    set_grads(other, 0)
    fresh = AdamCM(other, backend="triton")
    with pytest.raises(RuntimeError, match="warm-up"):
        fresh.step()
    monkeypatch.setattr(small_chunks, "_capturing", lambda t: False)
    for i in range(small_chunks.CACHE_SIZE + 2):  # other plans (LRU and owned)
        ps = make_params([(i + 1,)])
        set_grads(ps, 0)
        AdamCM(ps, backend="triton").step()
    builds = small_chunks.stats["builds"]
    opt.step()
    assert small_chunks.stats["builds"] == builds  # the captured plan was still there
    (graph_plan,) = small_chunks._captured.values()
    held = graph_plan.grad_ptrs
    keep = [p.grad for p in params]
    monkeypatch.setattr(small_chunks, "_capturing", lambda t: True)
    set_grads(params, 1)  # new gradients while capturing: refused, nothing rewritten
    with pytest.raises(RuntimeError, match="warm-up"):
        opt.step()
    monkeypatch.setattr(small_chunks, "_capturing", lambda t: False)
    set_grads(params, 1)  # new gradients after the capture: the graph's tables stay
    opt.step()
    assert graph_plan.grad_ptrs == held and small_chunks.stats["builds"] == builds + 1
    assert graph_plan in small_chunks._graph_held
    small_chunks.release_captured_plans()
    assert not small_chunks._captured and not small_chunks._graph_held
    del keep


def test_alignment_is_decided_per_tensor(small_chunks):
    """One odd tensor (15 fp32 elements: its slots are not 16-byte aligned) in a group of
    aligned ones gets a bucket of its own; the others keep the vector path."""
    shapes = [(64,), (3, 5), (8, 4), (128,)]
    (opt, _), _ = run_lockstep(tri(topC=2), ref(topC=2), shapes, 2, device=DEVICE)
    (plan,) = plans_of(opt)
    buckets = {b.aligned: b.n for b in plan.buckets}
    assert buckets == {True: 3, False: 1}


def test_a_cache_hit_rebuilds_nothing_and_new_gradients_move_only_their_rows(small_chunks):
    """Unchanged tensors: every step a plan-cache hit. New gradient tensors (what
    zero_grad(set_to_none=True) hands out): only the gradient rows of the tables are
    rewritten, no rebuild, and the step reads the new gradients (it matches the
    reference). A replaced state entry, or a gradient no longer 16-byte aligned in an
    aligned bucket, rebuilds."""
    shapes = [(64,), (8, 8), (3, 5), (4097,)]
    params = make_params(shapes, device=DEVICE)
    twins = copy_params(params)
    opt, twin = AdamCM(params, backend="triton", topC=3), AdamCM(twins, backend="reference",
                                                                  topC=3)

    def step(i, regrad):
        for ps, o in ((params, opt), (twins, twin)):
            if regrad:
                set_grads(ps, i)
            o.step()
        atol, rtol = TOLERANCE[torch.float32]
        for a, b in zip(params, twins):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)

    step(0, regrad=True)
    builds, hits, moves = (small_chunks.stats[k] for k in ("builds", "hits", "grad_refreshes"))
    keep = []
    for i in range(1, 4):
        keep += [p.grad for p in params]  # alive: the new gradients' addresses must differ
        step(i, regrad=True)
    for p in params:  # the same gradient storage, new values: a plain hit
        p.grad.copy_(torch.randn_like(p.grad))
    for p, twin_p in zip(params, twins):
        twin_p.grad.copy_(p.grad)
    step(4, regrad=False)
    assert small_chunks.stats["builds"] == builds
    assert small_chunks.stats["grad_refreshes"] == moves + 3
    assert small_chunks.stats["hits"] == hits + 4

    opt.state[params[0]]["exp_avg"] = opt.state[params[0]]["exp_avg"].clone()
    step(5, regrad=False)
    assert small_chunks.stats["builds"] == builds + 1  # a replaced state entry is seen

    storage = torch.zeros(64 + 1, device=DEVICE)  # a gradient at an address 4 bytes off
    params[0].grad = storage[1:].copy_(params[0].grad)
    twins[0].grad = params[0].grad.clone()
    step(6, regrad=False)
    assert small_chunks.stats["builds"] == builds + 2
    del keep


@pytest.mark.parametrize("name", ["adamcm", "adamam"])
def test_plans_belong_to_their_group_however_many_groups_and_optimizers(name, monkeypatch):
    """Two optimizers of 48 param groups each (per-layer lr decay): one plan per group,
    built at the first step, none rebuilt on settled steps (one LRU of 32 for every
    group rebuilt 480 in 5 steps), and freed with the optimizer. Launches stubbed: the
    host's work only."""
    from cm_fused.triton import launch
    monkeypatch.setattr(launch, "_launch", lambda *a, **k: None)
    params = [make_params([(8,), (3,)], device=DEVICE, seed=i) for i in range(96)]
    opts = [EVERY[name].cls([{"params": ps, "lr": 1e-3 * 0.9 ** i}
                             for i, ps in enumerate(params[k * 48:(k + 1) * 48])],
                            backend="triton") for k in range(2)]
    builds = launch.stats["builds"]
    for t in range(5):
        for ps in params:
            set_grads(ps, t)
        for opt in opts:
            opt.step()
        assert launch.stats["builds"] - builds == 96, t
    plans = [weakref.ref(plan) for plan in plans_of(opts[0])]
    assert len(plans) == 48 and all(p() is not None for p in plans)
    del opts[0]
    gc.collect()
    assert all(p() is None for p in plans)


@pytest.mark.parametrize("swap", ["state", "param"])
def test_a_storage_swapped_in_place_never_reaches_a_kernel(small_chunks, swap):
    """A state or param tensor whose storage is swapped in place (``.data =``, as
    offloading helpers do) keeps its object, so nothing else says it moved: its table
    row would hold a freed address. The launcher compares addresses before the launch and
    rebuilds; the step writes the new storage, in lock step with the reference."""
    params = make_params(SHAPES, device=DEVICE)
    twins = copy_params(params)
    opt, twin = AdamCM(params, backend="triton", topC=2), AdamCM(twins, backend="reference",
                                                                  topC=2)
    for t in range(2):
        for ps, o in ((params, opt), (twins, twin)):
            set_grads(ps, t)
            o.step()
    builds, stale = small_chunks.stats["builds"], small_chunks.stats["stale"]
    for o, ps in ((opt, params), (twin, twins)):
        target = o.state[ps[2]]["exp_avg"] if swap == "state" else ps[2]
        target.data = target.data.clone()  # the old storage is freed
    for t in range(2, 4):
        for ps, o in ((params, opt), (twins, twin)):
            set_grads(ps, t)
            o.step()
    atol, rtol = TOLERANCE[torch.float32]
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    torch.testing.assert_close(opt.state[params[2]]["exp_avg"],
                               twin.state[twins[2]]["exp_avg"], atol=atol, rtol=rtol)
    assert small_chunks.stats["builds"] == builds + 1
    assert small_chunks.stats["stale"] == stale + (swap == "state")


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device (none in this process)")
def test_gpu_a_plan_used_on_a_side_stream_is_held_for_it():
    """Tables built on one stream and launched on another are recorded for the second
    (record_stream), so that freeing them (a rebuild) waits for both; the steps on either
    stream match the reference."""
    params = make_params(SHAPES, device=DEVICE)
    twins = copy_params(params)
    opt, twin = AdamCM(params, backend="triton", topC=2), AdamCM(twins, backend="reference",
                                                                  topC=2)
    side = torch.cuda.Stream()
    for t in range(4):
        for ps, o in ((params, opt), (twins, twin)):
            set_grads(ps, t)
            if t % 2:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    o.step()
                torch.cuda.current_stream().wait_stream(side)
            else:
                o.step()
    torch.cuda.synchronize()
    (plan,) = plans_of(opt)
    assert plan.streams == {torch.cuda.current_stream().cuda_stream, side.cuda_stream}
    atol, rtol = TOLERANCE[torch.float32]
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def _grad_rows(plan) -> list:
    """The gradient addresses the plan's tables hold, in the group's tensor order."""
    rows = {}
    for b in plan.buckets:
        grad_row = b.tab[b.n:2 * b.n].tolist()  # (kernels.BUCKET_ROWS: p, g, ...)
        rows.update(zip(b.idx, grad_row))
    return [rows[i] for i in range(plan.T)]


@pytest.mark.parametrize("name", ["adamcm", "adamam"])
def test_a_whole_iteration_capture_takes_the_gradients_its_backward_allocates(
        small_chunks, monkeypatch, name):
    """torch's whole-iteration recipe: zero_grad(set_to_none=True), then forward,
    backward and step in one capture, so the step meets gradient tensors it has never
    seen (simulated: the capture check is patched, and on the CPU the captured copies run
    at once). Their rows are written by copies the graph would replay, with no rebuild;
    an eager step with those gradients writes them again (it may come before any
    replay); other gradients then get tables of their own, never the graph's; every step
    in lock step with the reference."""
    cls = EVERY[name].cls
    params = make_params(SHAPES, device=DEVICE)
    twins = copy_params(params)
    opt, twin = cls(params, backend="triton"), cls(twins, backend="reference")
    atol, rtol = TOLERANCE[torch.float32]
    keep = []

    def step(t, capturing=False):
        for ps in (params, twins):
            set_grads(ps, t)
        keep.extend(p.grad for p in params)  # (alive: every step's addresses differ)
        monkeypatch.setattr(small_chunks, "_capturing", lambda _: capturing)
        opt.step()
        twin.step()
        monkeypatch.setattr(small_chunks, "_capturing", lambda _: False)
        for a, b in zip(params, twins):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)

    step(0)
    step(1)  # warm-up
    builds, moves = small_chunks.stats["builds"], small_chunks.stats["grad_refreshes"]
    step(2, capturing=True)
    (plan,) = small_chunks._graph_held[-1:]
    graph_grads = [p.grad.data_ptr() for p in params]
    assert small_chunks.stats["builds"] == builds
    assert plan.in_graph and plan.rows_on_replay and _grad_rows(plan) == graph_grads
    order = plan.bucket_order.tolist()  # the host buffer the graph reads at every replay
    assert plan.capture_rows.tolist() == [graph_grads[i] for i in order]

    for p, twin_p in zip(params, twins):  # an eager step on the graph's own gradients
        p.grad.copy_(torch.randn_like(p.grad))
        twin_p.grad = p.grad.clone()
    opt.step()
    twin.step()
    assert small_chunks.stats["grad_refreshes"] == moves + 2 and not plan.rows_on_replay
    step(3)  # other gradients: a plan of their own; the graph's rows stay
    assert small_chunks.stats["builds"] == builds + 1
    assert _grad_rows(plan) == graph_grads and plan in small_chunks._graph_held
    small_chunks.release_captured_plans()
