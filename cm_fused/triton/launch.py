"""Launchers of the fused Triton step: pointer tables, their cache, and the launches.

Multi-tensor apply: every per-tensor list becomes a row of an int64 table of data
pointers (cast in-kernel with ``tl.pointer_type``), and a chunk table maps each program
of the norm and update passes to (tensor, first element). Chunks are cut per tensor, so
a chunk never crosses into the next tensor; the last chunk of a tensor is short.

Tensors of one group are bucketed by their dtypes (param, grad, the three state roles,
slot, sum) and by whether they are 16-byte aligned (decided per tensor) for the norm and
update launches; the reduce and decide launches span the whole group, so the synced key
is the same for all buckets.

Tables are built on the host from shapes and ``data_ptr()`` values only (nothing is read
from the device), uploaded once per distinct set of pointers (pinned memory and a
non-blocking copy on CUDA), and kept by the param group they belong to (plan_for), keyed
on the pointers, numels and dtypes, so a step with unchanged tensors does no
host-to-device copy at all. No step reads a device value on the host.

Block sizes: not measured (this code was written without access to a GPU); chosen from
the compiled kernels (PTX and ptxas register counts for sm_90, compiled without a GPU)
and the usual values for a memory-bound elementwise kernel, and written down below.
``CHUNK`` and ``BLOCK`` are module settings that tests shrink to get several chunks per
tensor; they are read at every call.
"""
from __future__ import annotations

import collections
import itertools
import operator
import struct
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ..contract import Phase, StepArgs, Tensors, Variant
from ..quantize import QBLOCK
from . import adaptive as A
from . import kernels as K

# Elements per program of the norm and update passes. 8192 elements x 48 bytes (fp32,
# slot replaced) = 384 KiB moved per program: long enough to amortise the table look-ups,
# short enough that a 1M-element tensor still spreads over 128 programs; a 2^31-element
# tensor makes 262144 partials for its reduce program to sum.
CHUNK = 8192
# Elements per loop iteration within a chunk: 512 with 4 warps = 4 elements per thread
# per tensor, one 16-byte vector per fp32 stream when the bucket is 16-byte aligned.
# An aligned bucket with a 2-byte stream (bf16/fp16 params, gradients or state) takes
# twice as many, an unaligned bucket at most UNALIGNED_BLOCK (_block_for). Registers for
# sm_90 in bench/results/compile_gate_sm90_sm80.txt (no variant spills).
BLOCK = 512
NUM_WARPS = 4
UNALIGNED_BLOCK = 256  # (_block_for)
# ptxas's register ceiling for the streamed kernels (norm, update, adaptive memory), as
# .maxnreg: 168 keeps at least 3 programs of 4 warps resident per SM (65536 registers),
# and stated, it also keeps ptxas from what it did unprompted for sm_80: hold some
# update variants to 96 registers and save values on the stack around the slow path of
# an IEEE division. A variant that needs more spills, which tests/test_compile_gate.py
# refuses. (The decide kernel keeps its tile of keys in registers: no ceiling.)
MAXNREG = 168
# Partials summed per iteration by the reduce pass (one program per tensor).
RBLOCK = 1024
# Tensors per program of the decide pass (a [TB, next_pow2(topC)] tile of keys).
DECIDE_TB = 128
# Distinct pointer sets kept for steps whose group owns no plans (plan_for): traced
# steps and direct calls of the op.
CACHE_SIZE = 32

# The storage dtypes the kernels take (params, state and slots: registry.FUSED_DTYPES;
# the optimizer refuses anything else before a step).
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16, torch.int8: tl.int8,  # (int8: slots only)
              torch.uint8: tl.uint8}  # (8-bit moments' codes)


def _tl_dtype(d: torch.dtype):
    try:
        return _TL_DTYPES[d]
    except KeyError:
        raise TypeError(f"the Triton kernels take float32, bfloat16 and float16 tensors, "
                        f"got {d}") from None


@dataclass
class _Bucket:
    n: int  # tensors in the bucket
    n_chunks: int
    tab: torch.Tensor  # int64 [11, n] (kernels.BUCKET_ROWS)
    chunk_t: torch.Tensor  # int64 [n_chunks]: tensor index in the bucket
    chunk_s: torch.Tensor  # int64 [n_chunks]: first element
    partials: torch.Tensor  # fp32 view [n_chunks] of the group's partials
    dtypes: dict
    aligned: bool  # all pointers 16-byte aligned, every slot too: vector loads
    idx: tuple  # the group's tensors in the bucket, in table order
    block: int = 0  # elements per loop iteration of its streamed launches (_block_for)


@dataclass
class _Plan:
    T: int
    gtab: torch.Tensor  # int64 [8, T] (kernels.GROUP_ROWS)
    buckets: list
    partials: torch.Tensor  # fp32 [chunks, NS]
    sumsq: torch.Tensor  # fp32 [T, NS]: the reduce pass's sums (NS per tensor)
    dec_i: torch.Tensor  # int32 [T, 2]
    dec_f: torch.Tensor  # fp64 [T, 3]
    grad_ptrs: tuple  # the gradients' addresses in the tables
    bucket_order: torch.Tensor  # host int64: the group's tensors, bucket after bucket
    in_aligned: torch.Tensor  # host int64: the tensors in aligned buckets
    keepalive: list = field(default_factory=list)
    # CUDA: a pinned host buffer for the gradient rows a CUDA graph's capture uploads
    # (allocated with the tables: a capture can neither pin memory nor copy from
    # pageable memory); the graph reads it at every replay, so it is the plan's for good.
    capture_rows: torch.Tensor | None = None
    grad_rows: torch.Tensor | None = None  # (pinned) host copy of the last grad-row rewrite
    in_graph: bool = False  # used while a CUDA graph captured: its tables never change
    # (but for rows that graph writes itself when it replays, as it found them captured)
    rows_on_replay: bool = False  # the gradient rows are written by a graph's replays
    state_ptrs: tuple = ()  # the state tensors' addresses in the tables (_state_ptrs)
    key: tuple = ()  # what the tables were built for (_key)
    # CUDA: the streams (cuda_stream handles) the buffers are known to be used on, the
    # one they were allocated on first; None elsewhere.
    streams: set | None = None

    def device_buffers(self) -> list:
        return [self.partials, self.sumsq, self.dec_i, self.dec_f, self.keepalive[-1]]


_cache: collections.OrderedDict = collections.OrderedDict()
# Plans a captured CUDA graph refers to: by key, for a capture after the LRU cache let
# them go, and all of them, kept alive whatever happens to the key.
_captured: dict = {}
_graph_held: list = []
# For tests: how often tables were built, found, and had only their gradient rows
# rewritten (new gradient addresses, as zero_grad(set_to_none=True) gives).
stats = {"builds": 0, "hits": 0, "grad_refreshes": 0, "stale": 0}


_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_dtype = operator.attrgetter("dtype")


def _ptrs(ts):
    return tuple(map(_data_ptr, ts))


# The StepArgs lists a table depends on, and the rows of a bucket table they give.
_LISTS = ("params", "grads", "momenta", "second_moments", "extras", "buffers", "sums",
          "scales", "moment_scales", "keys", "counts", "steps", "memory", "inserts",
          "pending")
_STATE_LISTS = _LISTS[2:]
_BUCKET_LISTS = ("params", "grads", "momenta", "second_moments", "extras", "buffers", "sums",
                 "scales", "moment_scales")
# kernels.BUCKET_ROWS, in that order
_DTYPE_NAMES = ("p", "g", "m", "v", "x", "b", "s", "q", "ms")
_GRAD_ROW = K.BUCKET_ROWS.index("g")


def _key(args: StepArgs, ns: int, chunk: int, block: int):
    """Everything a table depends on but the gradients' addresses (the plan checks those
    itself, and rewrites just their rows when they move). Computed every step, so kept
    to C-level loops: the params' addresses, numels and dtypes; a state list's serial
    where the optimizer vouches for it (contract.Tensors), else its addresses and dtypes."""
    params = args.params
    parts = [params[0].device, ns, chunk, block, _ptrs(params), tuple(map(_numel, params)),
             tuple(map(_dtype, params)), tuple(map(_dtype, args.grads))]
    for name in _STATE_LISTS:
        ts = getattr(args, name)
        if type(ts) is Tensors:
            parts.append(ts.serial)
        else:
            parts.append(_ptrs(ts))
            parts.append(tuple(map(_dtype, ts)))
    return tuple(parts)


def _pad2(x: list) -> list:
    """Pad to an even length so that every sub-table starts 16-byte aligned."""
    return x + [0] * (len(x) % 2)


def _build(args: StepArgs, ns: int, chunk: int, block: int) -> _Plan:
    params = args.params
    T = len(params)
    device = params[0].device
    numels = [p.numel() for p in params]
    n_chunks = [(n + chunk - 1) // chunk for n in numels]
    lists = [getattr(args, name) for name in _BUCKET_LISTS]

    # Buckets: tensors of the same dtypes and alignment. Alignment is decided per tensor
    # (every pointer 16-byte aligned, and each slot too: numel * slot size a multiple of
    # 16 bytes), so that one odd tensor does not take the vector loads from the rest.
    slot_bytes = [b.element_size() for b in args.buffers] if args.buffers else [16] * T
    order: dict = {}
    for i in range(T):
        dts = tuple(ts[i].dtype if ts else None for ts in lists)
        aligned = (chunk % block == 0 and numels[i] * slot_bytes[i] % 16 == 0
                   and all(ts[i].data_ptr() % 16 == 0 for ts in lists if ts))
        order.setdefault((dts, aligned), []).append(i)

    blob: list = []
    spans = []  # (offset, length) of each sub-table in blob

    def put(values):
        spans.append((len(blob), len(values)))
        blob.extend(_pad2(values))

    partial_offset = [0] * T
    bucket_specs = []
    base = 0
    for (dts, aligned), idx in order.items():
        rows = [_ptrs(ts[i] for i in idx) if ts else (0,) * len(idx) for ts in lists]
        rows += [tuple(numels[i] for i in idx), tuple(idx)]
        put([v for row in rows for v in row])
        chunk_t, chunk_s = [], []
        for local, i in enumerate(idx):
            partial_offset[i] = base + len(chunk_t)
            chunk_t.extend([local] * n_chunks[i])
            chunk_s.extend(range(0, numels[i], chunk))
        put(chunk_t)
        put(chunk_s)
        bucket_specs.append((dts, tuple(idx), len(chunk_t), base, aligned))
        base += len(chunk_t)
    def row(ts):  # a group-table row; zeros where the role is unused
        return _ptrs(ts) if len(ts) == T else (0,) * T

    put([*row(args.keys), *row(args.counts), *row(args.steps), *partial_offset, *n_chunks,
         *row(args.memory), *row(args.inserts), *row(args.pending)])

    host = torch.tensor(blob, dtype=torch.int64)
    keepalive = []
    if device.type == "cuda":
        host = host.pin_memory()
        keepalive.append(host)  # the copy below is asynchronous
        dev = host.to(device, non_blocking=True)
    else:
        dev = host.to(device)

    def view(k):
        off, length = spans[k]
        return dev[off:off + length]

    partials = torch.empty(max(base, 1) * ns, dtype=torch.float32, device=device)
    buckets = []
    for b, (dts, idx, nch, pbase, aligned) in enumerate(bucket_specs):
        buckets.append(_Bucket(
            n=len(idx), n_chunks=nch, idx=idx, tab=view(3 * b), chunk_t=view(3 * b + 1),
            chunk_s=view(3 * b + 2), partials=partials[pbase * ns:(pbase + max(nch, 1)) * ns],
            dtypes={k: (_tl_dtype(d) if d is not None else tl.float32)
                    for k, d in zip(_DTYPE_NAMES, dts)}, aligned=aligned))
        buckets[-1].block = _block_for(buckets[-1], block, chunk,
                                       QBLOCK if _quantized(args) else 1)
    return _Plan(
        T=T, gtab=view(3 * len(bucket_specs)), buckets=buckets, partials=partials,
        sumsq=torch.empty(T * ns, dtype=torch.float32, device=device),
        dec_i=torch.empty(T, 2, dtype=torch.int32, device=device),
        dec_f=torch.empty(T, 3, dtype=torch.float64, device=device),
        grad_ptrs=_ptrs(args.grads),
        bucket_order=torch.tensor([i for b in buckets for i in b.idx], dtype=torch.int64),
        in_aligned=torch.tensor([i for b in buckets if b.aligned for i in b.idx],
                                dtype=torch.int64),
        keepalive=[*keepalive, dev], state_ptrs=_state_ptrs(args),
        capture_rows=torch.empty(T, dtype=torch.int64, pin_memory=True)
        if device.type == "cuda" else None,
        streams={torch.cuda.current_stream(device).cuda_stream}
        if device.type == "cuda" else None)


def plan_for(args: StepArgs, ns: int, chunk: int, block: int) -> _Plan:
    """The tables of this group's tensors (``ns`` sums per tensor in the reduce pass).

    A group the optimizer vouches for (``args.steps`` a contract.Tensors, one per group
    and per set of step counters) owns its plans: they live in that list's ``plans``, as
    long as the group's lists do, so any number of groups and optimizers step without a
    rebuild. Other calls (a traced step, the op called directly) share an LRU cache."""
    key = _key(args, ns, chunk, block)
    capturing = _capturing(args.params[0])
    owner = args.steps if type(args.steps) is Tensors else None
    if owner is not None:
        held = owner.plans.get((ns, chunk, block))
        plan = held if held is not None and held.key == key else _captured.get(key)
    else:
        plan = _cache.get(key) or _captured.get(key)
    if plan is not None and plan.state_ptrs != _state_ptrs(args):
        # A state tensor's storage was swapped in place (.data =, set_): its table rows
        # hold a freed address. Rebuilt (refused while capturing, below).
        stats["stale"] += 1
        plan = None
    if plan is not None:
        grads = _ptrs(args.grads)
        if grads == plan.grad_ptrs:
            if plan.rows_on_replay:
                # A graph captured the writes of these rows: until it replays they hold
                # the gradients before it. Written again by this step (eagerly, or by
                # this capture, which cannot count on the other graph's replays).
                _move_grads(plan, grads, capturing)
        elif plan.in_graph or not _move_grads(plan, grads, capturing):
            # (a graph reads these tables as they are: other gradients get their own)
            plan = None
        if plan is not None:
            if key in _cache:
                _cache.move_to_end(key)
            stats["hits"] += 1
    if plan is None:
        if capturing:
            raise RuntimeError(
                "cm_fused (triton): a CUDA graph is capturing a step whose tensors this "
                "process has not stepped yet (new parameters or state tensors, a storage "
                "swapped in place since the last step, gradients no longer 16-byte "
                "aligned, or new gradients for tables an earlier graph captured); "
                "building their tables needs a host upload a capture cannot hold. Run "
                "eager steps with the same parameters first (the usual warm-up on a side "
                "stream before capture); gradients the captured backward allocates are "
                "fine.")
        plan = _build(args, ns, chunk, block)
        plan.key = key
        stats["builds"] += 1
        _captured.pop(key, None)  # (a graph's own plan stays alive in _graph_held)
        if owner is not None:
            owner.plans[(ns, chunk, block)] = plan
        else:
            _cache[key] = plan
            _cache.move_to_end(key)
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    if plan.streams is not None:
        _used_on_current_stream(plan)
    if capturing and not plan.in_graph:  # the graph holds the tables' addresses
        plan.in_graph = True
        _captured[key] = plan
        _graph_held.append(plan)
    return plan


def _used_on_current_stream(plan: _Plan) -> None:
    """The plan's device buffers were allocated on the stream current when it was built;
    launched on another, they must not be handed out again before that stream is done
    with them (the caching allocator only waits for the stream it allocated on)."""
    stream = torch.cuda.current_stream(plan.partials.device)
    if stream.cuda_stream not in plan.streams:
        plan.streams.add(stream.cuda_stream)
        for t in plan.device_buffers():
            t.record_stream(stream)


def _state_ptrs(args: StepArgs) -> tuple:
    """Every state tensor's address, in one C-level pass: what the serials in the key
    cannot see (a storage swapped in place)."""
    return tuple(map(_data_ptr, itertools.chain.from_iterable(
        map(getattr, itertools.repeat(args), _STATE_LISTS))))


def _move_grads(plan: _Plan, grads: tuple, capturing: bool) -> bool:
    """Rewrite the gradient rows of the plan's bucket tables for new gradient addresses
    (zero_grad(set_to_none=True) hands out new tensors each step). False when the tables
    cannot take them as they are: a gradient no longer 16-byte aligned in an aligned
    bucket (the plan is then rebuilt).

    While a CUDA graph captures (a whole iteration, whose backward allocated these
    gradients in the graph's pool, at addresses fixed for its replays), the upload and
    the row copies are captured: each replay writes the rows before its kernels read
    them, from the plan's pinned ``capture_rows`` (a plan in a graph takes one set of
    gradients, so one buffer serves every capture of it).
    """
    ptrs = torch.tensor(grads, dtype=torch.int64)  # (on the host: no device sync below)
    if bool((ptrs[plan.in_aligned] % 16).any()):
        return False
    host = ptrs[plan.bucket_order]
    device = plan.partials.device
    if capturing and plan.capture_rows is not None:
        host = plan.capture_rows.copy_(host)  # (a host copy: the capture sees none)
    elif device.type == "cuda":
        host = host.pin_memory()
    dev = host.to(device, non_blocking=True)
    offset = 0
    for b in plan.buckets:  # (device-side copies, in stream order after the upload)
        b.tab[_GRAD_ROW * b.n:(_GRAD_ROW + 1) * b.n].copy_(dev[offset:offset + b.n])
        offset += b.n
    if capturing:
        plan.capture_rows = host  # (what the graph reads at every replay: kept with it)
    else:
        plan.grad_rows = host  # the upload may still be reading it (a new one next time)
    plan.rows_on_replay = capturing
    plan.grad_ptrs = grads
    stats["grad_refreshes"] += 1
    return True


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def release_captured_plans() -> None:
    """Let the plan cache free the tables that captured CUDA graphs use: call it once
    those graphs are deleted (until then they are kept, whatever the cache's size)."""
    _captured.clear()
    _graph_held.clear()
    for plan in _cache.values():
        plan.in_graph = False


# Launch log for tests: when a list, each launch appends (kernel name, grid, the
# specialisation of its arguments: dtype of tensors, "int"/"fp32" for scalars and the
# value of constexprs, the compile options: num_warps, maxnreg). Hyperparameters must
# show up as "fp32", never as values. (tests/test_compile_gate.py compiles what it
# records for sm_80 and sm_90.)
launch_log: list | None = None


def _fp32(x: float) -> float:
    return _F32.unpack(_F32.pack(x))[0]


_F32 = struct.Struct("f")


def _split(x: float) -> tuple[float, float]:
    """A float as two fp32 halves whose fp64 sum is x to ~48 bits (Triton passes Python
    floats as fp32; the bias corrections and lr / bc1 need fp64, as the reference).
    Rounded with struct, not torch.tensor: no allocation per launch."""
    hi = _fp32(x)
    return hi, _fp32(x - hi)


def _launch(kernel, grid, args: tuple, constexprs: dict, num_warps: int,
            maxnreg: int | None = None) -> None:
    if launch_log is not None:
        spec = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else
                     "int" if isinstance(a, int) else "fp32" if isinstance(a, float) else
                     repr(a) for a in args)
        launch_log.append((_kname(kernel), grid, spec, tuple(sorted((k, str(v)) for k, v in
                                                    constexprs.items())),
                           dict(num_warps=num_warps, maxnreg=maxnreg)))
    # enable_fp_fusion=False: no fma contraction, so every operation rounds as torch's
    # separate kernels do (explicit tl.fma where torch fuses).
    options = dict(num_warps=num_warps, enable_fp_fusion=False)
    if maxnreg is not None:  # (an option of Triton's CUDA backend only)
        options["maxnreg"] = maxnreg
    kernel[grid](*args, **constexprs, **options)


_NARROW = (tl.bfloat16, tl.float16)


def _block_for(b: _Bucket, block: int, chunk: int, least: int = 1) -> int:
    """Elements per loop iteration for the bucket's streamed launches (at least
    ``least``: the int8 slots' QBLOCK). Doubled where a 2-byte stream read every step
    (params, gradients, state; not the slots, read only on an insert) would otherwise
    move 8 bytes per load, in an aligned bucket whose chunks start at multiples of it.
    At most UNALIGNED_BLOCK in an unaligned bucket: it loads element by element, each
    with an address of its own (ptxas for sm_90: AdamCM's single-pass update took 189
    registers at 512, 56 at 256)."""
    if not b.aligned:
        return max(min(block, UNALIGNED_BLOCK), least)
    if chunk % (2 * block) == 0 and any(b.dtypes[k] in _NARROW for k in "pgmvx"):
        return 2 * block
    return block


def _rounding(args: StepArgs, b: _Bucket) -> torch.Tensor | None:
    """StepArgs.rounding where the bucket's params are bf16 or fp16 (an fp32 param is
    stored as computed), else None. The kernels index it by the tensor's position in the
    group, so it is passed as it is: no table of the plan depends on it."""
    return args.rounding if args.rounding is not None and b.dtypes["p"] in _NARROW else None


def _kname(kernel):
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", str(kernel))


def step(args: StepArgs) -> None:
    """One step of one param group (see kernels.py for the four launches), launched on
    the tensors' device and its current stream, whatever device is current."""
    if not args.params:
        return
    device = args.params[0].device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            _step(args)
    else:
        _step(args)


def _quantized(args: StepArgs) -> bool:
    """Whether a step quantizes per block of QBLOCK elements (int8 slots, 8-bit moments):
    a program's loop iterations must then hold whole blocks."""
    return bool(args.scales or args.moment_scales)


def _sizes(args: StepArgs) -> tuple[int, int]:
    """(block, chunk) of the streamed launches: the module's settings (tests shrink them),
    where the step quantizes a block at least QBLOCK and a chunk a multiple of it, so
    that a program's loop iterations hold whole blocks of QBLOCK elements."""
    block, chunk = int(BLOCK), int(CHUNK)
    if _quantized(args):
        block = max(block, QBLOCK)
        chunk = -(-chunk // block) * block
    return block, chunk


def _step(args: StepArgs) -> None:
    if args.pending and (args.variant != Variant.ADAM_CM or args.phase != Phase.ALL):
        raise ValueError("cm_fused (triton): pending inserts are AdamCM's, in a whole step "
                         "(StepArgs.pending)")
    r = args.rounding
    if r is not None and (r.dtype != torch.int64 or r.shape != (len(args.params), 2)
                          or not r.is_contiguous() or r.device != args.params[0].device):
        # (the kernels read row i at 2 * i, unchecked)
        raise ValueError(f"cm_fused (triton): StepArgs.rounding must be a contiguous int64 "
                         f"[{len(args.params)}, 2] tensor on {args.params[0].device}, got "
                         f"{r.dtype} {tuple(r.shape)} on {r.device}")
    if not Variant(args.variant).buffered:
        _step_adaptive(args)
        return
    C = int(args.buffers[0].shape[0])
    block, chunk = _sizes(args)
    plan = plan_for(args, 1, chunk, block)
    T = plan.T
    dummy = plan.sumsq
    grad_scale, found_inf, lr_tensor = args.grad_scale, args.found_inf, args.lr_tensor

    def norms() -> None:
        for b in plan.buckets:
            if b.n_chunks:
                _launch(K._norm_kernel, (b.n_chunks,),
                        (b.tab, b.n, b.chunk_t, b.chunk_s, b.partials,
                         dummy if grad_scale is None else grad_scale, chunk),
                        dict(G_DT=b.dtypes["g"], HAS_SCALE=grad_scale is not None,
                             ALIGNED=b.aligned, BLOCK=b.block),
                        NUM_WARPS, MAXNREG)

    lr = float(args.lr)
    defer = bool(args.pending)
    if defer and any(b.dtypes["p"] is not tl.float32 for b in plan.buckets):
        raise ValueError("cm_fused (triton): pending inserts need float32 params (the "
                         "momentum as stored is the value inserted)")

    def updates() -> None:
        for b in plan.buckets:
            if b.n_chunks:
                d = b.dtypes
                rounding = _rounding(args, b)
                _launch(K._update_kernel, (b.n_chunks,),
                        (b.tab, b.n, b.chunk_t, b.chunk_s, plan.dec_i, plan.dec_f,
                         *_split(lr), 1.0 - lr * float(args.weight_decay),
                         dummy if lr_tensor is None else lr_tensor,
                         dummy if grad_scale is None else grad_scale,
                         dummy if found_inf is None else found_inf, chunk, C,
                         float(args.beta1), 1.0 - float(args.beta1), float(args.beta2),
                         1.0 - float(args.beta2), float(args.eps), float(args.weight_decay),
                         1.0 - float(args.dampening), plan.gtab, T, b.partials,
                         *_split(args.beta1), *_split(args.beta2),
                         dummy if rounding is None else rounding),
                        dict(VARIANT=int(args.variant), P_DT=d["p"], G_DT=d["g"], M_DT=d["m"],
                             V_DT=d["v"], X_DT=d["x"], B_DT=d["b"], S_DT=d["s"],
                             HAS_S=bool(args.sums), LR_IS_PTR=lr_tensor is not None,
                             HAS_SCALE=grad_scale is not None,
                             HAS_FOUND_INF=found_inf is not None, HAS_MOM=bool(args.momenta),
                             HAS_X=bool(args.extras), MAXIMIZE=bool(args.maximize),
                             ALIGNED=b.aligned, DEFER=defer, ROUNDING=rounding is not None,
                             QB=QBLOCK, BLOCK=b.block),
                        NUM_WARPS, MAXNREG)

    # A single-pass step (pending inserts) updates first and sums the norms as it goes;
    # the decisions come after it. Otherwise: norms, decisions, update.
    if not _reduce_pass(args, plan, updates if defer else norms, 1, exchange=True):
        return
    CP = max(2, triton.next_power_of_2(C))
    TB = min(DECIDE_TB, max(16, 2048 // CP))  # a [TB, CP] tile of keys: <= 2048 or 16 rows
    _launch(K._decide_kernel, (triton.cdiv(T, TB),),
            (plan.gtab, T, plan.sumsq, dummy if args.rand is None else args.rand,
             dummy if found_inf is None else found_inf, plan.dec_i, plan.dec_f, C,
             float(args.critical_test), float(args.key_decay), *_split(args.beta1),
             *_split(args.beta2)),
            dict(SYNCED=bool(args.synced), HAS_RAND=args.rand is not None,
                 HAS_FOUND_INF=found_inf is not None, DEFER=defer, CP=CP, TB=TB), 4)
    if not defer:
        updates()


def _reduce_pass(args: StepArgs, plan: _Plan, partials, ns: int, exchange: bool) -> bool:
    """Fill ``plan.sumsq``: launch ``partials`` (each chunk's sums) and the reduce kernel,
    or, in the UPDATE phase of a step whose sums are exchanged, take ``args.reduced``
    (summed over the processes). A REDUCE phase of such a step hands the sums over in
    ``args.reduced`` and returns False: the call is done. (SGD_AM's UPDATE phase reduces
    nothing: its decide kernel reads the sums it added into memory[0].)"""
    if args.phase == Phase.UPDATE:
        if exchange:
            plan.sumsq.copy_(args.reduced.view(-1))
        return True
    partials()
    _launch(K._reduce_kernel, (plan.T,), (plan.gtab, plan.T, plan.partials, plan.sumsq),
            dict(NS=ns, RBLOCK=RBLOCK), 4)
    if exchange and args.phase == Phase.REDUCE:
        args.reduced.view(-1).copy_(plan.sumsq)
        return False
    return True


def _step_adaptive(args: StepArgs) -> None:
    """One step (or one phase of a split step) of an adaptive-memory group: reduce,
    decide, update (adaptive.py)."""
    adam = args.variant == Variant.ADAM_AM
    ns = Variant(args.variant).sums_per_tensor
    block, chunk = _sizes(args)
    plan = plan_for(args, ns, chunk, block)
    T = plan.T
    dummy = plan.sumsq
    grad_scale, found_inf, lr_tensor = args.grad_scale, args.found_inf, args.lr_tensor
    lr = float(args.lr)
    lr_hi, lr_lo = _split(lr)
    beta2_hi, beta2_lo = _split(args.beta2)

    def am_kernel(reduce: bool) -> None:
        for b in plan.buckets:
            if b.n_chunks:
                rounding = None if reduce else _rounding(args, b)
                _launch(A._am_kernel, (b.n_chunks,),
                        (b.tab, b.n, b.chunk_t, b.chunk_s, plan.gtab, T, b.partials,
                         plan.dec_i, plan.dec_f, lr_hi, 1.0 - lr * float(args.weight_decay),
                         dummy if lr_tensor is None else lr_tensor,
                         dummy if grad_scale is None else grad_scale,
                         dummy if found_inf is None else found_inf, chunk,
                         float(args.beta1), beta2_hi, beta2_lo, float(args.beta2),
                         1.0 - float(args.beta2), float(args.eps), float(args.weight_decay),
                         float(args.lam), 1.0 + float(args.lam),
                         dummy if rounding is None else rounding),
                        dict(VARIANT=int(args.variant), P_DT=b.dtypes["p"], G_DT=b.dtypes["g"],
                             M_DT=b.dtypes["m"], V_DT=b.dtypes["v"],
                             LR_IS_PTR=lr_tensor is not None,
                             HAS_SCALE=grad_scale is not None,
                             HAS_FOUND_INF=found_inf is not None,
                             MAXIMIZE=bool(args.maximize), REDUCE=reduce, NS=ns,
                             ALIGNED=b.aligned, ROUNDING=rounding is not None,
                             QB=QBLOCK, BLOCK=b.block),
                        NUM_WARPS, MAXNREG)

    # ADAM_AM's split step hands its sums over in args.reduced (summed over processes);
    # SGD_AM's adds them into memory[0] (summed over groups) in the decide kernel.
    if not _reduce_pass(args, plan, lambda: am_kernel(reduce=True), ns, exchange=adam):
        return
    tb = DECIDE_TB
    _launch(A._am_decide_kernel, (triton.cdiv(T, tb) if adam else 1,),
            (plan.gtab, T, plan.sumsq, args.memory[0], dummy if found_inf is None else
             found_inf, plan.dec_i, plan.dec_f, lr_hi, lr_lo,
             dummy if lr_tensor is None else lr_tensor, *_split(args.beta1), beta2_hi,
             beta2_lo, *_split(args.weight_decay)),
            dict(VARIANT=int(args.variant),
                 PHASE=int(Phase.ALL) if adam else int(args.phase),
                 LR_IS_PTR=lr_tensor is not None, HAS_FOUND_INF=found_inf is not None,
                 TB=tb), 4)
    if args.phase != Phase.REDUCE:
        am_kernel(reduce=False)
