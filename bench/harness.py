"""The pieces of the benchmark: providers, the byte model, timing, memory, machine info.

run.py is the command line around these; test_micro_bench.py reuses them. Nothing here
prints to stdout.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

import cm_fused
from cm_fused import registry
from cm_fused.contract import sum_dtype
from cm_fused.quantize import QBLOCK

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# buffer_dtype also takes int8 (8-bit slots, blockwise quantized: cm_fused/quantize.py)
SLOT_DTYPES = {**DTYPES, "int8": torch.int8}
DTYPE_NAMES = {v: k for k, v in SLOT_DTYPES.items()}


def slot_bytes(slot_dtype: torch.dtype) -> float:
    """Bytes per element of a slot: its itemsize, plus an fp32 scale per QBLOCK elements
    for int8 slots."""
    return slot_dtype.itemsize + (4 / QBLOCK if slot_dtype == torch.int8 else 0)

GRAD_STD = 1e-2


@dataclass(frozen=True)
class Optimizer:
    """One optimizer of the package and its torch counterpart, as the benchmark runs them.

    ``hyper``: the shared hyperparameters (torch's names; weight_decay non-zero so that it
    is part of every step); ``cm_hyper``: the buffer's (kappa 1: on). ``accesses``: the
    per-element reads + writes of torch's step with these hyperparameters (the byte
    model's base); ``moments``: its per-element state tensors; ``fused``: torch has a
    fused kernel (the baseline), else foreach is the baseline. Adaptive memory (no
    buffer): ``torch_hyper`` is the counterpart's own (SGD's momentum), and
    ``reduce_reads`` the per-element reads of the pass that forms the inner products.
    """
    name: str
    cm: type
    torch: type
    hyper: dict
    cm_hyper: dict
    accesses: int
    moments: int
    fused: bool = True
    torch_hyper: dict = None
    reduce_reads: int = 0

    @property
    def baseline(self) -> str:
        return "torch_fused" if self.fused else "torch_foreach"

    @property
    def buffered(self) -> bool:
        return self.cm.variant.buffered


_CM = dict(decay=0.7, kappa=1.0, synced=True)
_ADAM = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
OPTIMIZERS = {o.name: o for o in [
    # Adam: read p, g, m, v; write p, m, v. SGD with momentum, RMSprop: read p, g, and one
    # state tensor; write p and it.
    Optimizer("adamcm", cm_fused.AdamCM, torch.optim.AdamW, _ADAM,
              dict(_CM, critical_test=0.0), 7, 2),
    Optimizer("adamcg", cm_fused.AdamCG, torch.optim.Adam, _ADAM,
              dict(_CM, critical_test=0.0), 7, 2),
    Optimizer("sgdcg", cm_fused.SGDCG, torch.optim.SGD,
              dict(lr=1e-3, momentum=0.9, weight_decay=0.01), dict(_CM, critical_test=0.0), 5, 1),
    Optimizer("rmspropcg", cm_fused.RMSpropCG, torch.optim.RMSprop,
              dict(lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=0.01), _CM, 5, 1, fused=False),
    # Adaptive memory: the reduce pass reads g, d, v, p (AdamAM); g, d and p with weight
    # decay (SGDAM); the update is the counterpart's accesses.
    Optimizer("adamam", cm_fused.AdamAM, torch.optim.AdamW, _ADAM, dict(lam=0.1), 7, 2,
              reduce_reads=4),
    Optimizer("sgdam", cm_fused.SGDAM, torch.optim.SGD, dict(lr=1e-3, weight_decay=0.01),
              dict(lam=0.1, beta_max=0.9), 5, 1, torch_hyper=dict(momentum=0.9),
              reduce_reads=3),
]}


# ------------------------------------------------------------------------ byte model

def bytes_per_step(kind: str, numel: int, param_dtype: torch.dtype,
                   buffer_dtype: torch.dtype | None = None, replaced: bool = True,
                   optimizer: str = "adamcm", single_pass: bool = False,
                   eight_bit: bool = False, top_c: int | None = None) -> int:
    """Fewest bytes one optimizer step must move through memory (each read once, each write once).

    kind "torch" (the torch counterpart, any implementation): its ``accesses`` per element
    (OPTIMIZERS), each of the parameter's dtype (torch keeps the state so). AdamW: read p,
    g, m, v and write p, m, v: 7 x itemsize, 28 B fp32, 14 B bf16. SGD with momentum and
    RMSprop: 5 x itemsize, 20 B fp32.

    kind "cm" (the package's straightforward fused step): the counterpart's accesses, plus
    a second read of g for the norm (the key must be known before any slot is chosen), a
    read of S (the sum of the filled slots), and, when a slot is replaced, a read of the old
    B[j] and writes of B[j] and S:
        A*P + P + 2*Ssz + 2*Bsz        (P = param itemsize, B = slot, S = sum itemsize)
    AdamCM/AdamCG fp32 everything: 28 + 4 + 8 + 8 = 48 B/elem (SGDCG, RMSpropCG: 40 B).
    bf16 params (bf16 slots, fp32 S): 14 + 2 + 8 + 4 = 28 B. fp32 params, bf16 slots:
    28 + 4 + 8 + 4 = 44 B; int8 slots: 28 + 4 + 8 + 2 + 2·4/256 ≈ 42.03 B (the scales of
    the slot's blocks read and written). topC does not enter: a step touches one slot whatever C is. With
    replaced=False (the new key lost) the slot read/write and the S write drop out:
    A*P + P + Ssz. The harness's gradients keep their norm nearly constant, so with decay
    0.7 a slot is replaced on every step and the rows use replaced=True. Per-tensor keys,
    counts and step counters (a few bytes per tensor) are left out.

    single_pass (see :func:`single_pass`): the norm is summed in the update pass (each
    insert written at the start of the next step's pass), so g is read once: 4 B less in
    fp32, 44 B for AdamCM.

    eight_bit (state_dtype=torch.int8): each moment read and written as one byte plus
    its block's scale (4/256 B); with int8 slots and topC <= 8 no S is kept: the C slots
    are read instead of S, and S is not written. AdamCM fp32 params, topC 5, int8 slots:
    28 + 4 - 4·(4 - 1 - 4/256) (moments) + 5·(1 + 4/256) (slots read) + 2·(1 + 4/256)
    (the new slot written, the old one's scale) ≈ 27.2 B (fp32 AdamW: 28 B).
    """
    p = param_dtype.itemsize
    opt = OPTIMIZERS[optimizer]
    accesses = opt.accesses
    if kind == "torch":
        return numel * accesses * p
    if kind == "peer":  # torchao's AdamW8bit: p, g as torch's; m, v 1 B each + a scale per 256
        return numel * (3 * p + 4 * (1 + 4 / 256))
    if kind != "cm":
        raise ValueError(f"unknown kind {kind!r}")
    if not opt.buffered:  # adaptive memory: the reduce pass's reads, then the update
        return numel * (accesses + opt.reduce_reads) * p
    slot_dtype = buffer_dtype or param_dtype
    slot, s = slot_bytes(slot_dtype), sum_dtype(slot_dtype).itemsize
    per = (accesses + (0 if single_pass else 1)) * p + s + ((s + 2 * slot) if replaced else 0)
    if eight_bit:
        per -= 2 * opt.moments * (p - 1 - 4 / 256)
        if slot_dtype == torch.int8 and top_c is not None and top_c <= 8:
            per += top_c * slot - 2 * s  # the slots summed instead of S read and written
    return round(numel * per)


def single_pass(prov: "Provider", optimizer: str, param_dtype: torch.dtype) -> bool:
    """Whether a provider's step makes one pass over memory: AdamCM with fp32 params on
    the C++ backend, eager or compiled (cm_fused/pending.py: PendingInserts.defers)."""
    return (prov.kind == "cm" and prov.option == "cpu"
            and optimizer == "adamcm" and param_dtype == torch.float32)


# ------------------------------------------------------------------------ providers

@dataclass(frozen=True)
class Provider:
    name: str
    kind: str            # "torch", "cm", or "peer" (another library's 8-bit AdamW)
    option: str          # torch: forloop/foreach/fused; cm: backend name; peer: library
    compiled: bool = False
    doc: str = ""
    explicit: bool = False  # run only when named in --providers (slow, or a side install)

    def label(self, opt: Optimizer) -> str:
        """The row's name: torch_<class>_<option> (torch_adamw_fused, ...) or cm_<backend>."""
        if self.kind == "torch":
            return f"torch_{opt.torch.__name__.lower()}_{self.option}"
        return self.name


PROVIDERS = {p.name: p for p in [
    Provider("torch_forloop", "torch", "forloop", doc="the torch counterpart, foreach=False"),
    Provider("torch_foreach", "torch", "foreach", doc="the torch counterpart, foreach=True"),
    Provider("torch_fused", "torch", "fused",
             doc="the torch counterpart, fused=True: the baseline where torch has it"),
    Provider("cm_reference", "cm", "reference", doc='the cm_fused class, backend="reference"'),
    Provider("cm_cpu", "cm", "cpu", doc='the cm_fused class, backend="cpu" (C++)'),
    Provider("cm_triton", "cm", "triton", doc='the cm_fused class, backend="triton"'),
    Provider("cm_reference_compiled", "cm", "reference", compiled=True,
             doc='torch.compile(<class>(backend="reference").step), only with --compile'),
    Provider("cm_cpu_compiled", "cm", "cpu", compiled=True,
             doc='torch.compile(<class>(backend="cpu").step): the C++ step as one '
                 'torch.library op in the graph, only with --compile'),
    Provider("torchao_adamw8bit", "peer", "torchao", explicit=True,
             doc="torchao.optim.AdamW8bit (block 256, 8-bit m and v; its step torch.compile'd "
                 "by torchao), beside the 8-bit rows: AdamW-based optimizers only, where "
                 "torchao imports, only when named"),
]}


def make_optimizer(prov: Provider, params, topC: int | None, buffer_dtype,
                   optimizer: str = "adamcm", **overrides):
    """The provider's optimizer with the benchmark's hyperparameters; ``overrides`` replace
    or add keywords (a tensor lr, capturable=True for a CUDA graph)."""
    opt = OPTIMIZERS[optimizer]
    if prov.kind == "peer":
        from torchao.optim import AdamW8bit
        return AdamW8bit(params, **{**opt.hyper, **overrides})
    if prov.kind == "torch":
        flags = {"forloop": dict(foreach=False), "foreach": dict(foreach=True),
                 "fused": dict(fused=True)}[prov.option]
        return opt.torch(params, **{**opt.hyper, **(opt.torch_hyper or {}), **flags,
                                    **overrides})
    buffer = dict(topC=topC, buffer_dtype=buffer_dtype) if opt.buffered else {}
    return opt.cm(params, **{**opt.hyper, **opt.cm_hyper, **buffer, **overrides},
                  backend=prov.option)


def why_not(prov: Provider, device: torch.device, dtype: torch.dtype,
            optimizer: str = "adamcm") -> str | None:
    """Why this provider cannot step tensors of this dtype on this device, or None."""
    if prov.kind == "cm":
        reason = registry.why_not(prov.option, device, {dtype})
        if reason is None and prov.option == "triton" and device.type != "cuda":
            # The backend may run under TRITON_INTERPRET=1, but that is a test mode.
            reason = "Triton needs a CUDA device (TRITON_INTERPRET runs are not benchmarks)"
        if reason is None and prov.compiled and device.type == "cpu" and not _have_cxx():
            reason = "torch.compile on CPU needs a C++ compiler"
        return reason
    if prov.kind == "peer":
        if OPTIMIZERS[optimizer].torch is not torch.optim.AdamW:
            return "torchao's AdamW8bit stands beside the AdamW-based optimizers only"
        try:
            import torchao.optim  # noqa: F401
        except Exception as e:  # noqa: BLE001 - shown in the table as the reason
            return f"torchao does not import: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    # torch's own (or the peer's): try one tiny step, and report its words if it refuses.
    try:
        p = torch.nn.Parameter(torch.ones(4, device=device, dtype=dtype))
        p.grad = torch.ones_like(p)
        make_optimizer(prov, [p], None, None, optimizer).step()
    except Exception as e:  # noqa: BLE001 - shown in the table as the reason
        who = "torchao" if prov.kind == "peer" else "torch"
        return f"{who} refuses: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


def _have_cxx() -> bool:
    import shutil
    return any(shutil.which(c) for c in ("c++", "g++", "clang++", os.environ.get("CXX", "")) if c)


# ------------------------------------------------------------------------ tensors

def make_tensors(shapes, dtype: torch.dtype, device: torch.device, grad_sets: int, seed: int = 0):
    """Initial parameter values and `grad_sets` sets of fresh non-zero gradients.

    Gradients are N(0, GRAD_STD^2), so every set has nearly the same norm: with decay 0.7
    the new key beats the oldest, and a slot is replaced on every step, as in steady state.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in shapes]
    grads = [[(torch.randn(s, generator=gen, device=device, dtype=dtype) * GRAD_STD)
              for s in shapes] for _ in range(grad_sets)]
    return params, grads


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g


# ------------------------------------------------------------------------ timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(times_ms: list[float]) -> dict:
    xs = sorted(times_ms)

    def q(f):  # linear interpolation, as torch.quantile / numpy's default
        pos = f * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return dict(median_ms=statistics.median(xs), p20_ms=q(0.2), p80_ms=q(0.8),
                min_ms=xs[0], mean_ms=statistics.fmean(xs))


def time_steps(step: Callable[[], object], params, grads, device: torch.device,
               reps: int, start: int = 0, host_ms: list[float] | None = None) -> list[float]:
    """Time `reps` steps; gradients rotate among the pre-made sets outside the timed region.

    CUDA: a pair of CUDA events around each step, L2 flushed (a 256 MiB write) before each,
    one synchronize at the end (triton.testing.do_bench's method, per step). CPU: the steps
    are synchronous, so time.perf_counter() around each one. ``host_ms`` (if given) gets
    each step's wall time as the host saw it: on CUDA the return of step() without a
    synchronize (the launches' Python work, a step's floor with many small tensors); on
    CPU the step time itself.
    """
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for i, (e0, e1) in enumerate(events):
            set_grads(params, grads[(start + i) % len(grads)])
            flush.zero_()
            e0.record()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            e1.record()
            if host_ms is not None:
                host_ms.append((t1 - t0) * 1e3)
        torch.cuda.synchronize(device)
        return [e0.elapsed_time(e1) for e0, e1 in events]
    for i in range(reps):
        set_grads(params, grads[(start + i) % len(grads)])
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    if host_ms is not None:
        host_ms.extend(times)
    return times


# ------------------------------------------------------------------------ memory

PEAK_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during one step minus memory_allocated() before it",
    "cpu": ("highest 'Total Allocated' of torch's CPU allocator during one step, from "
            "torch.profiler(profile_memory=True): every tensor the step allocates and has not "
            "freed yet; memory a C++ kernel mallocs outside torch's allocator is not seen"),
}


@contextlib.contextmanager
def _quiet_fd2():
    """Silence the profiler's C++ log lines on stderr (fd 2) for a moment."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(step: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory one step allocates beyond what was allocated before it (see PEAK_METHOD)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with tempfile.TemporaryDirectory() as tmp, _quiet_fd2():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    peak = 0
    for e in events:
        args = e.get("args", {})
        if e.get("name") == "[memory]" and args.get("Device Type", 0) == 0:
            peak = max(peak, int(args.get("Total Allocated", 0)))
    return peak


def free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def state_bytes(kind: str, numel: int, dtype: torch.dtype, buffer_dtype, topC: int | None,
                optimizer: str = "adamcm") -> int:
    """Bytes a provider allocates for its own copy of the params and its optimizer state."""
    p = dtype.itemsize
    if kind == "peer":
        return round(numel * (p + 2 * (1 + 4 / 256)))
    base = numel * (1 + OPTIMIZERS[optimizer].moments) * p
    if kind == "torch" or not OPTIMIZERS[optimizer].buffered:
        return base
    slot_dtype = buffer_dtype or dtype
    return base + round(numel * (sum_dtype(slot_dtype).itemsize + topC * slot_bytes(slot_dtype)))


def copy_bandwidth(device: torch.device, reps: int = 20) -> float:
    """Measured bytes/s of a large tensor copy_ (bytes read + bytes written)."""
    n = (1 << 30 if device.type == "cuda" else 256 << 20) // 4
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    if device.type == "cuda":
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(reps)]
        for e0, e1 in evs:
            e0.record()
            b.copy_(a)
            e1.record()
        torch.cuda.synchronize(device)
        ms = [e0.elapsed_time(e1) for e0, e1 in evs]
    else:
        ms = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(reps):
            t0 = time.perf_counter()
            b.copy_(a)
            ms.append((time.perf_counter() - t0) * 1e3)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        COPY_CPU_SHARE[0] = (cpu1 - cpu0) / max(1e-9, (wall1 - wall0) * torch.get_num_threads())
    med = statistics.median(ms)
    del a, b
    return 2 * n * 4 / (med / 1e3)


COPY_CPU_SHARE = [None]  # cpu share of the last CPU copy_bandwidth measurement


# ------------------------------------------------------------------------ one measurement

def measure(prov: Provider, shapes_params, grads, device: torch.device, *, topC, buffer_dtype,
            reps: int, warmup: int, optimizer: str = "adamcm",
            baseline: Provider | None = None,
            groups: Callable[[list], list] | None = None,
            cm_overrides: dict | None = None) -> dict:
    """Warm up, time `reps` steps, then measure one step's peak extra memory.

    With a ``baseline`` provider, both step their own copy of the parameters in
    alternation (ABBA: provider, baseline, baseline, provider, ...), one step each per
    round on the same gradients, and the ratio comes from the paired samples (median and
    20/80 quantiles of provider/baseline per round), so that drift of the machine over
    the run cancels out of it. ``groups`` turns the parameter list into param groups
    (e.g. a learning rate per layer); without it the optimizer gets one group.
    ``host_median_ms``: the median host time of a step (see :func:`time_steps`).
    ``cm_overrides``: keywords for the package's optimizer only (state_dtype=torch.int8).
    """
    runs = [(prov, topC, buffer_dtype)] + ([(baseline, None, None)] if baseline else [])
    made = []
    try:
        for p_, c_, b_ in runs:
            params = [torch.nn.Parameter(t.clone()) for t in shapes_params]
            extra = (cm_overrides or {}) if p_.kind == "cm" else {}
            opt = make_optimizer(p_, groups(params) if groups else params, c_, b_, optimizer,
                                 **extra)
            step = opt.step
            if p_.compiled:
                torch._dynamo.reset()  # each compiled provider compiles from scratch
                step = torch.compile(opt.step)
            made.append((opt, step, params))
        # Warm-up: compilation, JIT builds and allocator growth, and (cm) enough steps to
        # fill all topC slots, so that the timed steps replace slots as in steady state.
        n_warm = max(warmup, (topC or 0) + 3)
        t0 = time.perf_counter()
        for _, step, params in made:
            time_steps(step, params, grads, device, n_warm)
        warm_s = time.perf_counter() - t0
        times: list[list[float]] = [[] for _ in made]
        host: list[list[float]] = [[] for _ in made]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(reps):
            order = range(len(made)) if i % 2 == 0 else reversed(range(len(made)))
            for k in order:
                _, step, params = made[k]
                times[k] += time_steps(step, params, grads, device, 1, start=n_warm + i,
                                       host_ms=host[k])
        cpu1, wall1 = time.process_time(), time.perf_counter()
        # Share of the torch threads' time this process got while timing: near 1 on an idle
        # machine (memory stalls count as busy), well under 1 when others compete for cores.
        cpu_share = (cpu1 - cpu0) / max(1e-9, (wall1 - wall0) * torch.get_num_threads())
        opt, step, params = made[0]
        set_grads(params, grads[(n_warm + reps) % len(grads)])
        peak = peak_extra_bytes(step, device)
        for _, _, ps in made:  # a benchmark of garbage is no benchmark
            if not all(torch.isfinite(p).all() for p in ps):
                raise FloatingPointError("non-finite parameter after the timed steps")
        out = dict(**quantiles(times[0]), peak_extra_bytes=peak, warmup_steps=n_warm,
                   cpu_share=round(cpu_share, 3) if device.type == "cpu" else None,
                   warmup_s=round(warm_s, 3), reps=reps,
                   host_median_ms=statistics.median(host[0]))
        if baseline is not None:
            ratios = quantiles([a / b for a, b in zip(times[0], times[1])])
            base = quantiles(times[1])
            out.update(paired_ratio=ratios["median_ms"], paired_ratio_p20=ratios["p20_ms"],
                       paired_ratio_p80=ratios["p80_ms"], paired_baseline_ms=base["median_ms"],
                       paired_baseline_host_ms=statistics.median(host[1]))
        return out
    finally:
        del made
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------ machine info

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return f"{model} ({cores} cores)"


def versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception as e:  # noqa: BLE001 - only reported
        tv = f"absent ({type(e).__name__})"
    return dict(torch=torch.__version__, triton=tv, cm_fused=cm_fused.__version__,
                python=platform.python_version())


def cpu_kernels() -> str:
    """The C++ kernel build the cpu backend runs here and torch's own capability: a
    result holds for the build it ran (their speeds differ: docs/benchmarks.md)."""
    try:
        import cm_fused.cpu
        name = cm_fused.cpu.kernel_name()
    except Exception as e:  # noqa: BLE001 - only reported
        name = f"unavailable ({type(e).__name__})"
    return f"{name} (torch {torch.backends.cpu.get_cpu_capability()})"


def git_commit() -> str:
    """HEAD of the checkout bench/ lives in, '+dirty' when code that can change results is."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "cm_fused",
                                "csrc", "setup.py", "bench/harness.py", "bench/run.py",
                                "bench/param_sets.py"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
