#!/usr/bin/env python
"""Issue 26's GPU benchmark rows in one table: the package's optimizers against torch's.

    python bench/gpu_rows.py                        # on a CUDA device, the real sizes
    python bench/gpu_rows.py --budget-s 60          # rows not started within 60 s are
                                                    # recorded as skipped
    python bench/gpu_rows.py --device cpu --tiny    # the same code on CPU at toy sizes
                                                    # (tests/test_gpu_check.py)

The rows, in the order they run (the package's optimizer on ``backend="triton"`` on CUDA;
on CPU the C++ backend, else the reference):

- ``cuda graph``: one whole training iteration of an MLP built here (forward, backward
  and ``opt.step()``) captured in one ``torch.cuda.graph`` by PyTorch's documented recipe
  (warm-up on a side stream, ``zero_grad(set_to_none=True)``, capture), AdamCM with a
  tensor lr and ``capturable=True`` against ``torch.optim.AdamW(fused=True,
  capturable=True)`` captured the same way; replays timed in alternation. Needs CUDA:
  elsewhere the row is skipped saying so. If AdamCM's capture fails, the row is an error
  saying why, with AdamW's replay time alone.
- ``small tensors``: AdamCM against fused AdamW on 10,000 tensors of 256-512 elements,
  where the host's work per step is the step's floor: ``host ms`` is the wall time of
  ``step()`` as the host saw it (no synchronize), beside the device time.
- ``param groups``: AdamCM against fused AdamW on GPT-2-124M-shaped parameters in 48
  param groups, each with its own lr (layer-wise lr decay).
- ``counterpart``: every optimizer of the package against its torch counterpart
  (``harness.OPTIMIZERS``: fused AdamW, Adam, SGD with momentum; RMSprop foreach) on
  GPT-2-124M-shaped parameters, bf16 then fp32 params, slots of the params' dtype and
  8-bit slots (``buffer_dtype=torch.int8``). bf16 first, as bench/run.py's quick set
  (gpu_check.py's benchmark part) already times the fp32 ones.

All but the graph row go through ``harness.measure``: both optimizers step their own copy
of the same parameters on the same gradients in alternation, and ``x base`` is the
median of the paired per-step ratios (bench/README.md, "How it measures"). Each row is
appended to ``<out-dir>/gpu_rows.jsonl`` as soon as it is done (with device, versions
and commit) and the table ``<out-dir>/gpu_rows_<stamp>.txt`` is rewritten, so a run cut
short keeps what it measured. A row that raises is recorded as an error and the next
row runs. Exit status 1 if a row failed or was cut by the budget.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import harness as H  # noqa: E402
import param_sets  # noqa: E402

_T0 = time.perf_counter()
TOPC = 5  # bench/run.py's quick default
OUT_OF_TIME = "not started: the time budget (--budget-s) was spent"


@dataclass(frozen=True)
class Sizes:
    model: str            # name of the GPT-2-shaped parameter list
    shapes: list          # its shapes
    small: list           # the many small tensors' shapes
    groups: int           # param groups the model's tensors are split into
    mlp: tuple            # the captured model: width, depth (linear layers), batch
    reps: int             # timed rounds per row (one step of each optimizer per round)
    warmup: int


FULL = Sizes("gpt2-124m", param_sets.SETS["gpt2-124m"],
             small=[(256 + 64 * (i % 5),) for i in range(10_000)], groups=48,
             mlp=(1024, 8, 256), reps=50, warmup=5)
# Toy sizes for the CPU test: the same code, seconds in all.
TINY = Sizes("gpt2-d16", param_sets.gpt2(d=16, layers=1, vocab=64, ctx=16),
             small=[(8 + 4 * (i % 3),) for i in range(60)], groups=6,
             mlp=(32, 2, 8), reps=3, warmup=1)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    provider: str         # the package's provider: cm_triton, cm_cpu or cm_reference
    _tensors: tuple = (None, None)

    def tensors(self, name: str, shapes, dtype_name: str):
        """Parameters and three gradient sets, made once for consecutive rows that share them
        (the previous ones dropped first: GPT-2-124M's take 2 GB in fp32)."""
        key = (name, dtype_name)
        if self._tensors[0] != key:
            self._tensors = (None, None)
            self._tensors = (key, H.make_tensors(shapes, H.DTYPES[dtype_name], self.device, 3))
        return self._tensors[1]


@dataclass(frozen=True)
class Spec:
    """One row to measure: what it is, and the call that measures it (returns the row's
    result fields; raises, or returns status "skipped" or "error" with a reason)."""
    row: str
    optimizer: str
    what: str
    fields: dict
    run: Callable[[], dict]

    @property
    def label(self) -> str:
        return f"{self.row}: {self.optimizer}, {self.what}"


# ------------------------------------------------------------------------ rows

def cm_provider(device: torch.device) -> str:
    """The package's fast backend for the device: triton on CUDA; on CPU the C++ one if
    built, else the reference. On CUDA without Triton the rows say why (skipped)."""
    names = ("cm_triton",) if device.type == "cuda" else ("cm_cpu", "cm_reference")
    for name in names:
        if H.why_not(H.PROVIDERS[name], device, torch.float32) is None:
            return name
    return names[-1]


def layer_lr_groups(n: int, lr: float, decay: float = 0.9) -> Callable[[list], list]:
    """Split a parameter list into ``n`` consecutive groups, the last with ``lr`` and each
    earlier one ``decay`` times the next (layer-wise lr decay, as fine-tuning recipes do)."""
    def split(params):
        if len(params) < n:
            raise ValueError(f"{len(params)} tensors cannot make {n} non-empty groups")
        cut = [round(i * len(params) / n) for i in range(n + 1)]
        return [dict(params=params[a:b], lr=lr * decay ** (n - 1 - i))
                for i, (a, b) in enumerate(zip(cut, cut[1:]))]
    return split


def paired_row(ctx: Context, optimizer: str, name: str, shapes, dtype_name: str,
               buffer: str | None = None, groups=None) -> dict:
    """The package's optimizer and its torch baseline, stepped in alternation (harness.measure)."""
    opt = H.OPTIMIZERS[optimizer]
    prov, base = H.PROVIDERS[ctx.provider], H.PROVIDERS[opt.baseline]
    labels = dict(provider=prov.label(opt), baseline=base.label(opt))
    for p in (prov, base):
        why = H.why_not(p, ctx.device, H.DTYPES[dtype_name], optimizer)
        if why is not None:
            return dict(labels, status="skipped", reason=f"{p.label(opt)}: {why}")
    params, grads = ctx.tensors(name, shapes, dtype_name)
    res = H.measure(prov, params, grads, ctx.device, topC=TOPC if opt.buffered else None,
                    buffer_dtype=H.SLOT_DTYPES[buffer] if buffer else None,
                    reps=ctx.sizes.reps, warmup=ctx.sizes.warmup, optimizer=optimizer,
                    baseline=base, groups=groups)
    return dict(labels, median_ms=res["median_ms"], p20_ms=res["p20_ms"], p80_ms=res["p80_ms"],
                host_ms=res["host_median_ms"], baseline_ms=res["paired_baseline_ms"],
                baseline_host_ms=res["paired_baseline_host_ms"], ratio=res["paired_ratio"],
                ratio_p20=res["paired_ratio_p20"], ratio_p80=res["paired_ratio_p80"],
                peak_extra_bytes=res["peak_extra_bytes"], reps=res["reps"])


def _mlp(width: int, depth: int, device: torch.device) -> torch.nn.Module:
    """``depth`` Linear layers with GELU between, seeded: both optimizers start alike."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layers = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
        return torch.nn.Sequential(*layers[:-1]).to(device)


def captured_iteration(prov: H.Provider, sizes: Sizes, device: torch.device):
    """forward + backward + opt.step() in one CUDA graph, by PyTorch's recipe (CUDA
    semantics notes, "Whole-network capture"): the gradients the graph uses are allocated
    inside the capture, as a user's would be."""
    width, depth, batch = sizes.mlp
    model = _mlp(width, depth, device)
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, width, generator=gen, device=device)
    y = torch.randn(batch, width, generator=gen, device=device)
    lr = torch.tensor(H.OPTIMIZERS["adamcm"].hyper["lr"], device=device)
    opt = H.make_optimizer(prov, list(model.parameters()), TOPC, None, "adamcm", lr=lr,
                           capturable=True)
    loss_fn = torch.nn.functional.mse_loss
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up: state, autograd's and the optimizer's caches
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return SimpleNamespace(graph=graph, loss=loss, model=model, opt=opt)


def alternate(calls: list[Callable[[], object]], reps: int, warmup: int) -> list[list[float]]:
    """ms of each call per round, the calls in ABBA order, CUDA events around each. No
    cache flush between: consecutive training iterations find the same warm cache."""
    for _ in range(warmup):
        for c in calls:
            c()
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(reps)] for _ in calls]
    for i in range(reps):
        for k in (range(len(calls)) if i % 2 == 0 else reversed(range(len(calls)))):
            e0, e1 = events[k][i]
            e0.record()
            calls[k]()
            e1.record()
    torch.cuda.synchronize()
    return [[e0.elapsed_time(e1) for e0, e1 in ev] for ev in events]


def _check_trained(it, before: list[torch.Tensor]) -> None:
    """The replays stepped the model, to finite values (a benchmark of garbage is none)."""
    params = list(it.model.parameters())
    if not all(torch.isfinite(p).all() for p in params) or not torch.isfinite(it.loss):
        raise FloatingPointError("non-finite parameter or loss after the replays")
    if all(torch.equal(p, b) for p, b in zip(params, before)):
        raise AssertionError("the replays left every parameter unchanged")


def graph_row(ctx: Context) -> dict:
    """AdamCM's captured iteration against fused AdamW's, replays in alternation."""
    opt = H.OPTIMIZERS["adamcm"]
    prov, base = H.PROVIDERS[ctx.provider], H.PROVIDERS["torch_fused"]
    labels = dict(provider=prov.label(opt) + " (tensor lr, capturable)",
                  baseline=base.label(opt) + " (capturable)")
    if ctx.device.type != "cuda":
        return dict(labels, status="skipped", reason="needs CUDA (torch.cuda.graph)")
    why = H.why_not(prov, ctx.device, torch.float32, "adamcm")
    if why is not None:
        return dict(labels, status="skipped", reason=f"{prov.name}: {why}")
    try:
        return dict(labels, **_replay_times(ctx, prov, base))
    finally:  # the graphs are gone by now: let the plans they held go, as the docs ask
        if prov.option == "triton":
            from cm_fused.triton import launch
            launch.release_captured_plans()


def _replay_times(ctx: Context, prov: H.Provider, base: H.Provider) -> dict:
    n_warm = max(ctx.sizes.warmup, TOPC + 3)  # the buffer full before timing
    theirs = captured_iteration(base, ctx.sizes, ctx.device)
    try:
        ours = captured_iteration(prov, ctx.sizes, ctx.device)
    except Exception as e:  # noqa: BLE001 - the row's outcome, with AdamW's time alone
        torch.cuda.synchronize()
        (alone,) = alternate([theirs.graph.replay], ctx.sizes.reps, n_warm)
        return dict(status="error", reason=f"capturing {prov.name}: {describe(e)}",
                    baseline_ms=H.quantiles(alone)["median_ms"])
    before = [[p.detach().clone() for p in it.model.parameters()] for it in (ours, theirs)]
    times = alternate([ours.graph.replay, theirs.graph.replay], ctx.sizes.reps, n_warm)
    for it, b in zip((ours, theirs), before):
        _check_trained(it, b)
    q, ratios = H.quantiles(times[0]), H.quantiles([a / b for a, b in zip(*times)])
    return dict(median_ms=q["median_ms"], p20_ms=q["p20_ms"], p80_ms=q["p80_ms"],
                baseline_ms=H.quantiles(times[1])["median_ms"], ratio=ratios["median_ms"],
                ratio_p20=ratios["p20_ms"], ratio_p80=ratios["p80_ms"], reps=ctx.sizes.reps)


def plan(ctx: Context) -> list[Spec]:
    s = ctx.sizes
    width, depth, batch = s.mlp
    mlp_params = depth * (width * width + width)
    lo, hi = min(x[0] for x in s.small), max(x[0] for x in s.small)
    specs = [
        Spec("cuda graph", "adamcm",
             f"MLP {depth}x{width} (batch {batch}), forward+backward+step",
             dict(param_set=f"mlp-{depth}x{width}", param_dtype="fp32", buffer_dtype=None,
                  tensors=2 * depth, numel=mlp_params), lambda: graph_row(ctx)),
        Spec("small tensors", "adamcm", f"{len(s.small)} tensors of {lo}-{hi}, fp32",
             dict(param_set=f"small-{len(s.small)}", param_dtype="fp32", buffer_dtype=None,
                  tensors=len(s.small), numel=sum(x[0] for x in s.small)),
             lambda: paired_row(ctx, "adamcm", "small", s.small, "fp32")),
        Spec("param groups", "adamcm", f"{s.model} in {s.groups} groups (lr per group), fp32",
             dict(param_set=s.model, param_dtype="fp32", buffer_dtype=None,
                  tensors=len(s.shapes), groups=s.groups, numel=_numel(s.shapes)),
             lambda: paired_row(ctx, "adamcm", s.model, s.shapes, "fp32",
                                groups=layer_lr_groups(s.groups, H.OPTIMIZERS["adamcm"]
                                                       .hyper["lr"]))),
    ]
    for dtype in ("bf16", "fp32"):
        for name, opt in H.OPTIMIZERS.items():
            for buf in ((None, "int8") if opt.buffered else (None,)):
                specs.append(Spec(
                    "counterpart", name, f"{s.model} {dtype}, slots {buf or 'as params'}",
                    dict(param_set=s.model, param_dtype=dtype, buffer_dtype=buf,
                         tensors=len(s.shapes), numel=_numel(s.shapes)),
                    # default arguments bind this iteration's values
                    lambda name=name, dtype=dtype, buf=buf: paired_row(
                        ctx, name, s.model, s.shapes, dtype, buf)))
    return specs


def _numel(shapes) -> int:
    return sum(math.prod(x) for x in shapes)


# ------------------------------------------------------------------------ running

def describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def progress(msg: str) -> None:
    print(f"{time.perf_counter() - _T0:6.1f}s {msg}", file=sys.stderr, flush=True)


def run_specs(specs: list[Spec], meta: dict, device: torch.device, deadline: float,
              on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Measure every spec in order; never raises. A spec that raises becomes an error row,
    one not started before ``deadline`` (time.perf_counter()) a skipped row."""
    rows = []
    for i, spec in enumerate(specs, 1):
        row = dict(meta, row=spec.row, label=spec.label, optimizer=spec.optimizer,
                   **spec.fields, timestamp=datetime.datetime.now(
                       datetime.timezone.utc).isoformat(timespec="seconds"),
                   status="ok", reason=None)
        if time.perf_counter() > deadline:
            row.update(status="skipped", reason=OUT_OF_TIME)
        else:
            progress(f"[{i}/{len(specs)}] {spec.label} ...")
            try:
                row.update(spec.run())
            except Exception as e:  # noqa: BLE001 - the row says what broke; the next runs
                row.update(status="error", reason=describe(e))
                _settle(device)
        progress(f"[{i}/{len(specs)}] {spec.label}: " + (
            f"{row['median_ms']:.3f} ms, x{row['ratio']:.2f}" if row["status"] == "ok"
            else f"{row['status']}: {row['reason']}"))
        rows.append(row)
        on_row(row)
    return rows


def _settle(device: torch.device) -> None:
    """After a failed row: let queued work finish and free its memory for the next row."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001 - the next rows will show it too
        progress(f"after the error, CUDA says: {describe(e)}")


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def fmt_row(r: dict) -> str:
    head = f"{r['label']:<58} {r.get('provider') or '-':<36}"
    if r["status"] != "ok":
        base = f"  (baseline alone {_ms(r['baseline_ms'])} ms)" if r.get("baseline_ms") else ""
        return f"{head} {r['status']}: {r['reason']}{base}"
    ratio = f"{r['ratio']:.2f} ({r['ratio_p20']:.2f}-{r['ratio_p80']:.2f})"
    return (f"{head} {_ms(r['median_ms']):>9} {_ms(r.get('host_ms')):>8} "
            f"{_ms(r['baseline_ms']):>9} {_ms(r.get('baseline_host_ms')):>9} {ratio:>17}  "
            f"{r['baseline']}")


TABLE_HEAD = (f"{'row':<58} {'provider':<36} {'median ms':>9} {'host ms':>8} {'base ms':>9} "
              f"{'base host':>9} {'x base (p20-p80)':>17}  baseline")


def table(meta: dict, rows: list[dict], total: int) -> str:
    return "\n".join([
        f"gpu_rows {meta['run_id']} | device: {meta['device']} | torch {meta['torch']} | "
        f"triton {meta['triton']} | cm_fused {meta['cm_fused']} | commit {meta['commit']}",
        "x base: median over rounds of (row's time / baseline's time), the two stepped in "
        "alternation on the same gradients (graph row: replays); host ms: wall time of "
        "step() on the host, no synchronize (CUDA); '-' where not measured.",
        "", TABLE_HEAD, *(fmt_row(r) for r in rows), "",
        f"{len(rows)} of {total} rows done, "
        f"{sum(r['status'] == 'ok' for r in rows)} measured"])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the CPU test)")
    ap.add_argument("--budget-s", type=float, default=math.inf,
                    help="rows not started this many seconds after start are skipped")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "runs"),
                    help="where gpu_rows.jsonl and the table go (default bench/runs/, "
                         "untracked; gpu_check.py writes to bench/results/)")
    ap.add_argument("--stamp", help="the run's id in file names (default: UTC time now)")
    ap.add_argument("--threads", type=int,
                    help="torch.set_num_threads first (default: torch's choice; on a busy "
                         "small CPU one thread keeps torch's fused CPU steps from waiting on "
                         "a taken core)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stamp = args.stamp or datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%SZ")
    ctx = Context(device, TINY if args.tiny else FULL, cm_provider(device))
    meta = dict(device=H.device_name(device), device_type=device.type, **H.versions(),
                commit=H.git_commit(), run_id=stamp, threads=torch.get_num_threads(),
                sizes="tiny" if args.tiny else "full")
    os.makedirs(args.out_dir, exist_ok=True)
    jsonl = os.path.join(args.out_dir, "gpu_rows.jsonl")
    table_path = os.path.join(args.out_dir, f"gpu_rows_{stamp}.txt")
    specs = plan(ctx)
    done: list[dict] = []

    def keep(row):  # every row on disk as soon as it is measured
        done.append(row)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(table_path, "w") as f:
            f.write(table(meta, done, len(specs)) + "\n")

    progress(f"gpu_rows: {meta['device']}, {ctx.provider}, {len(specs)} rows, "
             f"{ctx.sizes.reps} timed rounds each")
    rows = run_specs(specs, meta, device, _T0 + args.budget_s, keep)
    print(table(meta, rows, len(specs)))
    print(f"rows appended to {os.path.relpath(jsonl)}; table in {os.path.relpath(table_path)}")
    failed = [r for r in rows if r["status"] == "error" or r["reason"] == OUT_OF_TIME]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
