#!/usr/bin/env python
"""Host time of optimizer.step() on the Triton backend: the floor of a step on a GPU.

    python bench/host_time.py                  # 148 and 10,000 tensors of 64 elements
    python bench/host_time.py --tensors 148,1000,10000 --optimizer adamcm,adamam

A GPU step is asynchronous: the Python work of the step (the engine, the plan cache, the
launches) is what the host spends per step, and with small tensors it is the step's
time. This measures wall time of ``step()`` without synchronising. On a CUDA device the
kernels are launched for real; without one, the launches are stubbed out (the kernels
run nowhere) so that only the host's work is timed, the tensors on the CPU under the
Triton interpreter's module setup. Every timed step must be a plan-cache hit: the table
says how many plans were built while timing (0 expected), and how many steps only
rewrote the gradients' rows of their tables (the steps with new gradient tensors).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cm_fused  # noqa: E402
from cm_fused.triton import launch  # noqa: E402

OPTIMIZERS = {"adamcm": cm_fused.AdamCM, "adamcg": cm_fused.AdamCG, "sgdcg": cm_fused.SGDCG,
              "rmspropcg": cm_fused.RMSpropCG, "adamam": cm_fused.AdamAM,
              "sgdam": cm_fused.SGDAM}


def measure(name: str, n: int, device: str, reps: int, eight_bit: bool = False) -> dict:
    params = [torch.nn.Parameter(torch.randn(64, device=device)) for _ in range(n)]
    # Two sets of gradient tensors, alive throughout: handing out the other set before a
    # step gives every gradient a new address, as zero_grad(set_to_none=True) and the
    # next backward do.
    pools = [[torch.randn(64, device=device) for _ in range(n)] for _ in range(2)]

    def give(pool):
        for p, g in zip(params, pool):
            p.grad = g

    give(pools[0])
    kw = {}
    if eight_bit:  # every tensor's moments and slots 8-bit (64 elements: min_8bit_size 0)
        kw = dict(state_dtype=torch.int8, min_8bit_size=0)
        if OPTIMIZERS[name].variant.buffered:
            kw["buffer_dtype"] = torch.int8
    opt = OPTIMIZERS[name](params, backend="triton", **kw)
    for _ in range(3):  # state, tables
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    before = dict(launch.stats)
    same, new = [], []
    for i in range(reps):  # alternating: the same gradients, then new ones
        for times, pool in ((same, None), (new, pools[(i + 1) % 2])):
            if pool is not None:
                give(pool)
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
    if device == "cuda":
        torch.cuda.synchronize()
    row = dict(optimizer=name + (" 8-bit" if eight_bit else ""), tensors=n)
    for label, times in (("same", same), ("new", new)):
        times.sort()
        med = times[len(times) // 2]
        row[f"ms_{label}"] = med * 1e3
        row[f"us_per_tensor_{label}"] = med / n * 1e6
    for k in ("builds", "grad_refreshes"):
        row[k] = launch.stats.get(k, 0) - before.get(k, 0)
    return row


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tensors", default="148,10000")
    ap.add_argument("--optimizer", default="adamcm,adamam")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--eight-bit", action="store_true",
                    help="8-bit moments and int8 slots (state_dtype, buffer_dtype int8)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        launch._launch = lambda *a, **k: None  # host time only: no kernel runs
    torch.set_num_threads(1)
    rows = []
    how = "kernels launched" if device == "cuda" else "launches stubbed (no GPU)"
    print(f"host time of step(), backend='triton', {how}, median of {args.reps}; 'same': "
          f"the gradients of the last step, 'new': new gradient tensors every step")
    print(f"{'optimizer':10} {'tensors':>8} {'ms same':>8} {'us/t same':>10} {'ms new':>8} "
          f"{'us/t new':>9} {'builds':>6} {'grad rows':>9}")
    for name in args.optimizer.split(","):
        for n in (int(x) for x in args.tensors.split(",")):
            r = measure(name, n, device, args.reps if n < 5000 else max(5, args.reps // 2),
                        args.eight_bit)
            rows.append(r)
            print(f"{r['optimizer']:10} {n:>8} {r['ms_same']:>8.2f} {r['us_per_tensor_same']:>10.2f} "
                  f"{r['ms_new']:>8.2f} {r['us_per_tensor_new']:>9.2f} {r['builds']:>6} "
                  f"{r['grad_refreshes']:>9}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
