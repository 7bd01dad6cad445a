"""Triton kernels of the adaptive-memory variants (ADAM_AM, SGD_AM; docs/SPEC.md).

The same three parts as the buffered variants, on the same tables (launch.py):

1. ``_am_kernel`` with ``REDUCE`` (one launch per dtype bucket, one program per chunk):
   the chunk's partial inner products, ``NS`` of them ([chunk, NS]): AdamAM's
   D, M, X, Y; SGDAM's D, N. Then kernels._reduce_kernel sums them per tensor.
2. ``_am_decide_kernel``: beta. AdamAM: one per tensor (a block of tensors per
   program); SGDAM: one for the whole optimizer (one program: the group's sums added in
   tensor order, then, unless this is only the REDUCE phase of a split step, beta).
   Writes the step counts and ``memory``, and per tensor the decision for the update.
3. ``_am_kernel`` without ``REDUCE``: the update, one pass.

Both passes compute an element's terms with the same code (``_am_block``), so the
update sees bit for bit the P and g the reduce pass summed over.

Memory traffic per element and step, fp32: AdamAM reads g, d, v, p twice and writes
d, v, p once: 44 B (AdamW: 28 B); SGDAM reads g, d (and p, with weight decay) in the
reduce pass and g, d, p in the update, and writes d, p: 28 B (32 B with weight decay;
torch's SGD with momentum: 20 B).

8-bit moments (d, v uint8 codes, StepArgs.moment_scales): both passes read the values
the codes hold (kernels._moment_load), the update writes the new ones as codes per block
of QB elements (kernels._moment_store), as the critical-buffer variants do; fp32 params:
AdamAM 26 B per element, SGDAM 19 B (23 B with weight decay), and the scales' 4/256 B.
"""
import triton
import triton.language as tl

from .kernels import (ADAM_AM, FLAG_FIRST, ROW_G, ROW_M, ROW_MEM, ROW_MS, ROW_P, ROW_STEP,
                      ROW_V, SGD_AM, _chunk, _f64, _ld, _lr_and_decay, _moment_load,
                      _moment_store, _param_code, _pow64, _rounding_key, _st)

TINY = tl.constexpr(1.1754943508222875e-38)  # fp32's smallest normal: the floor of c
PHASE_ALL, PHASE_REDUCE, PHASE_UPDATE = (tl.constexpr(i) for i in range(3))


@triton.jit
def _adam_am_scalars(step, prod, beta1, beta2_hi, beta2_lo):
    """Per tensor: c = max(1 - beta1max * prod, tiny) and 1/sqrt(1 - beta2^(step + 1))
    (fp64, rounded to fp32), from the state before this step."""
    c = tl.maximum(1.0 - beta1 * prod, TINY)
    bc2 = 1.0 - _pow64(_f64(beta2_hi, beta2_lo), (step + 1.0).to(tl.int64))
    return c, (1.0 / tl.sqrt(bc2)).to(tl.float32)


@triton.jit
def _am_block(idx, mask, p_ptr, g_ptr, d_ptr, v_ptr, dq_ptr, vq_ptr, scale, first, c,
              inv_sqrt_bc2, beta, coef_d, coef_g, lr, decay_factor, beta2, one_minus_beta2,
              eps, weight_decay, lam, rkey, roffset, VARIANT: tl.constexpr,
              P_DT: tl.constexpr, M_DT: tl.constexpr, V_DT: tl.constexpr,
              HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, REDUCE: tl.constexpr,
              ROUNDING: tl.constexpr, QB: tl.constexpr, BLOCK: tl.constexpr):
    """One block: REDUCE returns the NS terms (0 outside the mask); else stores the
    update. d and v of dtype uint8 are 8-bit codes (their block scales at dq_ptr and
    vq_ptr): both passes read the values they hold, so the update sees the d and v the
    sums were taken over; the update writes its new ones back as codes."""
    g = _ld(g_ptr + idx, mask).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, scale)
    if MAXIMIZE:
        g = -g
    x = _ld(p_ptr + idx, mask).to(tl.float32)
    d = _moment_load(d_ptr, dq_ptr, idx, mask, M_DT, False, QB, BLOCK)
    if VARIANT == ADAM_AM:
        v_new = (_moment_load(v_ptr, vq_ptr, idx, mask, V_DT, True, QB, BLOCK) * beta2
                 + (one_minus_beta2 * g) * g)
        # reference.adam_am_planes: 1/P = R*W and 1/R = P*W, one division per element
        P = c * (tl.sqrt_rn(v_new) * inv_sqrt_bc2 + eps)
        R = 1.0 + lam * P
        w = tl.div_rn(1.0, P * R)
        if REDUCE:
            delta = d - g
            y = d * (R * w)
            y = tl.where(weight_decay != 0.0, y + weight_decay * x, y)
            t0 = delta * delta * w
            t1 = delta * (g + lam * P * d) * w
            t2 = x * delta
            t3 = g * y
            if mask is not None:
                t0 = tl.where(mask, t0, 0.0)
                t1 = tl.where(mask, t1, 0.0)
                t2 = tl.where(mask, t2, 0.0)
                t3 = tl.where(mask, t3, 0.0)
            return t0, t1, t2, t3
        else:
            d_new = ((1.0 - beta) * g + (lam * P + beta) * d) * (P * w)
            _moment_store(d_ptr, dq_ptr, idx, mask, d_new, M_DT, False, QB, BLOCK)
            _moment_store(v_ptr, vq_ptr, idx, mask, v_new, V_DT, True, QB, BLOCK)
            x_new = x * decay_factor - (lr * d_new) * (R * w)
            _st(p_ptr + idx, _param_code(x_new, idx, rkey, roffset, P_DT, ROUNDING), mask)
            return g, g, g, g  # not used
    else:  # SGD_AM
        g = tl.where(weight_decay != 0.0, g + weight_decay * x, g)  # coupled L2
        if REDUCE:
            delta = d - g
            t0 = delta * delta
            t1 = (1.0 + lam) * g * d - delta * (g + lam * d)
            if mask is not None:
                t0 = tl.where(mask, t0, 0.0)
                t1 = tl.where(mask, t1, 0.0)
            return t0, t1, t0, t0
        else:
            d_new = tl.where(first, g, coef_d * d + coef_g * g)
            _moment_store(d_ptr, dq_ptr, idx, mask, d_new, M_DT, False, QB, BLOCK)
            _st(p_ptr + idx, _param_code(x - lr * d_new, idx, rkey, roffset, P_DT, ROUNDING),
                mask)
            return g, g, g, g  # not used


@triton.jit(do_not_specialize=["n_tab", "T", "chunk_len"])
def _am_kernel(tab_ptr, n_tab, chunk_t_ptr, chunk_s_ptr, gtab_ptr, T, partial_ptr,
               dec_i_ptr, dec_f_ptr, lr_hi, wd_factor, lr_ptr, scale_ptr, found_inf_ptr,
               chunk_len, beta1, beta2_hi, beta2_lo, beta2, one_minus_beta2, eps,
               weight_decay, lam, one_plus_lam, rounding_ptr, VARIANT: tl.constexpr,
               P_DT: tl.constexpr, G_DT: tl.constexpr, M_DT: tl.constexpr,
               V_DT: tl.constexpr, LR_IS_PTR: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_FOUND_INF: tl.constexpr, MAXIMIZE: tl.constexpr, REDUCE: tl.constexpr,
               NS: tl.constexpr, ALIGNED: tl.constexpr, ROUNDING: tl.constexpr,
               QB: tl.constexpr, BLOCK: tl.constexpr):
    """REDUCE: the chunk's partial sums; else the update (ROUNDING: bf16/fp16 params
    rounded stochastically with their tensor's row of rounding_ptr, StepArgs.rounding).
    M_DT, V_DT uint8: 8-bit moments (QB elements per scale; BLOCK a multiple of QB and
    chunks start at multiples of BLOCK, so a block's scales are its own).
    """
    tl.static_assert(not (ROUNDING and REDUCE))  # (_rounding_key reads the step decided)
    beta1 = tl.cast(beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    lam = tl.cast(lam, tl.float32)
    lr, _, decay_factor = _lr_and_decay(lr_ptr, lr_hi, lr_hi, wd_factor, weight_decay,
                                        LR_IS_PTR)

    pid = tl.program_id(0).to(tl.int64)
    t, start, numel, gi = _chunk(tab_ptr, n_tab, chunk_t_ptr, chunk_s_ptr)
    p_ptr = tl.load(tab_ptr + ROW_P * n_tab + t).to(tl.pointer_type(P_DT))
    g_ptr = tl.load(tab_ptr + ROW_G * n_tab + t).to(tl.pointer_type(G_DT))
    d_ptr = tl.load(tab_ptr + ROW_M * n_tab + t).to(tl.pointer_type(M_DT))
    v_ptr = tl.load(tab_ptr + ROW_V * n_tab + t).to(tl.pointer_type(V_DT))  # 0: SGD_AM
    # 8-bit moments: row 0 d's scales, row 1 v's (0 where the moments are not codes)
    dq_ptr = tl.load(tab_ptr + ROW_MS * n_tab + t).to(tl.pointer_type(tl.float32))
    vq_ptr = dq_ptr + (numel + QB - 1) // QB
    if ALIGNED:  # see kernels._update_kernel
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        d_ptr = tl.multiple_of(d_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        start = tl.multiple_of(start, BLOCK)

    if REDUCE:  # the per-tensor scalars from the state, as the decide computes them
        step = tl.load(tl.load(gtab_ptr + ROW_STEP * T + gi).to(tl.pointer_type(tl.float32)))
        first = step == 0.0
        if VARIANT == ADAM_AM:
            mem = tl.load(gtab_ptr + ROW_MEM * T + gi).to(tl.pointer_type(tl.float32))
            c, inv_sqrt_bc2 = _adam_am_scalars(tl.full([1], 0.0, tl.float32) + step,
                                           tl.load(mem), beta1, beta2_hi, beta2_lo)
        else:
            c = 1.0
            inv_sqrt_bc2 = 1.0
        beta = 0.0
    else:  # the decision
        first = (tl.load(dec_i_ptr + 2 * gi + 1) & FLAG_FIRST) != 0
        beta = tl.load(dec_f_ptr + 3 * gi).to(tl.float32)
        c = tl.load(dec_f_ptr + 3 * gi + 1).to(tl.float32)
        inv_sqrt_bc2 = tl.load(dec_f_ptr + 3 * gi + 2).to(tl.float32)
    rkey, roffset = _rounding_key(rounding_ptr, gtab_ptr, T, gi, ROUNDING)
    coef_d = tl.div_rn(beta + lam, tl.cast(one_plus_lam, tl.float32))
    coef_g = tl.div_rn(1.0 - beta, tl.cast(one_plus_lam, tl.float32))
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    else:
        scale = 1.0

    end = tl.minimum(start + chunk_len, numel)
    if HAS_FOUND_INF and not REDUCE:  # a skipped step changes nothing
        end = tl.where(tl.load(found_inf_ptr).to(tl.float32) == 0.0, end, start)
    full_end = start + ((end - start) // BLOCK) * BLOCK
    a0 = tl.zeros([BLOCK], dtype=tl.float32)
    a1 = tl.zeros([BLOCK], dtype=tl.float32)
    a2 = tl.zeros([BLOCK], dtype=tl.float32)
    a3 = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, full_end, BLOCK):  # full blocks: no mask
        t0, t1, t2, t3 = _am_block(
            off + tl.arange(0, BLOCK), None, p_ptr, g_ptr, d_ptr, v_ptr, dq_ptr, vq_ptr, scale,
            first, c, inv_sqrt_bc2, beta, coef_d, coef_g, lr, decay_factor, beta2,
            one_minus_beta2, eps, weight_decay, lam, rkey, roffset, VARIANT, P_DT, M_DT, V_DT,
            HAS_SCALE, MAXIMIZE, REDUCE, ROUNDING, QB, BLOCK)
        if REDUCE:
            a0 += t0
            a1 += t1
            a2 += t2
            a3 += t3
    for off in range(full_end, end, BLOCK):  # the tensor's last, short block (0 or 1)
        idx = off + tl.arange(0, BLOCK)
        t0, t1, t2, t3 = _am_block(
            idx, idx < end, p_ptr, g_ptr, d_ptr, v_ptr, dq_ptr, vq_ptr, scale, first, c,
            inv_sqrt_bc2, beta, coef_d, coef_g, lr, decay_factor, beta2, one_minus_beta2, eps,
            weight_decay, lam, rkey, roffset, VARIANT, P_DT, M_DT, V_DT, HAS_SCALE, MAXIMIZE,
            REDUCE, ROUNDING, QB, BLOCK)
        if REDUCE:
            a0 += t0
            a1 += t1
            a2 += t2
            a3 += t3
    if REDUCE:
        tl.store(partial_ptr + pid * NS, tl.sum(a0, axis=0))
        tl.store(partial_ptr + pid * NS + 1, tl.sum(a1, axis=0))
        if NS == 4:
            tl.store(partial_ptr + pid * NS + 2, tl.sum(a2, axis=0))
            tl.store(partial_ptr + pid * NS + 3, tl.sum(a3, axis=0))


@triton.jit
def _clip_ratio(num, den, beta_max):
    """min(num/den, beta_max) where den > 0 and the ratio > 0 (not NaN), else 0: fp64 in,
    fp32 out (reference._clip_ratio)."""
    r = num / den
    ok = (den > 0.0) & (r > 0.0)
    return tl.where(ok, tl.minimum(r, beta_max), 0.0).to(tl.float32)


@triton.jit(do_not_specialize=["T"])
def _am_decide_kernel(gtab_ptr, T, sums_ptr, totals_ptr, found_inf_ptr, dec_i_ptr,
                      dec_f_ptr, lr_hi, lr_lo, lr_ptr, beta1_hi, beta1_lo, beta2_hi,
                      beta2_lo, wd_hi, wd_lo, VARIANT: tl.constexpr, PHASE: tl.constexpr,
                      LR_IS_PTR: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                      TB: tl.constexpr):
    beta_max = _f64(beta1_hi, beta1_lo)
    beta1 = tl.cast(beta1_hi, tl.float32)
    wd = _f64(wd_hi, wd_lo)
    if LR_IS_PTR:
        lr32 = tl.load(lr_ptr).to(tl.float32)
        eta = lr32.to(tl.float64)
    else:
        lr32 = tl.cast(lr_hi, tl.float32)
        eta = _f64(lr_hi, lr_lo)
    skip = tl.zeros([TB], dtype=tl.float32)  # found_inf set: nothing outlives the step
    if HAS_FOUND_INF:
        skip += tl.load(found_inf_ptr).to(tl.float32)
    write = skip == 0.0

    if VARIANT == ADAM_AM:
        rows = tl.program_id(0).to(tl.int64) * TB + tl.arange(0, TB).to(tl.int64)
        rmask = rows < T
        step_ptr = tl.load(gtab_ptr + ROW_STEP * T + rows, mask=rmask, other=0)
        step_ptr = step_ptr.to(tl.pointer_type(tl.float32))
        mem = tl.load(gtab_ptr + ROW_MEM * T + rows, mask=rmask, other=0)
        mem = mem.to(tl.pointer_type(tl.float32))
        step = tl.load(step_ptr, mask=rmask, other=0.0)
        prod = tl.load(mem, mask=rmask, other=1.0)
        prev_lr = tl.load(mem + 1, mask=rmask, other=0.0).to(tl.float64)
        D = tl.load(sums_ptr + rows * 4, mask=rmask, other=0.0).to(tl.float64)
        M = tl.load(sums_ptr + rows * 4 + 1, mask=rmask, other=0.0).to(tl.float64)
        X = tl.load(sums_ptr + rows * 4 + 2, mask=rmask, other=0.0).to(tl.float64)
        Y = tl.load(sums_ptr + rows * 4 + 3, mask=rmask, other=0.0).to(tl.float64)
        G = tl.where(eta > 0.0, (1.0 + wd * eta) * prev_lr * Y / eta, 0.0)
        first = step == 0.0
        beta = tl.where(first, beta1, _clip_ratio(G - M - wd * X, D, beta_max))
        c, inv_sqrt_bc2 = _adam_am_scalars(step, prod, beta1, beta2_hi, beta2_lo)
        wmask = rmask & write
        tl.store(step_ptr, step + 1.0, mask=wmask)
        tl.store(mem, prod * beta, mask=wmask)
        tl.store(mem + 1, tl.zeros([TB], dtype=tl.float32) + lr32, mask=wmask)
        tl.store(mem + 2, beta, mask=wmask)
        tl.store(dec_i_ptr + 2 * rows + 1, first.to(tl.int32) * FLAG_FIRST, mask=rmask)
        tl.store(dec_f_ptr + 3 * rows, beta.to(tl.float64), mask=rmask)
        tl.store(dec_f_ptr + 3 * rows + 1, c.to(tl.float64), mask=rmask)
        tl.store(dec_f_ptr + 3 * rows + 2, inv_sqrt_bc2.to(tl.float64), mask=rmask)
    else:  # SGD_AM, one program: the group's sums over the tensors that have a direction
        if PHASE != PHASE_UPDATE:
            accD = tl.zeros([TB], dtype=tl.float32)
            accN = tl.zeros([TB], dtype=tl.float32)
            for s in range(0, T, TB):
                rows = s + tl.arange(0, TB).to(tl.int64)
                rmask = rows < T
                sp = tl.load(gtab_ptr + ROW_STEP * T + rows, mask=rmask, other=0)
                step = tl.load(sp.to(tl.pointer_type(tl.float32)), mask=rmask, other=0.0)
                live = rmask & (step != 0.0)
                accD += tl.load(sums_ptr + rows * 2, mask=live, other=0.0)
                accN += tl.load(sums_ptr + rows * 2 + 1, mask=live, other=0.0)
            D = tl.sum(accD, axis=0)
            N = tl.sum(accN, axis=0)
            if PHASE == PHASE_REDUCE:
                D = D + tl.load(totals_ptr)
                N = N + tl.load(totals_ptr + 1)
            tl.store(totals_ptr, D)
            tl.store(totals_ptr + 1, N)
        if PHASE != PHASE_REDUCE:
            if PHASE == PHASE_UPDATE:
                D = tl.load(totals_ptr)
                N = tl.load(totals_ptr + 1)
            beta = _clip_ratio(N.to(tl.float64), D.to(tl.float64), beta_max)
            lane = tl.arange(0, TB)
            tl.store(totals_ptr + 2 + lane * 0, tl.zeros([TB], dtype=tl.float32) + beta,
                     mask=(lane == 0) & write)
            for s in range(0, T, TB):
                rows = s + tl.arange(0, TB).to(tl.int64)
                rmask = rows < T
                sp = tl.load(gtab_ptr + ROW_STEP * T + rows, mask=rmask, other=0)
                sp = sp.to(tl.pointer_type(tl.float32))
                step = tl.load(sp, mask=rmask, other=0.0)
                tl.store(sp, step + 1.0, mask=rmask & write)
                first = (step == 0.0).to(tl.int32) * FLAG_FIRST
                tl.store(dec_i_ptr + 2 * rows + 1, first, mask=rmask)
                tl.store(dec_f_ptr + 3 * rows, tl.zeros([TB], dtype=tl.float64) + beta,
                         mask=rmask)
