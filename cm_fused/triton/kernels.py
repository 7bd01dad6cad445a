"""Triton kernels of the fused step (docs/SPEC.md, kappa > 0), for every variant.

One step of one param group is four launches (see launch.py for the tables they read):

1. ``_norm_kernel`` (one launch per bucket of dtypes and alignment, one program per
   chunk): the sum of squares of the unscaled gradient over the chunk, written as a
   per-chunk partial.
2. ``_reduce_kernel`` (one launch per group, one program per tensor): the tensor's
   partials summed in a fixed order -> its sum of squares. No atomics, so the keys, and
   with them the insert decisions, are bit-for-bit repeatable. (A sharded run would
   all_reduce this [T] array before the next launch.)
3. ``_decide_kernel`` (one launch per group, one program per block of tensors): key n,
   the insert rule (argmin of K, replace flag and slot j, K written and decayed, fill
   count), step count, bias corrections; the per-tensor decision goes to two small
   device arrays. The same for every variant.
4. ``_update_kernel`` (one launch per bucket of dtypes and alignment, one program per chunk): the
   elementwise part in one pass over memory; ``VARIANT`` (cm_fused.contract.Variant)
   selects the arithmetic: what is inserted, the direction, the base rule.

A single-pass step (``DEFER``: AdamCM with fp32 params, StepArgs.pending) takes three
launches in another order: ``_update_kernel`` first (it writes the insert the previous
step left pending before it reads S, fills slot 0 on a tensor's first step, and sums the
gradient's squares per chunk as ``_norm_kernel`` would), then ``_reduce_kernel``, then
``_decide_kernel``, which leaves this step's insert pending: 44 B per element instead of
48 (g is read once).

Hyperparameters are runtime arguments (never ``tl.constexpr``), so a scheduler changing
lr does not recompile; floats that the reference uses in fp64 (lr, the betas of the bias
corrections) travel as two fp32 halves. ``found_inf``, ``grad_scale`` and a tensor lr
are read on the device. Math is fp32 (the bias corrections fp64): narrow dtypes are
widened on load and narrowed on store (round to nearest even, or stochastically for
bf16/fp16 params with ``ROUNDING``: ``_param_code``). The arithmetic follows
the reference operation by operation (the launchers turn off fp contraction; an
explicit fma where torch's lerp has one; IEEE division and square root), so that in the
tests, fp32 included, the two differ only by the summation order of the norms (keys).

Memory traffic per element and step, fp32 everything, AdamCM or AdamCG: the norm pass
reads g (4 B); the update reads p, g, m, v, S (20 B) and writes p, m, v (12 B); when the
tensor's slot is replaced it also reads B[j] and writes B[j] and S (12 B): 48 B with an
insert, 36 B without (amsgrad: +8 B). bf16 params with bf16 slots and the fp32 S: 28 B
with an insert. SGDCG with momentum: 40 B with an insert.

8-bit moments (``m``/``v`` uint8 codes, StepArgs.moment_scales): the update reads a
block's codes as the values they hold, computes as with full-precision moments, and
writes the new ones back as codes, one scale per QBLOCK elements (_moment_load,
_moment_store: cm_fused/quantize.py's operations in its order, so the bytes are the
reference's); a momentum and a second moment of 1 B each, and 4/256 B of scales, instead
of 4 B each. Without a running sum (8-bit moments, int8 slots, topC <= 8: ``HAS_S``
off) the mean reads the sum of the C int8 slots (_slot_sum): C B per element read
instead of S's 4 B read and, with an insert, written.

A chunk's full blocks load and store unmasked (16-byte vectors when the host found the
bucket aligned); only the last block of a tensor is masked.
"""
import triton
import triton.language as tl

# Rows of a bucket's pointer table (int64 [len(BUCKET_ROWS), n]), indexed by the tensor's
# position in the bucket.
# Roles m, v, x: the StepArgs lists momenta, second_moments, extras (a zero pointer where
# the role is unused).
# (q: int8 slots' scales, StepArgs.scales; ms: 8-bit moments' scales,
# StepArgs.moment_scales, where m and v are uint8 codes)
BUCKET_ROWS = ("p", "g", "m", "v", "x", "b", "s", "q", "ms", "numel", "gidx")
ROW_P, ROW_G, ROW_M, ROW_V, ROW_X, ROW_B, ROW_S, ROW_Q, ROW_MS, ROW_NUMEL, ROW_GIDX = (
    tl.constexpr(i) for i in range(len(BUCKET_ROWS)))
# Rows of a group's table (int64 [len(GROUP_ROWS), T]), indexed by the tensor's position in
# the group (the order of the params list).
# (memory: the adaptive-memory scalars of StepArgs.memory; 0 where unused.)
# (pending: StepArgs.pending, AdamCM's deferred inserts; 0 where unused.)
GROUP_ROWS = ("keys", "count", "step", "partial_offset", "partial_count", "memory", "inserts",
              "pending")
ROW_KEYS, ROW_COUNT, ROW_STEP, ROW_POFF, ROW_PCNT, ROW_MEM, ROW_INS, ROW_PEND = (
    tl.constexpr(i) for i in range(len(GROUP_ROWS)))
# Decision arrays, per tensor of the group: int32 [T, 2] = (slot j, flags) and
# fp64 [T, 3] = (k before the insert, at least 1; bias correction 1; sqrt of bias
# correction 2, rounded to fp32 as the reference does).
FLAG_REPLACE, FLAG_FIRST = tl.constexpr(1), tl.constexpr(2)
# cm_fused.contract.Variant
ADAM_CM, ADAM_CG, SGD_CG, RMSPROP_CG, ADAM_AM, SGD_AM = (tl.constexpr(i) for i in range(6))


@triton.jit
def _f64(hi, lo):
    """A Python float passed as two fp32 arguments (Triton passes floats as fp32)."""
    return tl.cast(hi, tl.float32).to(tl.float64) + tl.cast(lo, tl.float32).to(tl.float64)


@triton.jit
def _narrow(x, DT: tl.constexpr):
    """fp32 -> DT, rounding to nearest even. bf16 is rounded by hand, as torch does
    (c10::BFloat16): the Triton interpreter's fp32 -> bf16 cast truncates, and this
    way the interpreter and the GPU round alike."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        bits = tl.where(x != x, (bits & 0) | 0x7FC00000, bits)  # NaN: torch's quiet NaN
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def _mix(x):
    """cm_fused/rounding.mix on uint32: the products wrap where the reference masks them."""
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _rounding_key(rounding_ptr, gtab_ptr, T, gi, ROUNDING: tl.constexpr):
    """Tensor gi's part of its elements' rounding bits for this step (rounding.element_bits):
    (mix(key ^ step), element offset), uint32, from its row of StepArgs.rounding. The step
    count is read from the state, where the decide kernel has already written this
    step's (the update runs only when the step does). Without ROUNDING, placeholders."""
    if ROUNDING:
        step_ptr = tl.load(gtab_ptr + ROW_STEP * T + gi).to(tl.pointer_type(tl.float32))
        key = tl.load(rounding_ptr + 2 * gi).to(tl.uint32)
        offset = tl.load(rounding_ptr + 2 * gi + 1).to(tl.uint32)  # (mod 2^32, as the hash)
        return _mix(key ^ tl.load(step_ptr).to(tl.uint32)), offset
    else:
        return 0, 0


@triton.jit
def _param_code(x, idx, rkey, roffset, DT: tl.constexpr, ROUNDING: tl.constexpr):
    """What a param of dtype DT stores for its stepped value x: x rounded to nearest, or
    (ROUNDING: bf16/fp16) stochastically, with the bits of element idx of the tensor
    (cm_fused/rounding.py: round to nearest y, or y's neighbour n on x's side when
    u < |x - y| / |n - y|)."""
    y = _narrow(x, DT)
    if ROUNDING:
        r = _mix(rkey ^ (roffset + idx.to(tl.uint32)))
        u = (r >> 8).to(tl.float32) * 5.9604644775390625e-08  # the top 24 bits, * 2^-24
        yf = y.to(tl.float32)
        bits = y.to(tl.int16, bitcast=True)
        # y's bit pattern, as int16, steps away from zero where x lies farther out than y
        # (a negative value's pattern is negative: its magnitude grows with -1).
        outward = (x > yf) == (bits >= 0)
        n = (bits + tl.where(outward, 1, -1).to(tl.int16)).to(DT, bitcast=True)
        # Neighbours differ by a power of two (or n is inf: p = 0), so p is exact. NaN x,
        # y = ±inf (x - y or |n - y| infinite: p NaN) and x == y (p = 0) keep y, as u < p
        # is false for them.
        p = tl.div_rn(tl.abs(x - yf), tl.abs(n.to(tl.float32) - yf))
        y = tl.where(u < p, n, y)
    return y


@triton.jit
def _chunk(tab_ptr, n_tab, chunk_t_ptr, chunk_s_ptr):
    """This program's chunk: (its tensor's row in the bucket table, first element, the
    tensor's numel, its index in the group)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunk_t_ptr + pid)
    start = tl.load(chunk_s_ptr + pid)
    numel = tl.load(tab_ptr + ROW_NUMEL * n_tab + t)
    gi = tl.load(tab_ptr + ROW_GIDX * n_tab + t)
    return t, start, numel, gi


@triton.jit(do_not_specialize=["n_tab", "chunk_len"])
def _norm_kernel(tab_ptr, n_tab, chunk_t_ptr, chunk_s_ptr, partial_ptr, scale_ptr,
                 chunk_len, G_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
                 ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t, start, numel, _ = _chunk(tab_ptr, n_tab, chunk_t_ptr, chunk_s_ptr)
    g_ptr = tl.load(tab_ptr + ROW_G * n_tab + t).to(tl.pointer_type(G_DT))
    if ALIGNED:  # see _update_kernel
        g_ptr = tl.multiple_of(g_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    end = tl.minimum(start + chunk_len, numel)
    full_end = start + ((end - start) // BLOCK) * BLOCK
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, full_end, BLOCK):  # full blocks: no mask
        g = tl.load(g_ptr + off + tl.arange(0, BLOCK)).to(tl.float32)
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        acc += g * g
    for off in range(full_end, end, BLOCK):  # the tensor's last, short block (0 or 1)
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        acc += tl.where(mask, g * g, 0.0)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["T"])
def _reduce_kernel(gtab_ptr, T, partial_ptr, sumsq_ptr, NS: tl.constexpr,
                   RBLOCK: tl.constexpr):
    """Per tensor, each of the NS sums of its chunks' partials ([chunk, NS] -> [T, NS])."""
    i = tl.program_id(0).to(tl.int64)
    first = tl.load(gtab_ptr + ROW_POFF * T + i)
    count = tl.load(gtab_ptr + ROW_PCNT * T + i)
    for s in tl.static_range(NS):
        acc = tl.zeros([RBLOCK], dtype=tl.float32)
        for r in range(0, count, RBLOCK):
            idx = r + tl.arange(0, RBLOCK)
            acc += tl.load(partial_ptr + (first + idx) * NS + s, mask=idx < count, other=0.0)
        tl.store(sumsq_ptr + i * NS + s, tl.sum(acc, axis=0))


@triton.jit
def _pow64(base, e):
    """base ** e elementwise in fp64 for integer e >= 0, by binary powering (no
    transcendental needed; the bias corrections need fp64)."""
    acc = tl.full(e.shape, 1.0, dtype=tl.float64)
    b = tl.zeros(e.shape, dtype=tl.float64) + base
    while tl.max(e, axis=0) > 0:
        acc = tl.where((e & 1) != 0, acc * b, acc)
        b = b * b
        e = e >> 1
    return acc


@triton.jit(do_not_specialize=["T", "C"])
def _decide_kernel(gtab_ptr, T, sumsq_ptr, rand_ptr, found_inf_ptr, dec_i_ptr, dec_f_ptr,
                   C, critical_test, key_decay, beta1_hi, beta1_lo, beta2_hi, beta2_lo,
                   SYNCED: tl.constexpr, HAS_RAND: tl.constexpr,
                   HAS_FOUND_INF: tl.constexpr, DEFER: tl.constexpr, CP: tl.constexpr,
                   TB: tl.constexpr):
    critical_test = tl.cast(critical_test, tl.float32)
    key_decay = tl.cast(key_decay, tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * TB + tl.arange(0, TB).to(tl.int64)
    rmask = rows < T
    cols = tl.arange(0, CP)
    cmask = cols < C

    # The key: each tensor's own norm, or (synced) the sum over the group of the
    # per-tensor norms (SPEC quirk: not the global norm). Every program sums in the same
    # order, so all of them see the same n.
    if SYNCED:
        acc = tl.zeros([TB], dtype=tl.float32)
        for s in range(0, T, TB):
            idx = s + tl.arange(0, TB)
            ss = tl.load(sumsq_ptr + idx, mask=idx < T, other=0.0)
            acc += tl.where(idx < T, tl.sqrt_rn(ss), 0.0)
        n = tl.zeros([TB], dtype=tl.float32) + tl.sum(acc, axis=0)
    else:
        n = tl.sqrt_rn(tl.load(sumsq_ptr + rows, mask=rmask, other=0.0))

    k_ptr = tl.load(gtab_ptr + ROW_KEYS * T + rows, mask=rmask, other=0)
    k_ptr = k_ptr.to(tl.pointer_type(tl.float32))
    cnt_ptr = tl.load(gtab_ptr + ROW_COUNT * T + rows, mask=rmask, other=0)
    cnt_ptr = cnt_ptr.to(tl.pointer_type(tl.int64))
    step_ptr = tl.load(gtab_ptr + ROW_STEP * T + rows, mask=rmask, other=0)
    step_ptr = step_ptr.to(tl.pointer_type(tl.float32))
    ins_ptr = tl.load(gtab_ptr + ROW_INS * T + rows, mask=rmask, other=0)
    ins_ptr = ins_ptr.to(tl.pointer_type(tl.int64))

    kmask = rmask[:, None] & cmask[None, :]
    K = tl.load(k_ptr[:, None] + cols[None, :], mask=kmask, other=float("inf"))
    k = tl.load(cnt_ptr, mask=rmask, other=0)
    step = tl.load(step_ptr, mask=rmask, other=0.0)

    # argmin of K, first index on ties; a NaN key is the minimum (as torch.argmin).
    Kmin_in = tl.where(K != K, float("-inf"), K)
    Kmin_in = tl.where(kmask, Kmin_in, float("inf"))
    kmin = tl.min(Kmin_in, axis=1)
    jmin = tl.min(tl.where(Kmin_in == kmin[:, None], cols[None, :], CP), axis=1)
    kj = tl.sum(tl.where(cols[None, :] == jmin[:, None], K, 0.0), axis=1)

    first = k == 0
    full = k >= C
    j = tl.where(full, jmin.to(tl.int64), tl.minimum(k, C - 1))
    replace = (k < C) | (n > kj)
    if HAS_RAND:
        lucky = tl.load(rand_ptr + rows, mask=rmask, other=1.0).to(tl.float32) < critical_test
        replace = replace | lucky

    K_new = tl.where((cols[None, :] == j[:, None]) & replace[:, None], n[:, None], K)
    K_new = K_new * key_decay
    k_new = tl.where(replace & (k < C), k + 1, k)
    step_new = step + 1.0

    # Bias corrections 1 - beta^step in fp64 (in fp32, 1 - beta2^step loses ~1e-5 to
    # cancellation).
    e = step_new.to(tl.int64)
    bc1 = 1.0 - _pow64(_f64(beta1_hi, beta1_lo), e)
    bc2 = 1.0 - _pow64(_f64(beta2_hi, beta2_lo), e)

    wmask = rmask
    if HAS_FOUND_INF:
        fi = tl.zeros([TB], dtype=tl.float32) + tl.load(found_inf_ptr).to(tl.float32)
        wmask = wmask & (fi == 0.0)
    tl.store(k_ptr[:, None] + cols[None, :], K_new, mask=kmask & wmask[:, None])
    tl.store(cnt_ptr, k_new, mask=wmask)
    ins = tl.load(ins_ptr, mask=rmask, other=0)
    tl.store(ins_ptr, ins + replace.to(tl.int64), mask=wmask)
    tl.store(step_ptr, step_new, mask=wmask)
    if DEFER:  # a first step filled slot 0 in the update pass; any other insert waits
        pend_ptr = tl.load(gtab_ptr + ROW_PEND * T + rows, mask=rmask, other=0)
        pend_ptr = pend_ptr.to(tl.pointer_type(tl.int64))
        tl.store(pend_ptr, tl.where(replace & (k > 0), j, -1), mask=wmask)

    flags = replace.to(tl.int32) * FLAG_REPLACE + first.to(tl.int32) * FLAG_FIRST
    tl.store(dec_i_ptr + 2 * rows, j.to(tl.int32), mask=rmask)
    tl.store(dec_i_ptr + 2 * rows + 1, flags, mask=rmask)
    tl.store(dec_f_ptr + 3 * rows, tl.maximum(k, 1).to(tl.float64), mask=rmask)
    tl.store(dec_f_ptr + 3 * rows + 1, bc1, mask=rmask)
    tl.store(dec_f_ptr + 3 * rows + 2, tl.sqrt(bc2).to(tl.float32).to(tl.float64),
             mask=rmask)


@triton.jit
def _ld(ptr, mask):
    """Load, masked only where the block may run past the end (mask None: a full block,
    which the compiler can vectorise)."""
    if mask is None:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _st(ptr, value, mask):
    if mask is None:
        tl.store(ptr, value)
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _lerp(start, end, w):
    """start.lerp(end, w) as torch computes it: one fma, from start for a small weight,
    from end for a large one."""
    d = end - start
    return tl.where(w < 0.5, tl.fma(w, d, start), tl.fma(w - 1.0, d, end))


@triton.jit
def _round_half_even(y):
    """Round to the nearest integer, ties to even, for |y| < 2**22: adding and taking away
    1.5 * 2**23 leaves no fraction bits, and fp32 addition rounds ties to even (exact
    under the interpreter too; the launches turn off fp contraction)."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _rows(idx, QB: tl.constexpr, BLOCK: tl.constexpr):
    """A block of BLOCK elements as BLOCK // QB rows of one quantization block each (QB
    divides BLOCK, and blocks start at multiples of it): each row's block index."""
    return tl.min(tl.reshape(idx, (BLOCK // QB, QB)), axis=1) // QB


@triton.jit
def _row_mask(mask, QB: tl.constexpr, BLOCK: tl.constexpr):
    """Whether any element of each row (_rows) is in the mask."""
    return tl.max(tl.reshape(mask, (BLOCK // QB, QB)).to(tl.int32), axis=1) > 0


@triton.jit
def _scales_ld(ptr, idx, mask, QB: tl.constexpr, BLOCK: tl.constexpr):
    """The scales of a block's rows, from a tensor's row of block scales at ptr."""
    if mask is None:
        return tl.load(ptr + _rows(idx, QB, BLOCK))
    else:
        return tl.load(ptr + _rows(idx, QB, BLOCK), mask=_row_mask(mask, QB, BLOCK),
                       other=0.0)


@triton.jit
def _times_scales(v, ptr, idx, mask, QB: tl.constexpr, BLOCK: tl.constexpr):
    """v (fp32, a block) times its rows' scales at ptr: what quantized codes hold."""
    R: tl.constexpr = BLOCK // QB
    scaled = tl.reshape(v, (R, QB)) * _scales_ld(ptr, idx, mask, QB, BLOCK)[:, None]
    return tl.reshape(scaled, (BLOCK,))


@triton.jit
def _scales_st(ptr, idx, mask, scale, QB: tl.constexpr, BLOCK: tl.constexpr):
    if mask is None:
        tl.store(ptr + _rows(idx, QB, BLOCK), scale)
    else:
        tl.store(ptr + _rows(idx, QB, BLOCK), scale, mask=_row_mask(mask, QB, BLOCK))


@triton.jit
def _as_rows(x, mask, QB: tl.constexpr, BLOCK: tl.constexpr):
    """A block's new values as rows (_rows), zeros outside the mask: zeros change neither
    a row's absmax nor its finiteness."""
    x = tl.reshape(x, (BLOCK // QB, QB))
    if mask is not None:
        x = tl.where(tl.reshape(mask, (BLOCK // QB, QB)), x, 0.0)
    return x


@triton.jit
def _block_scale(x, mag, qmax):
    """Per row of x ([rows, QB], zeros outside the tensor): max(mag) / qmax, NaN where the
    row holds a NaN or an infinity (cm_fused/quantize.py, both codes)."""
    bad = tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1) > 0
    return tl.where(bad, float("nan"), tl.div_rn(tl.max(mag, axis=1), qmax))


@triton.jit
def _slot_read(idx, mask, slot_ptr, q_ptr, B_DT: tl.constexpr, S_DT: tl.constexpr,
               QB: tl.constexpr, BLOCK: tl.constexpr):
    """A slot's values as the running sum S saw them when they went in (int8 slots:
    dequantized with their blocks' scales at q_ptr)."""
    if B_DT == tl.int8:
        old = _times_scales(_ld(slot_ptr + idx, mask).to(tl.float32), q_ptr, idx, mask, QB,
                            BLOCK)
    else:
        old = _ld(slot_ptr + idx, mask).to(S_DT).to(tl.float32)
    return old


@triton.jit
def _slot_code(new, mask, B_DT: tl.constexpr, S_DT: tl.constexpr, QB: tl.constexpr,
               BLOCK: tl.constexpr):
    """What a slot stores for ``new``: (its code in B_DT, the scale of each block of QB
    elements (int8 slots; cm_fused/quantize.py, the same operations in the same order),
    the value S adds). Float slots: new rounded to B_DT, and no scales."""
    if B_DT == tl.int8:
        x = _as_rows(new, mask, QB, BLOCK)
        scale = _block_scale(x, tl.abs(x), 127.0)
        ok = scale > 0.0  # False for NaN: the block stores zeros
        r = _round_half_even(tl.div_rn(x, scale[:, None]))
        r = tl.where(ok[:, None], tl.minimum(tl.maximum(r, -127.0), 127.0), 0.0)
        code = tl.reshape(r, (BLOCK,))
        value = tl.reshape(r * scale[:, None], (BLOCK,))
    else:
        code = _narrow(new, B_DT)
        scale = tl.zeros([1], dtype=tl.float32)
        value = code.to(S_DT).to(tl.float32)
    return code, scale, value


@triton.jit
def _no_slot_code(B_DT: tl.constexpr, QB: tl.constexpr, BLOCK: tl.constexpr):
    """_slot_code's types, for an insert that may not happen."""
    value = tl.zeros([BLOCK], dtype=tl.float32)
    if B_DT == tl.int8:
        return value, tl.zeros([BLOCK // QB], dtype=tl.float32), value
    else:
        return value.to(B_DT), tl.zeros([1], dtype=tl.float32), value


@triton.jit
def _slot_write(idx, mask, code, scale, slot_ptr, q_ptr, B_DT: tl.constexpr,
                QB: tl.constexpr, BLOCK: tl.constexpr):
    if B_DT == tl.int8:
        _st(slot_ptr + idx, code.to(tl.int8), mask)
        _scales_st(q_ptr, idx, mask, scale, QB, BLOCK)
    else:
        _st(slot_ptr + idx, code, mask)


@triton.jit
def _slot_sum(idx, mask, b_ptr, q_base, C, numel, n_blocks, QB: tl.constexpr,
              BLOCK: tl.constexpr):
    """What the C int8 slots hold, summed slot 0 first, ((B[0] + B[1]) + B[2]) + ...: the
    buffer's sum where no running sum is kept (docs/SPEC.md "Slots without a running
    sum"). Unfilled slots hold zeros (scale 0)."""
    held = _slot_read(idx, mask, b_ptr, q_base, tl.int8, tl.float32, QB, BLOCK)
    for j in range(1, C):
        held += _slot_read(idx, mask, b_ptr + j * numel, q_base + j * n_blocks, tl.int8,
                           tl.float32, QB, BLOCK)
    return held


@triton.jit
def _moment_load(ptr, scale_ptr, idx, mask, DT: tl.constexpr, SECOND: tl.constexpr,
                 QB: tl.constexpr, BLOCK: tl.constexpr):
    """A moment as fp32: widened from DT, or (DT uint8: 8-bit moments) the values its
    e4m3 codes hold with their blocks' scales at scale_ptr (quantize.dequantize_moment):
    the momentum +-D(code & 0x7F) * scale, the second moment (D(code) * scale)^2."""
    if DT == tl.uint8:
        c = _ld(ptr + idx, mask).to(tl.int32)
        e = c & 0x7F  # (a second moment's codes have no sign bit)
        d = tl.where(e < 8, e.to(tl.float32) * 0.001953125,  # 2^-9: the subnormals
                     ((e + 960) << 20).to(tl.float32, bitcast=True))
        t = _times_scales(d, scale_ptr, idx, mask, QB, BLOCK)
        if SECOND:
            return t * t
        else:
            return tl.where((c & 0x80) != 0, -t, t)
    else:
        return _ld(ptr + idx, mask).to(tl.float32)


@triton.jit
def _moment_store(ptr, scale_ptr, idx, mask, x, DT: tl.constexpr, SECOND: tl.constexpr,
                  QB: tl.constexpr, BLOCK: tl.constexpr):
    """Store a moment's new fp32 values x: rounded to DT, or (uint8) as e4m3 codes per
    block of QB elements with their scales (quantize.quantize_moment, the same operations
    in the same order: the momentum by |x| and its sign, the second moment by its
    correctly rounded root, raised to code 1 where that is > 0)."""
    if DT == tl.uint8:
        x = _as_rows(x, mask, QB, BLOCK)
        if SECOND:
            mag = tl.sqrt_rn(x)
        else:
            mag = tl.abs(x)
        scale = _block_scale(x, mag, 448.0)
        # (where scale is 0 or NaN, y is not finite: those blocks store code 0 below)
        y = tl.minimum(tl.div_rn(mag, scale[:, None]), 448.0)
        b = y.to(tl.int32, bitcast=True)
        normal = ((b + 0x7FFFF + ((b >> 20) & 1)) >> 20) - 960  # 3 mantissa bits, ties even
        sub = _round_half_even(y * 512.0).to(tl.int32)
        c = tl.where(y < 0.015625, sub, normal)  # below 2^-6: e4m3's subnormals
        if SECOND:  # a positive second moment never reads as 0 (the update divides by it)
            c = tl.where((c == 0) & (mag > 0.0), 1, c)
        else:
            c = tl.where((x < 0.0) & (c != 0), c | 0x80, c)
        c = tl.where((scale > 0.0)[:, None], c, 0)
        _st(ptr + idx, tl.reshape(c, (BLOCK,)).to(tl.uint8), mask)
        _scales_st(scale_ptr, idx, mask, scale, QB, BLOCK)
    else:
        _st(ptr + idx, _narrow(x, DT), mask)


@triton.jit
def _update_block(idx, mask, p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, slot_ptr, q_ptr, s_ptr,
                  mq_ptr, vq_ptr, b_ptr, q_base, C, numel, n_blocks,
                  replace, first, k_before, scale, lr, beta1, one_minus_beta1, beta2,
                  one_minus_beta2, eps, weight_decay, decay_factor, one_minus_dampening,
                  step_size, sqrt_bc2, flush, fslot_ptr, fq_ptr, rkey, roffset,
                  VARIANT: tl.constexpr, P_DT: tl.constexpr, M_DT: tl.constexpr,
                  V_DT: tl.constexpr, X_DT: tl.constexpr, B_DT: tl.constexpr,
                  S_DT: tl.constexpr, HAS_S: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_MOM: tl.constexpr, HAS_X: tl.constexpr, MAXIMIZE: tl.constexpr,
                  DEFER: tl.constexpr, ROUNDING: tl.constexpr, QB: tl.constexpr,
                  BLOCK: tl.constexpr):
    """One block of the update of variant VARIANT: the direction u and the value
    inserted (what the variants differ in), the insert (shared), the base rule. DEFER
    (ADAM_CM): first the insert an earlier step left pending (``flush``: the momentum as
    stored goes into the slot at fslot_ptr), which this step's mean then includes. (Its
    slot is never the one this step reads as ``old``: a tensor's first step, the only
    insert of a DEFER update pass, has none pending, since the decide kernel leaves one
    pending only from a step that found the buffer non-empty, and checkpoint.py refuses a
    state that says otherwise.) Returns the unscaled gradient (the sum of squares of a
    single-pass step). Moments of dtype uint8 are 8-bit codes, their block scales at
    mq_ptr and vq_ptr; without HAS_S no running sum is kept and the mean reads the sum of
    the C int8 slots at b_ptr (their scales at q_base).

    Every load of the block comes before its first store: the compiler may not move a
    load above a store through pointers it cannot tell apart, and a load issued after
    a store waits on memory a second time (tests/compile_gate.py counts them: none)."""
    USES_M: tl.constexpr = (VARIANT == ADAM_CM) | (VARIANT == ADAM_CG) | HAS_MOM
    USES_V: tl.constexpr = (VARIANT != SGD_CG)
    g = _ld(g_ptr + idx, mask).to(tl.float32)
    x = _ld(p_ptr + idx, mask).to(tl.float32)
    if HAS_S:
        S = _ld(s_ptr + idx, mask).to(tl.float32)
    else:
        S = _slot_sum(idx, mask, b_ptr, q_base, C, numel, n_blocks, QB, BLOCK)
    if USES_M:
        m_old = _moment_load(m_ptr, mq_ptr, idx, mask, M_DT, False, QB, BLOCK)
    else:
        m_old = g
    if USES_V:
        v_old = _moment_load(v_ptr, vq_ptr, idx, mask, V_DT, True, QB, BLOCK)
    else:
        v_old = g
    if HAS_X:  # amsgrad's running max, centered RMSprop's gradient average
        e_old = _ld(x_ptr + idx, mask).to(tl.float32)
    else:
        e_old = g
    # A kept slot is neither read nor written.
    old = tl.zeros([BLOCK], dtype=tl.float32)
    if replace:
        old = _slot_read(idx, mask, slot_ptr, q_ptr, B_DT, S_DT, QB, BLOCK)
    if DEFER:
        # The pending insert in the same block, not in a pass of its own over the chunk:
        # the S it makes is the S the mean reads, with no second trip to memory.
        f_code, f_scale, f_value = _no_slot_code(B_DT, QB, BLOCK)
        if flush:
            f_old = _slot_read(idx, mask, fslot_ptr, fq_ptr, B_DT, S_DT, QB, BLOCK)
            f_code, f_scale, f_value = _slot_code(m_old, mask, B_DT, S_DT, QB, BLOCK)
            S = (S - f_old) + f_value

    if HAS_SCALE:
        g = tl.div_rn(g, scale)
    unscaled = g
    if MAXIMIZE:
        g = -g
    mean = tl.div_rn(S, k_before)  # the buffer as it was before this step's insert

    if VARIANT == ADAM_CM:
        x = x * decay_factor  # decoupled weight decay (AdamW)
        m_new = tl.where(first, 0.0, _lerp(m_old, g, one_minus_beta1))
        u = tl.where(first, 0.0, m_new + mean)  # the aggregate
        new = tl.where(first, g, m_new)  # SPEC quirk: the first slot is the raw gradient
    elif VARIANT == SGD_CG:
        g = tl.where(weight_decay != 0.0, g + weight_decay * x, g)  # stored with wd (quirk)
        u = tl.where(first, g, g + mean)
        new = g
        m_new = u  # not used
    else:  # ADAM_CG, RMSPROP_CG
        if VARIANT == RMSPROP_CG:
            u = tl.where(first, g, mean)  # the buffer mean alone (quirk)
        else:
            u = tl.where(first, g, g + mean)
        u = tl.where(weight_decay != 0.0, u + weight_decay * x, u)  # coupled, after
        new = g
        m_new = u  # not used

    if VARIANT == SGD_CG:
        if HAS_MOM:  # the first momentum step copies d
            u = tl.where(first, u, m_old * beta1 + one_minus_dampening * u)
            m_store = u
        p_new = x - lr * u
    elif VARIANT == RMSPROP_CG:
        sq = v_old * beta2 + (one_minus_beta2 * u) * u
        if HAS_X:  # centered
            ga = _lerp(e_old, u, one_minus_beta2)
            avg = tl.sqrt_rn(sq - ga * ga) + eps
        else:
            avg = tl.sqrt_rn(sq) + eps
        if HAS_MOM:
            m_store = m_old * beta1 + tl.div_rn(u, avg)
            p_new = x - lr * m_store
        else:
            p_new = x - lr * tl.div_rn(u, avg)
    else:  # Adam: CM's v tracks the aggregate, CG's the aggregated gradient
        if VARIANT == ADAM_CG:
            m_new = _lerp(m_old, u, one_minus_beta1)
            num = m_new
        else:
            num = u
        sq = v_old * beta2 + (one_minus_beta2 * u) * u
        v_new = sq
        if HAS_X:  # amsgrad
            v_new = tl.maximum(e_old, sq, propagate_nan=tl.PropagateNan.ALL)
        m_store = m_new
        denom = tl.div_rn(tl.sqrt_rn(v_new), sqrt_bc2) + eps
        p_new = x - tl.div_rn(step_size * num, denom)
        if VARIANT == ADAM_CM:
            # SPEC: no Adam update on CM's first step (with eps == 0 it would be 0/0)
            p_new = tl.where(first, x, p_new)

    # Stores, after every load.
    if DEFER:
        if flush:
            _slot_write(idx, mask, f_code, f_scale, fslot_ptr, fq_ptr, B_DT, QB, BLOCK)
    if replace:
        code, q_scale, value = _slot_code(new, mask, B_DT, S_DT, QB, BLOCK)
        _slot_write(idx, mask, code, q_scale, slot_ptr, q_ptr, B_DT, QB, BLOCK)
        if HAS_S:
            _st(s_ptr + idx, _narrow((S - old) + value, S_DT), mask)
    else:
        if DEFER:
            if flush:
                _st(s_ptr + idx, _narrow(S, S_DT), mask)
    if USES_M:
        _moment_store(m_ptr, mq_ptr, idx, mask, m_store, M_DT, False, QB, BLOCK)
    if USES_V:
        _moment_store(v_ptr, vq_ptr, idx, mask, sq, V_DT, True, QB, BLOCK)
    if HAS_X:
        if VARIANT == RMSPROP_CG:
            _st(x_ptr + idx, _narrow(ga, X_DT), mask)
        else:
            _st(x_ptr + idx, _narrow(v_new, X_DT), mask)
    _st(p_ptr + idx, _param_code(p_new, idx, rkey, roffset, P_DT, ROUNDING), mask)
    return unscaled


@triton.jit
def _lr_and_decay(lr_ptr, lr_hi, lr_lo, wd_factor, weight_decay, LR_IS_PTR: tl.constexpr):
    """(lr in fp32, lr in fp64, 1 - lr * wd). With a float lr, 1 - lr * wd comes from the
    host (computed in fp64 as the reference does); with a tensor lr (read here, so that
    a captured CUDA graph sees a scheduler's changes), in fp32 as torch does."""
    if LR_IS_PTR:
        lr_t = tl.load(lr_ptr)
        lr64 = lr_t.to(tl.float64)
        lr = lr_t.to(tl.float32)
        decay_factor = tl.where(weight_decay != 0.0, 1.0 - lr * weight_decay, 1.0)
    else:
        lr64 = _f64(lr_hi, lr_lo)
        lr = tl.cast(lr_hi, tl.float32)  # the host rounded lr to fp32 (RNE) for this half
        decay_factor = tl.cast(wd_factor, tl.float32)
    return lr, lr64, decay_factor


@triton.jit(do_not_specialize=["n_tab", "chunk_len", "T", "C"])
def _update_kernel(tab_ptr, n_tab, chunk_t_ptr, chunk_s_ptr, dec_i_ptr, dec_f_ptr,
                   lr_hi, lr_lo, wd_factor, lr_ptr, scale_ptr, found_inf_ptr, chunk_len, C,
                   beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                   one_minus_dampening, gtab_ptr, T, partial_ptr, beta1_hi, beta1_lo,
                   beta2_hi, beta2_lo, rounding_ptr, VARIANT: tl.constexpr,
                   P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr,
                   V_DT: tl.constexpr, X_DT: tl.constexpr, B_DT: tl.constexpr,
                   S_DT: tl.constexpr, HAS_S: tl.constexpr, LR_IS_PTR: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                   HAS_MOM: tl.constexpr, HAS_X: tl.constexpr, MAXIMIZE: tl.constexpr,
                   ALIGNED: tl.constexpr, DEFER: tl.constexpr, ROUNDING: tl.constexpr,
                   QB: tl.constexpr, BLOCK: tl.constexpr):
    """The update pass (see the module docstring). DEFER (ADAM_CM, a single-pass step):
    the decisions come after this pass, so it reads what it needs from the state (the
    fill count, the step count; on a tensor's first step slot 0 is filled here, that
    much is decided), writes the insert an earlier step left pending first, and sums the
    unscaled gradient's squares per chunk into partial_ptr, as _norm_kernel would.
    ROUNDING: bf16/fp16 params are rounded stochastically, with their tensor's row of
    rounding_ptr (StepArgs.rounding; never with DEFER, whose params are fp32).
    8-bit moments (M_DT or V_DT uint8) and no running sum (HAS_S False: C slots summed)
    never DEFER: the value inserted is the momentum before it is quantized."""
    tl.static_assert(not (ROUNDING and DEFER))  # (_rounding_key reads the step decided)
    tl.static_assert(not (DEFER and (M_DT == tl.uint8 or not HAS_S)))
    beta1 = tl.cast(beta1, tl.float32)
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    one_minus_dampening = tl.cast(one_minus_dampening, tl.float32)
    lr, lr64, decay_factor = _lr_and_decay(lr_ptr, lr_hi, lr_lo, wd_factor, weight_decay,
                                           LR_IS_PTR)

    t, start, numel, gi = _chunk(tab_ptr, n_tab, chunk_t_ptr, chunk_s_ptr)
    p_ptr = tl.load(tab_ptr + ROW_P * n_tab + t).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(tab_ptr + ROW_G * n_tab + t).to(tl.pointer_type(G_DT))
    b_ptr = tl.load(tab_ptr + ROW_B * n_tab + t).to(tl.pointer_type(B_DT))
    s_ptr = tl.load(tab_ptr + ROW_S * n_tab + t).to(tl.pointer_type(S_DT))
    # An unused role's pointer is 0 in the table and never dereferenced.
    m_ptr = tl.load(tab_ptr + ROW_M * n_tab + t).to(tl.pointer_type(M_DT))
    v_ptr = tl.load(tab_ptr + ROW_V * n_tab + t).to(tl.pointer_type(V_DT))
    x_ptr = tl.load(tab_ptr + ROW_X * n_tab + t).to(tl.pointer_type(X_DT))

    q_base = tl.load(tab_ptr + ROW_Q * n_tab + t).to(tl.pointer_type(tl.float32))
    n_blocks = (numel + QB - 1) // QB
    # 8-bit moments: row 0 the momentum's scales, row 1 the second moment's
    mq_ptr = tl.load(tab_ptr + ROW_MS * n_tab + t).to(tl.pointer_type(tl.float32))
    vq_ptr = mq_ptr + n_blocks
    if DEFER:
        count = tl.load(tl.load(gtab_ptr + ROW_COUNT * T + gi).to(tl.pointer_type(tl.int64)))
        pending = tl.load(tl.load(gtab_ptr + ROW_PEND * T + gi).to(tl.pointer_type(tl.int64)))
        step = tl.load(tl.load(gtab_ptr + ROW_STEP * T + gi).to(tl.pointer_type(tl.float32)))
        j = tl.zeros_like(count)  # (a first step fills slot 0)
        first = count == 0
        replace = first
        k_before = tl.maximum(count, 1).to(tl.float32)
        e = (tl.zeros([1], dtype=tl.float32) + step + 1.0).to(tl.int64)
        bc1 = tl.sum(1.0 - _pow64(_f64(beta1_hi, beta1_lo), e), axis=0)
        bc2 = tl.sum(1.0 - _pow64(_f64(beta2_hi, beta2_lo), e), axis=0)
        sqrt_bc2 = tl.sqrt(bc2).to(tl.float32)  # (the decide kernel's rounding)
        flush = pending >= 0
        fslot_ptr = b_ptr + tl.maximum(pending, 0) * numel
        fq_ptr = q_base + tl.maximum(pending, 0) * n_blocks
    else:
        j = tl.load(dec_i_ptr + 2 * gi).to(tl.int64)
        flags = tl.load(dec_i_ptr + 2 * gi + 1)
        replace = (flags & FLAG_REPLACE) != 0
        first = (flags & FLAG_FIRST) != 0
        k_before = tl.load(dec_f_ptr + 3 * gi).to(tl.float32)
        bc1 = tl.load(dec_f_ptr + 3 * gi + 1)
        sqrt_bc2 = tl.load(dec_f_ptr + 3 * gi + 2).to(tl.float32)
        flush = False
        fslot_ptr = b_ptr
        fq_ptr = q_base
    slot_ptr = b_ptr + j * numel
    # int8 slots: the scales of slot j (QB divides BLOCK and chunks start at multiples of
    # BLOCK, so a program's blocks of QB elements are whole blocks of the slot).
    q_ptr = q_base + j * n_blocks
    if ALIGNED:
        # The host checked: every pointer of the bucket 16-byte aligned, and every
        # numel * slot size a multiple of 16 bytes (so is each slot). Chunks start at
        # multiples of BLOCK. Full blocks then load and store in 16-byte vectors.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        x_ptr = tl.multiple_of(x_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
        slot_ptr = tl.multiple_of(slot_ptr, 16)
        fslot_ptr = tl.multiple_of(fslot_ptr, 16)
        start = tl.multiple_of(start, BLOCK)

    rkey, roffset = _rounding_key(rounding_ptr, gtab_ptr, T, gi, ROUNDING)
    step_size = (lr64 / bc1).to(tl.float32)  # lr / bc1 in fp64, as the reference
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = 1.0

    end = tl.minimum(start + chunk_len, numel)
    if HAS_FOUND_INF:
        # A skipped step changes nothing: the loops below run zero times.
        end = tl.where(tl.load(found_inf_ptr).to(tl.float32) == 0.0, end, start)
    full_end = start + ((end - start) // BLOCK) * BLOCK

    acc = tl.zeros([BLOCK], dtype=tl.float32)  # DEFER: as _norm_kernel sums
    for off in range(start, full_end, BLOCK):  # full blocks: no mask
        g = _update_block(off + tl.arange(0, BLOCK), None, p_ptr, g_ptr, m_ptr, v_ptr,
                          x_ptr, slot_ptr, q_ptr, s_ptr, mq_ptr, vq_ptr, b_ptr, q_base, C,
                          numel, n_blocks, replace, first, k_before, scale, lr,
                          beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                          decay_factor, one_minus_dampening, step_size, sqrt_bc2, flush,
                          fslot_ptr, fq_ptr, rkey, roffset, VARIANT, P_DT, M_DT, V_DT, X_DT,
                          B_DT, S_DT, HAS_S, HAS_SCALE, HAS_MOM, HAS_X, MAXIMIZE, DEFER,
                          ROUNDING, QB, BLOCK)
        if DEFER:
            acc += g * g
    for off in range(full_end, end, BLOCK):  # the tensor's last, short block (0 or 1)
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        g = _update_block(idx, mask, p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, slot_ptr, q_ptr,
                          s_ptr, mq_ptr, vq_ptr, b_ptr, q_base, C, numel, n_blocks, replace,
                          first, k_before, scale, lr, beta1, one_minus_beta1,
                          beta2, one_minus_beta2, eps, weight_decay, decay_factor,
                          one_minus_dampening, step_size, sqrt_bc2, flush, fslot_ptr,
                          fq_ptr, rkey, roffset, VARIANT, P_DT, M_DT, V_DT, X_DT, B_DT, S_DT,
                          HAS_S, HAS_SCALE, HAS_MOM, HAS_X, MAXIMIZE, DEFER, ROUNDING, QB,
                          BLOCK)
        if DEFER:
            acc += tl.where(mask, g * g, 0.0)
    if DEFER:
        tl.store(partial_ptr + tl.program_id(0).to(tl.int64), tl.sum(acc, axis=0))
