#!/usr/bin/env python
"""Time optimizer.step() of the package's optimizers and their torch counterparts, side by side.

    python bench/run.py                      # quick: AdamCM vs AdamW, GPT-2 ~11M and ResNet-18
                                             # sets, fp32, topC 5
    python bench/run.py --optimizer adamcg   # AdamCG vs torch.optim.Adam (also sgdcg,
                                             # rmspropcg, adamam, sgdam, a comma list, all)
    python bench/run.py --full               # every set for the device, topC 1/5/20, fp32/bf16,
                                             # buffer_dtype None/bf16/int8
    python bench/run.py --sets gpt2-124m --providers torch_fused,cm_reference --topc 1,20

Every provider steps the same parameter values with the same gradient sets and the same
hyperparameters, in one process. Each row other than the baseline (torch's fused step, or
foreach where torch has no fused one) is timed in alternation with the baseline, and its
ratio to it is the median of the paired per-round ratios, so machine drift cancels. The table goes to stdout, progress to stderr, and one JSON
line per row is appended to bench/runs/results.jsonl (untracked: your runs; the project's
committed runs are in bench/results/, written with --out). Plot with
`python bench/plot.py`. Providers that cannot run here are listed with the reason.
"""
from __future__ import annotations

import argparse
import gc
import math
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import harness as H  # noqa: E402
import param_sets  # noqa: E402

# Untracked (.gitignore): a user's runs never dirty the checkout; the committed runs the
# README quotes are in bench/results/, written there with --out.
DEFAULT_OUT = os.path.join(HERE, "runs", "results.jsonl")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true",
                    help="the full sweep: all sets for the device, --topc 1,5,20, --dtype fp32,bf16, "
                         "--buffer-dtype none,bf16,int8 (explicit flags still win)")
    ap.add_argument("--sets", help=f"comma list of parameter sets: {', '.join(param_sets.SETS)}")
    ap.add_argument("--optimizer", default="adamcm",
                    help=f"comma list of {', '.join(H.OPTIMIZERS)}, or all (default adamcm); "
                         f"each is timed against its torch counterpart")
    ap.add_argument("--providers", help=f"comma list (default: all but the compiled ones and the peer, "
                                        f"torchao_adamw8bit): "
                                        f"{', '.join(H.PROVIDERS)}; the baseline (torch_fused, "
                                        f"or torch_foreach for RMSprop) is always run")
    ap.add_argument("--topc", help="comma list of topC values (default 5)")
    ap.add_argument("--dtype", help="param dtypes, comma list of fp32,bf16,fp16 (default fp32)")
    ap.add_argument("--buffer-dtype", help="slot dtypes, comma list of none,fp32,bf16,fp16,int8 "
                                           "(default none: the param's dtype)")
    ap.add_argument("--state-dtype", default="none",
                    help="the package's optimizers' state_dtype: none (full precision, the "
                         "default) or int8 (8-bit moments: docs/SPEC.md)")
    ap.add_argument("--reps", type=int, help="timed steps per row (default 30 on CPU, 100 on CUDA)")
    ap.add_argument("--warmup", type=int, default=5,
                    help="warm-up steps before timing; at least topC+3 are always done so the "
                         "buffer is full (default 5)")
    ap.add_argument("--grad-sets", type=int, default=3,
                    help="pre-made gradient sets rotated between steps (default 3)")
    ap.add_argument("--compile", action="store_true",
                    help="add the compiled providers: torch.compile(opt.step) of the reference "
                         "(minutes of compilation per row on CPU) and of the C++ step")
    ap.add_argument("--threads", type=int,
                    help="torch.set_num_threads for the CPU (default: torch's choice)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON lines file to append rows to "
                                                       "('' to write none)")
    ap.add_argument("--list", action="store_true", help="list sets and providers and exit")
    return ap.parse_args(argv)


def _csv(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def plan(args, device):
    """The rows to measure: (optimizer, set, dtype, buffer dtype, topC, provider)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    optimizers = list(H.OPTIMIZERS) if args.optimizer == "all" else _csv(args.optimizer)
    for o in optimizers:
        if o not in H.OPTIMIZERS:
            sys.exit(f"unknown optimizer {o!r}; known: {', '.join(H.OPTIMIZERS)}, all")
    sets = _csv(args.sets) if args.sets else (param_sets.FULL[kind] if args.full
                                              else param_sets.QUICK[kind])
    for s in sets:
        if s not in param_sets.SETS:
            sys.exit(f"unknown set {s!r}; known: {', '.join(param_sets.SETS)}")
    if args.providers:
        provs = _csv(args.providers)
        for p in provs:
            if p not in H.PROVIDERS:
                sys.exit(f"unknown provider {p!r}; known: {', '.join(H.PROVIDERS)}")
    else:
        provs = [p for p, v in H.PROVIDERS.items() if not (v.compiled or v.explicit)]
    if args.compile:
        provs += [p for p, v in H.PROVIDERS.items() if v.compiled and p not in provs]
    topcs = [int(c) for c in _csv(args.topc)] if args.topc else ([1, 5, 20] if args.full else [5])
    dt = _csv(args.dtype) if args.dtype else (["fp32", "bf16"] if args.full else ["fp32"])
    bd = _csv(args.buffer_dtype) if args.buffer_dtype else (
        ["none", "bf16", "int8"] if args.full else ["none"])
    for d in dt:
        if d not in H.DTYPES:
            sys.exit(f"unknown dtype {d!r}; use {', '.join(H.DTYPES)}")
    for d in bd:
        if d != "none" and d not in H.SLOT_DTYPES:
            sys.exit(f"unknown buffer dtype {d!r}; use none, {', '.join(H.SLOT_DTYPES)}")
    jobs = []  # torch rows do not depend on C or buffer; the baseline comes first
    for o in optimizers:
        base = H.OPTIMIZERS[o].baseline
        mine = [base] + [p for p in provs if p != base and not (
            H.PROVIDERS[p].option == "fused" and not H.OPTIMIZERS[o].fused)]
        for s in sets:
            for d in dt:
                for p in mine:
                    if H.PROVIDERS[p].kind in ("torch", "peer"):
                        jobs.append((o, s, d, None, None, p))
                if not H.OPTIMIZERS[o].buffered:  # no buffer: no topC, no slot dtype
                    jobs += [(o, s, d, None, None, p) for p in mine
                             if H.PROVIDERS[p].kind == "cm"]
                    continue
                for b in bd:
                    for c in topcs:
                        for p in mine:
                            if H.PROVIDERS[p].kind == "cm":
                                jobs.append((o, s, d, None if b == "none" else b, c, p))
    return jobs


_T0 = time.perf_counter()


def progress(msg):
    print(f"{time.perf_counter() - _T0:6.1f}s {msg}", file=sys.stderr, flush=True)


def short(text, n=110):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def fmt_row(r):
    c = "-" if r["topC"] is None else str(r["topC"])
    b = r["buffer_dtype"] or "-"
    head = (f"{r['optimizer']:<9} {r['param_set']:<11} {r['param_dtype']:<5} {b:<4} {c:>2}  "
            f"{r['provider']:<22}")
    if r["status"] != "ok":
        return (f"{head} {'-':>9} {'-':>17} {'-':>17} {'-':>8} {'-':>6} {'-':>8} {'-':>4}  "
                f"{r['status']}: {short(r['reason'])}")
    q = f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
    if r.get("paired_ratio_p20") is not None:
        ratio += f" ({r['paired_ratio_p20']:.2f}-{r['paired_ratio_p80']:.2f})"
    peak = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.1f}"
    share = "-" if r.get("cpu_share") is None else f"{100 * r['cpu_share']:.0f}"
    return (f"{head} {r['median_ms']:>9.2f} {q:>17} {ratio:>17} "
            f"{r['bytes_per_step'] / 1e6:>8.1f} {r['gbps']:>6.1f} {peak:>8} {share:>4}")


TABLE_HEAD = (f"{'optimizer':<9} {'set':<11} {'dtype':<5} {'buf':<4} {'C':>2}  "
              f"{'provider':<22} {'median ms':>9} {'p20-p80 ms':>17} {'x base (p20-p80)':>17} "
              f"{'MB/step':>8} {'GB/s':>6} {'peak+MiB':>8} {'cpu%':>4}")


def _measure_rows(args, jobs, device, reps, meta) -> list[dict]:
    """Every row of the plan, measured (or skipped, or failed, saying why)."""
    rows, baseline, data, why = [], {}, {}, {}
    for i, (oname, sname, dname, bname, topC, pname) in enumerate(jobs, 1):
        prov, opt = H.PROVIDERS[pname], H.OPTIMIZERS[oname]
        base_prov = H.PROVIDERS[opt.baseline]
        dtype, bdtype = H.DTYPES[dname], (H.SLOT_DTYPES[bname] if bname else None)
        shapes = param_sets.SETS[sname]
        numel = param_sets.numel(sname)
        eight = prov.kind == "cm" and args.state_dtype == "int8"
        nbytes = H.bytes_per_step(prov.kind, numel, dtype, bdtype, optimizer=oname,
                                  single_pass=H.single_pass(prov, oname, dtype) and not eight,
                                  eight_bit=eight, top_c=topC)
        row = dict(meta, timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds"),
                   optimizer=oname, provider=prov.label(opt), baseline=base_prov.label(opt),
                   param_set=sname, param_dtype=dname, buffer_dtype=bname, topC=topC,
                   state_dtype=args.state_dtype if prov.kind == "cm" else None,
                   numel=numel, tensors=len(shapes), status="ok", reason=None, median_ms=None,
                   p20_ms=None, p80_ms=None, min_ms=None, mean_ms=None, ratio=None,
                   bytes_per_step=nbytes, gbps=None, peak_extra_bytes=None,
                   peak_extra_method=H.PEAK_METHOD[device.type], loadavg_1m=H.loadavg(),
                   hyper=dict(opt.hyper, **(opt.cm_hyper if prov.kind == "cm" else {})))
        label = (f"[{i}/{len(jobs)}] {oname} {sname} {dname} buf={bname or '-'} "
                 f"C={topC or '-'} {row['provider']}")
        # The tensors of one (set, dtype) are made once and shared by its rows.
        if (sname, dname) not in data:
            tensors = None  # drop the previous set's tensors before making the next
            data.clear()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            need = numel * dtype.itemsize * (1 + args.grad_sets)
            free = H.free_bytes(device)
            if free is not None and need > 0.8 * free:
                data[(sname, dname)] = f"needs {need / 1e9:.1f} GB for params and " \
                                       f"gradients, {free / 1e9:.1f} GB free"
            else:
                progress(f"making {param_sets.describe(sname)} in {dname} ...")
                data[(sname, dname)] = H.make_tensors(shapes, dtype, device, args.grad_sets)
        tensors = data[(sname, dname)]
        for p in {prov, base_prov}:
            if (oname, p.name, dname) not in why:
                why[(oname, p.name, dname)] = H.why_not(p, device, dtype, oname)
        reason = tensors if isinstance(tensors, str) else why[(oname, pname, dname)]
        paired = pname != opt.baseline and why[(oname, base_prov.name, dname)] is None
        if reason is None:
            need = H.state_bytes(prov.kind, numel, dtype, bdtype, topC, oname) + \
                8 * max(math.prod(s) for s in shapes) * 4
            if paired:
                need += H.state_bytes("torch", numel, dtype, None, None, oname)
            free = H.free_bytes(device)
            if free is not None and need > 0.8 * free:
                reason = f"needs ~{need / 1e9:.1f} GB of state, {free / 1e9:.1f} GB free"
        if reason is not None:
            row.update(status="skipped", reason=reason)
            progress(f"{label}: skipped ({short(reason, 300)})")
        else:
            progress(f"{label} ..." + (f" (in alternation with {row['baseline']})"
                                       if paired else ""))
            try:
                res = H.measure(prov, tensors[0], tensors[1], device, topC=topC,
                                buffer_dtype=bdtype, reps=reps, warmup=args.warmup,
                                optimizer=oname, baseline=base_prov if paired else None,
                                cm_overrides=dict(state_dtype=torch.int8) if eight else None)
            except Exception as e:  # noqa: BLE001 - the row says what broke, nothing is hidden
                msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                row.update(status="error", reason=msg)
                progress(f"{label}: ERROR {msg}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                row.update(res)
                row["gbps"] = nbytes / (res["median_ms"] / 1e3) / 1e9
                if pname == opt.baseline:
                    baseline[(oname, sname, dname)] = res["median_ms"]
                    row["ratio"] = 1.0
                elif paired:
                    row["ratio"] = res["paired_ratio"]
                progress(f"{label}: median {res['median_ms']:.2f} ms "
                         f"(p20 {res['p20_ms']:.2f}, p80 {res['p80_ms']:.2f})"
                         + (f", x{row['ratio']:.2f} paired" if paired else ""))
        rows.append(row)
    data.clear()

    return rows


def _report(meta, rows, device, reps, copy_gbps, elapsed) -> None:
    """The table and its legend, on stdout."""
    print(f"device: {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"commit {meta['commit']} | {meta['threads']} threads | C++ kernels {meta['cpu_kernels']}")
    share = H.COPY_CPU_SHARE[0] if device.type == "cpu" else None
    print(f"copy_ bandwidth (read+write): {copy_gbps:.1f} GB/s"
          f"{'' if share is None else f' (cpu% {100 * share:.0f})'} | {reps} timed steps per row "
          f"after >= topC+3 warm-up steps | load avg at start {rows[0]['loadavg_1m'] if rows else '-'}")
    print("x base = median over timed rounds of (step time / baseline step time), the two "
          "stepped in alternation (ABBA) on the same gradients; p20-p80 of those ratios. The "
          "baseline is torch's fused step (torch_adam*_fused, torch_sgd_fused), or foreach for "
          "RMSprop, on the same set and dtype;")
    print("MB/step = byte model (bench/harness.py:bytes_per_step); GB/s = MB/step / median;")
    print(f"peak+MiB = extra memory of one step ({'CUDA max_memory_allocated' if device.type == 'cuda' else 'torch CPU allocator, via torch.profiler'})"
          + ("; cpu% = CPU time this process got while timing / (wall x torch threads): "
             "under ~90 means other processes took cores and the row is slowed"
             if device.type == "cpu" else ""))
    print()
    print(TABLE_HEAD)
    last = None
    for r in rows:
        grp = (r["optimizer"], r["param_set"], r["param_dtype"])
        if last is not None and grp != last:
            print()
        last = grp
        print(fmt_row(r))
    print(f"\n{len(rows)} rows in {elapsed:.0f} s")
    shares = sorted(r["cpu_share"] for r in rows if r.get("cpu_share") is not None)
    if shares and shares[len(shares) // 2] < 0.8:
        print(f"WARNING: this process got a median {100 * shares[len(shares) // 2]:.0f}% of its "
              f"{meta['threads']} threads' time while timing: other processes were using the "
              f"cores, so these times are inflated and noisy. Re-run on a quiet machine.")



def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for n in param_sets.SETS:
            print(param_sets.describe(n))
        for p in H.PROVIDERS.values():
            print(f"{p.name}: {p.doc}")
        for o in H.OPTIMIZERS.values():
            print(f"{o.name}: cm_fused.{o.cm.__name__} vs torch.optim.{o.torch.__name__}")
        return 0
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (100 if device.type == "cuda" else 30)
    jobs = plan(args, device)

    t_start = time.perf_counter()
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    meta = dict(device=H.device_name(device), device_type=device.type, **H.versions(),
                commit=H.git_commit(), run_id=run_id, threads=torch.get_num_threads(),
                cpu_kernels=H.cpu_kernels())
    progress(f"cm_fused bench: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"{len(jobs)} rows, {reps} timed steps each")
    for name, status in H.cm_fused.backends().items():
        progress(f"backend {name}: {short(status, 300)}")
    progress("measuring copy bandwidth ...")
    copy_gbps = H.copy_bandwidth(device) / 1e9
    meta["device_copy_gbps"] = round(copy_gbps, 2)
    if device.type == "cpu" and H.COPY_CPU_SHARE[0] is not None:
        meta["device_copy_cpu_share"] = round(H.COPY_CPU_SHARE[0], 3)

    rows = _measure_rows(args, jobs, device, reps, meta)
    elapsed = time.perf_counter() - t_start

    _report(meta, rows, device, reps, copy_gbps, elapsed)

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"rows appended to {os.path.relpath(args.out)} (run_id {run_id}); "
              f"plot: python bench/plot.py {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
