"""What sharding costs a step: the exchange of the reduce pass's sums over processes.

Two processes (gloo over loopback, one thread each) hold the tensors of a parameter set
sharded on dim 0 (DTensors, as FSDP2 leaves them) and step them with a cm_fused
optimizer. Timed in alternating rounds, on the same local shards:

- ``sharded``: the step of DTensor parameters (split in two, the sums all-reduced);
- ``local``: the same shards stepped as plain tensors (no exchange: wrong keys, but the
  step's cost without the collective);
- ``collective``: the all-reduce alone, of the size the step sends;
- ``in step``: the time a sharded step spends in the exchange: the collective plus
  waiting for the slower rank (the step is a synchronisation point; under FSDP2 the
  gradients' reduce-scatter just before it is one already).

and, in one process, the whole tensors stepped as plain tensors (``one process``).

    python bench/distributed.py [--sets gpt2-11m] [--optimizers adamcm,adamam,sgdam]

Prints a table and writes it under bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import git_commit, versions  # noqa: E402
from param_sets import SETS  # noqa: E402

OPTIMIZERS = {"adamcm": ("AdamCM", {}), "adamam": ("AdamAM", {}), "sgdam": ("SGDAM", {})}


def _median_ms(xs):
    return statistics.median(xs) * 1e3


def _rank(rank, world, store, shapes, names, rounds, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import cm_fused

    torch.set_num_threads(1)
    in_step = []
    exchange = cm_fused.distributed.sum_over_shards

    def timed_exchange(*a):
        t0 = time.perf_counter()
        exchange(*a)
        in_step.append(time.perf_counter() - t0)

    cm_fused.distributed.sum_over_shards = timed_exchange
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    whole = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    rows = []
    for name in names:
        cls_name, kw = OPTIMIZERS[name]
        cls = getattr(cm_fused, cls_name)
        sharded = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)])) for w in whole]
        for p, gr in zip(sharded, grads):
            p.grad = distribute_tensor(gr, mesh, [Shard(0)])
        local = [torch.nn.Parameter(p.to_local().clone()) for p in sharded]
        for p, q in zip(local, sharded):
            p.grad = q.grad.to_local().clone()
        opts = {"sharded": cls(sharded, backend="cpu", **kw),
                "local": cls(local, backend="cpu", **kw)}
        T = len(shapes)
        ns = cls.variant.sums_per_tensor
        wire = (torch.zeros(2) if name == "sgdam" else
                torch.zeros(T, ns, dtype=torch.float64))
        times = {k: [] for k in (*opts, "collective")}
        in_step.clear()
        for r in range(rounds + 3):  # 3 warm-up rounds
            for key, opt in opts.items():
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                times[key].append(time.perf_counter() - t0)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(wire)
            times["collective"].append(time.perf_counter() - t0)
        row = {k: _median_ms(v[3:]) for k, v in times.items()}
        row["in step"] = _median_ms(in_step[3:])
        row["bytes"] = wire.numel() * wire.element_size()
        if rank == 0:
            plain = [torch.nn.Parameter(w.clone()) for w in whole]
            for p, gr in zip(plain, grads):
                p.grad = gr.clone()
            opt = cls(plain, backend="cpu", **kw)
            one = []
            for _ in range(rounds + 3):
                t0 = time.perf_counter()
                opt.step()
                one.append(time.perf_counter() - t0)
            row["one process"] = _median_ms(one[3:])
        rows.append((name, row))
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # (gloo's threads can abort the interpreter's exit: rows are saved)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="gpt2-11m")
    ap.add_argument("--optimizers", default="adamcm,adamam,sgdam")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    lines = [f"# bench/distributed.py: 2 ranks (gloo, loopback, 1 thread each), shards on "
             f"dim 0; cpu backend; commit {git_commit()}; {versions()}",
             f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{os.cpu_count()} cores; medians of {args.rounds} alternating rounds, ms",
             f"{'set':10} {'optimizer':9} {'bytes':>6} {'collective':>10} {'in step':>8} "
             f"{'local':>8} {'sharded':>8} {'overhead':>8} {'one process':>11}"]
    for set_name in args.sets.split(","):
        names = args.optimizers.split(",")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.pt"
            mp.start_processes(_rank, args=(2, str(Path(tmp) / "store"), SETS[set_name],
                                            names, args.rounds, str(out)),
                               nprocs=2, join=True, start_method="spawn")
            rows = torch.load(out)
        for name, r in rows:
            lines.append(f"{set_name:10} {name:9} {r['bytes']:6d} {r['collective']:10.3f} "
                         f"{r['in step']:8.3f} {r['local']:8.2f} {r['sharded']:8.2f} "
                         f"{r['sharded'] / r['local']:7.3f}x {r['one process']:11.2f}")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    dest = Path(args.out) / f"distributed_{args.sets.replace(',', '_')}_cpu.txt"
    dest.write_text(text)
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
