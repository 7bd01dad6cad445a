"""What the processes of the distributed tests run (tests/test_distributed.py).

Every rank runs the same small model with an uneven shard (dim 0 of 7, 5 and 1 rows over
2 ranks: the last layer's shards are empty on rank 1) and a parameter that has no
gradient on one step; rank r trains on half r of each batch, the single-process run on
the whole batch (loss means: the same gradients up to rounding). Results are saved to
files that the test compares; nothing here asserts, so a failure shows in pytest.
"""
from __future__ import annotations

import datetime
import gc
import os
import sys
import time
import traceback
from pathlib import Path

import torch

STEPS = 20
NO_GRAD_AT = 7  # the step on which a parameter has no gradient
BATCH = 16


# The bound on a launch (and on one collective) is there to stop a hang, not to fail a
# slow machine: generous (the slowest launch, the FSDP2 comparison of every optimizer,
# took 70 s on a 2-core machine shared with other work, 2026-12-03), and
# CM_FUSED_DIST_TIMEOUT_S changes it where even that is short.
TIMEOUT_S = float(os.environ.get("CM_FUSED_DIST_TIMEOUT_S", 900))


def launch(fn, world: int, tmp: Path, args: tuple = (), timeout: float | None = None) -> None:
    """Run ``fn(rank, world, tmp, *args)`` in ``world`` fresh processes that form a gloo
    process group over loopback (a file rendezvous in ``tmp``: no port to collide with a
    parallel run); raise with the failing rank's traceback, or after ``timeout`` s
    (default TIMEOUT_S)."""
    timeout = TIMEOUT_S if timeout is None else timeout
    import torch.multiprocessing as mp

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    store = tmp / f"rendezvous-{time.monotonic_ns()}"
    ctx = mp.start_processes(_entry, args=(world, str(store), fn, str(tmp), args),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__}: {world} ranks did not finish in "
                                   f"{timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _entry(rank, world, store, fn, tmp, args):
    import torch.distributed as dist

    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, world, Path(tmp), *args)
        dist.barrier()  # every rank done with every collective before any tears down
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    # Done, results saved: leave without the interpreter's exit-time destructors, in which
    # gloo's threads now and then abort the process ("terminate called without an active
    # exception", about one launch in ten on this machine).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------ the training run

def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(),
                         nn.Linear(5, 1))


def sharded_model(mesh) -> torch.nn.Module:
    """make_model() under FSDP2: each layer, then the root, sharded over ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(t: int, rank: int | None, world: int):
    """Step t's batch: all of it (rank None) or rank's share."""
    g = torch.Generator().manual_seed(1000 + t)
    x, y = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 1, generator=g)
    if rank is None:
        return x, y
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def make_optimizer(model, spec: dict):
    import cm_fused

    spec = dict(spec)
    cls = getattr(cm_fused, spec.pop("optimizer"))
    params = list(model.parameters())
    if spec.pop("two_groups", False):
        return cls([{"params": params[:2]}, {"params": params[2:], "lr": spec["lr"] / 2}],
                   **spec)
    return cls(params, **spec)


def train(model, opt, steps: range, rank: int | None, world: int,
          rng_per_rank: bool = True) -> None:
    """``steps`` of training on rank's share of the data (rank None: all of it). With
    ``rng_per_rank`` each rank's random generator starts differently (as dropout would
    leave them), rank 0's as the single process's: critical_test's coins must still be
    the same on every rank (the optimizer broadcasts them for sharded tensors)."""
    if steps.start == 0:
        torch.manual_seed(100 + ((rank or 0) if rng_per_rank else 0))
    no_grad = list(model.parameters())[3]  # the second layer's bias
    for t in steps:
        opt.zero_grad()
        x, y = batch(t, rank, world)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if t == NO_GRAD_AT:
            no_grad.grad = None
        opt.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def snapshot(model, opt) -> dict:
    """Parameters and optimizer state, whole (DTensors gathered), by parameter index."""
    params = list(model.parameters())
    if hasattr(opt, "flush_buffers"):  # (the fused backends leave AdamCM's inserts pending)
        opt.flush_buffers()
    state = {}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        state[i] = {k: _full(v).detach().clone() for k, v in st.items()
                    if isinstance(v, torch.Tensor)}
        state[i]["__types__"] = {k: type(v).__name__ for k, v in st.items()}
        state[i]["__placements__"] = {k: str(tuple(v.placements)) for k, v in st.items()
                                      if hasattr(v, "placements")}
    norm = getattr(opt, "grad_norm", None)  # (max_grad_norm: the last step's norm)
    return {"params": [_full(p).detach().clone() for p in params], "state": state,
            "grad_norm": None if norm is None else norm.clone()}


# ------------------------------------------------------------------ scenarios

def fsdp_vs_single(rank: int, world: int, tmp: Path, specs: dict) -> None:
    """Each spec: FSDP2 over the ranks, and (rank 0) one process, the same 20 steps."""
    from torch.distributed.device_mesh import init_device_mesh

    for name, spec in specs.items():
        spec = dict(spec)
        # HSDP: a 2-D mesh, replicated over its first dimension (of size 1 here), sharded
        # over its second: the sums are exchanged over the second only.
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")) \
            if spec.pop("hsdp", False) else init_device_mesh("cpu", (world,))
        model = sharded_model(mesh)
        opt = make_optimizer(model, spec)
        start = time.perf_counter()
        train(model, opt, range(STEPS), rank, world)
        result = {"sharded": snapshot(model, opt), "seconds": time.perf_counter() - start,
                  "local_numels": [p.to_local().numel() for p in model.parameters()]}
        if rank == 0:
            result["single"] = one_process(spec, world)
        torch.save(result, tmp / f"fsdp-{name}-rank{rank}.pt")


def one_process(spec: dict, world: int) -> dict:
    """The same training on the whole batches, in this process alone."""
    model = make_model()
    opt = make_optimizer(model, spec)
    train(model, opt, range(STEPS), None, world)
    return snapshot(model, opt)


def ddp_vs_single(rank: int, world: int, tmp: Path, specs: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel

    for name, spec in specs.items():
        model = DistributedDataParallel(make_model())
        opt = make_optimizer(model.module, spec)
        # Replicated tensors: nothing is exchanged, so the coins need the same generator.
        train(model, opt, range(STEPS), rank, world, rng_per_rank=False)
        result = {"ddp": snapshot(model.module, opt)}
        del model, opt  # DDP's reducer before the group goes (its threads use it)
        gc.collect()
        if rank == 0:
            result["single"] = one_process(spec, world)
        torch.save(result, tmp / f"ddp-{name}-rank{rank}.pt")


def dcp_run(rank: int, world: int, tmp: Path, spec: dict, phase: str) -> None:
    """phase "first": train 0..10, save with torch.distributed.checkpoint, go on to 20.
    phase "resume" (fresh processes): load the step-10 checkpoint, train 10..20.
    phase "resize": load it (into another world size), saving what the load raised."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    model = sharded_model(init_device_mesh("cpu", (world,)))
    opt = make_optimizer(model, spec)
    half = STEPS // 2
    where = str(tmp / "checkpoint")
    if phase == "first":
        train(model, opt, range(half), rank, world)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=where)
        # critical_test's coins come from torch's generator, which a resume restores too
        torch.save(torch.get_rng_state(), tmp / f"rng-rank{rank}.pt")
    else:
        msd, osd = get_state_dict(model, opt)  # (steps once with lr 0 to make the state)
        loaded = {"model": msd, "optim": osd}
        if phase == "resize":
            from torch.distributed.checkpoint.api import CheckpointException

            try:
                dcp.load(loaded, checkpoint_id=where)
                raised = ("no error", "")
            # (recorded for the test to judge; DCP's own is not an Exception)
            except (Exception, CheckpointException) as e:  # noqa: BLE001
                raised = (type(e).__name__, str(e))
            torch.save(raised, tmp / f"dcp-resize-rank{rank}.pt")
            return
        dcp.load(loaded, checkpoint_id=where)
        set_state_dict(model, opt, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optim"])
        torch.set_rng_state(torch.load(tmp / f"rng-rank{rank}.pt"))
    train(model, opt, range(half, STEPS), rank, world)
    torch.save(snapshot(model, opt), tmp / f"dcp-{phase}-rank{rank}.pt")


def refusals(rank: int, world: int, tmp: Path) -> None:
    """What a step or a load refuses, each recorded as (exception type, message), and
    whether the refused calls left parameters and state as they were."""
    import cm_fused
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    P = torch.nn.Parameter
    got, unchanged = {}, {}

    def attempt(name, fn, params, opt):
        before = [p.to_local().clone() if isinstance(p, DTensor) else p.detach().clone()
                  for p in params]
        state = {id(k): {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
        try:
            fn()
            got[name] = ("no error", "")
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            got[name] = (type(e).__name__, str(e))
        after = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        now = {id(k): v for k, v in opt.state.items()}
        unchanged[name] = all(torch.equal(a, b) for a, b in zip(before, after)) and (
            now.keys() == state.keys() and all(
            now[k].keys() == v.keys() and all(torch.equal(_full(now[k][n]), _full(t))
                                             for n, t in v.items())
            for k, v in state.items()))

    partial = P(DTensor.from_local(torch.ones(3), mesh, [Partial()]))
    partial.grad = DTensor.from_local(torch.ones(3), mesh, [Partial()])
    opt = cm_fused.AdamCM([partial], backend="cpu")
    attempt("partial", opt.step, [partial], opt)

    # stochastic rounding counts elements in the whole tensor: a dim-1 shard's are not
    # contiguous there (a plain bf16 tensor in the group first: nothing may step)
    plain = P(torch.ones(3, dtype=torch.bfloat16))
    plain.grad = torch.ones(3, dtype=torch.bfloat16)
    col = P(distribute_tensor(torch.ones(4, 6, dtype=torch.bfloat16), mesh, [Shard(1)]))
    col.grad = distribute_tensor(torch.ones(4, 6, dtype=torch.bfloat16), mesh, [Shard(1)])
    opt = cm_fused.AdamCM([plain, col], backend="cpu", stochastic_rounding=True)
    attempt("rounding_dim1", opt.step, [plain, col], opt)

    torch.manual_seed(0)
    p = P(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])
    opt = cm_fused.AdamCM([p], backend="cpu")
    attempt("misplaced_grad", opt.step, [p], opt)

    for _ in range(2):  # settled: the state checks are skipped, the gradients' are not
        p.grad = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
        opt.step()
    p.grad = distribute_tensor(torch.randn(4, 3), mesh, [Replicate()])
    attempt("misplaced_grad_settled", opt.step, [p], opt)
    p.grad = distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)])
    plain = P(torch.randn(4, 3))
    plain.grad = torch.randn(4, 3)
    plain_opt = cm_fused.AdamCM([plain], backend="cpu")
    plain_opt.step()
    attempt("plain_checkpoint", lambda: opt.load_state_dict(plain_opt.state_dict()), [p], opt)

    other = P(torch.randn(5))
    other.grad = torch.randn(5)
    opt = cm_fused.SGDAM([p, other], backend="cpu")
    attempt("sgdam_mixed", opt.step, [p, other], opt)

    # 8-bit state quantizes a shard of dim 0 only (a plain tensor first: nothing may step)
    col = P(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))
    col.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
    for name, kw in (("eight_bit_dim1", dict(state_dtype=torch.int8)),
                     ("int8_slots_dim1", dict(buffer_dtype=torch.int8))):
        opt = cm_fused.AdamCM([other, col], backend="cpu", min_8bit_size=0, **kw)
        attempt(name, opt.step, [other, col], opt)
    # sharded state loads in the layout it was saved in (8-bit codes would be misread)
    eight = cm_fused.AdamCM([p], backend="cpu", state_dtype=torch.int8, min_8bit_size=0)
    eight.step()
    opt = cm_fused.AdamCM([p], backend="cpu")
    opt.step()
    attempt("eight_bit_into_full", lambda: opt.load_state_dict(eight.state_dict()), [p], opt)
    # what DCP hands a full-precision optimizer for an 8-bit checkpoint without a running
    # sum to miss (it loads into the optimizer's state as it is, casting the codes): only
    # the checkpoint's group still says they are codes
    saved = eight.state_dict()
    saved["state"] = {i: {k: v.float() if v.dtype == torch.uint8 else v
                          for k, v in st.items() if k != "moment_scales"}
                      for i, st in saved["state"].items()}
    attempt("eight_bit_cast", lambda: opt.load_state_dict(saved), [p], opt)
    got["unchanged"] = unchanged
    torch.save(got, tmp / f"refusals-rank{rank}.pt")


def mixed_group(rank: int, world: int, tmp: Path, specs: dict) -> None:
    """One param group holding a sharded DTensor, a replicated DTensor and a plain tensor
    (only the sharded one's sums are exchanged), vs the same tensors whole in one
    process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    shapes = [(5, 3), (4,), (2,)]
    out = {}
    for name, spec in specs.items():
        spec = dict(spec)
        cls = getattr(__import__("cm_fused"), spec.pop("optimizer"))
        torch.manual_seed(0)
        whole = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        placed = [torch.nn.Parameter(distribute_tensor(whole[0].detach(), mesh, [Shard(0)])),
                  torch.nn.Parameter(distribute_tensor(whole[1].detach(), mesh, [Replicate()])),
                  torch.nn.Parameter(whole[2].detach().clone())]
        opts = [cls(whole, **spec), cls(placed, **spec)]
        for t in range(STEPS):
            g = torch.Generator().manual_seed(t)
            grads = [torch.randn(s, generator=g) * (1 + t % 3) for s in shapes]
            for p, gr in zip(whole, grads):
                p.grad = gr.clone()
            placed[0].grad = distribute_tensor(grads[0], mesh, [Shard(0)])
            placed[1].grad = distribute_tensor(grads[1], mesh, [Replicate()])
            placed[2].grad = grads[2].clone()
            for opt in opts:
                opt.step()
        out[name] = {"whole": snapshot_params(whole, opts[0]),
                     "placed": snapshot_params(placed, opts[1])}
    torch.save(out, tmp / f"mixed-rank{rank}.pt")


# 8-bit state: shapes whose shards (dim 0 over 2 ranks) start at a multiple of 256
# elements (rows 0 and 32 of [64, 8], elements 0 and 256 of [512]: one process's
# blocks), and shapes whose do not (rank 1's shard of the [7, 100] weight starts at
# element 400, of the [5, 100] one at 300 and holds fewer blocks than rank 0's; the
# [1, 300] one is empty there).
ALIGNED = [(64, 8), (512,)]
UNALIGNED = [(7, 100), (5, 100), (1, 300)]


def eight_bit(rank: int, world: int, tmp: Path, specs: dict) -> None:
    """Each spec on each set of shapes: the tensors sharded on dim 0 and whole in this
    process, stepped with the same gradients (bit for bit: no reduce-scatter in between),
    the same coins (each run from the same seed)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    for name, spec in specs.items():
        spec = dict(spec)
        cls = getattr(__import__("cm_fused"), spec.pop("optimizer"))
        if spec.pop("hsdp", False):  # (as fsdp_vs_single's: replicated over 1 process)
            mesh, placements = init_device_mesh("cpu", (1, world)), [Replicate(), Shard(0)]
        else:
            mesh, placements = init_device_mesh("cpu", (world,)), [Shard(0)]
        for shapes, sizes in (("aligned", ALIGNED), ("unaligned", UNALIGNED)):
            torch.manual_seed(0)
            whole = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
            placed = [torch.nn.Parameter(distribute_tensor(w.detach(), mesh, placements))
                      for w in whole]
            got = {}
            for kind, params in (("whole", whole), ("placed", placed)):
                opt = cls(params, **spec)
                torch.manual_seed(100)  # (critical_test's coins)
                for t in range(STEPS):
                    g = torch.Generator().manual_seed(t)
                    for p, s in zip(params, sizes):
                        grad = torch.randn(s, generator=g) * (1 + t % 3)
                        p.grad = distribute_tensor(grad, mesh, placements) \
                            if kind == "placed" else grad
                    opt.step()
                got[kind] = snapshot_params(params, opt)
            got["local_numels"] = [p.to_local().numel() for p in placed]
            out[f"{name}-{shapes}"] = got
    torch.save(out, tmp / f"eight-bit-rank{rank}.pt")


def snapshot_params(params, opt) -> dict:
    class _Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = torch.nn.ParameterList(params)

    return snapshot(_Holder(), opt)
