"""The reference backend: docs/SPEC.md written as plain PyTorch, one tensor at a time.

This is the oracle every fused backend is tested against, so it favours being obviously
right over being fast. Two rules keep it usable on a GPU as well: no ``.item()`` and no
Python branch on a device value (device-side conditions go through ``torch.where``), so a
step never waits on the host. Python branches on the variant and on hyperparameters are
fine: those are host values.

One step is the same three parts for every variant. Buffered variants: the keys
(:func:`gradient_keys`), the insert decision (:func:`decide` and :func:`insert`,
shared), and the variant's update (:func:`_one_tensor`). Adaptive memory: the inner
products (:func:`adam_am_sums`, :func:`sgd_am_sums`), beta (:func:`adam_am_beta`,
:func:`sgd_am_beta`), the update (:func:`_adam_am_tensor`, :func:`_sgd_am_tensor`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .contract import Capabilities, Phase, StepArgs, Variant
from .quantize import QuantizedMoment, dequantize, quantize, slot_sum
from .rounding import round_param

# The floor of AdamAM's 1 - beta1max * prod (docs/SPEC.md): fp32's smallest normal.
# Every insert written in its own step, any topC, 8-bit moments.
CAPABILITIES = Capabilities(eight_bit_moments=True)
TINY = torch.finfo(torch.float32).tiny


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """All arithmetic in fp32, or in the storage dtype when that is wider."""
    return torch.promote_types(dtype, torch.float32)


def sqrt(x: Tensor) -> Tensor:
    """Correctly rounded square root, as the fused kernels' IEEE sqrt: torch's vectorised
    fp32 sqrt on CPU can be an ulp off, which a momentum sum can amplify. (A float64 sqrt
    rounded to fp32 is correctly rounded: 53 >= 2 * 24 + 2 bits.)"""
    return x.double().sqrt().to(x.dtype) if x.dtype == torch.float32 else x.sqrt()


def unscaled(grad: Tensor, grad_scale: Tensor | None) -> Tensor:
    g = grad.to(compute_dtype(grad.dtype))
    return g if grad_scale is None else g / grad_scale.to(g.dtype)


def gradient_keys(grads: list[Tensor], synced: bool) -> Tensor:
    """One fp32 priority key per (unscaled) gradient: its own L2 norm, or (synced) the sum
    of all norms. The synced key is a sum of per-tensor norms, not the global norm (SPEC
    quirk)."""
    return _keys(torch.stack([torch.linalg.vector_norm(g).float() for g in grads]), synced)


def keys_from_sums(sumsq: Tensor, synced: bool) -> Tensor:
    """The keys from each gradient's sum of squares (fp64; a split step's, summed over
    the processes that hold its shards)."""
    return _keys(sumsq.sqrt().float(), synced)


def _keys(norms: Tensor, synced: bool) -> Tensor:
    return norms.sum().expand(len(norms)) if synced else norms


def unavailable_reason() -> str | None:
    return None


def unsupported_reason(device: torch.device, dtypes: set[torch.dtype]) -> str | None:
    bad = sorted(str(d) for d in dtypes if not d.is_floating_point)
    return f"parameters must be floating point, got {', '.join(bad)}" if bad else None


def step(args: StepArgs) -> None:
    """One step (kappa > 0) over the tensors of one param group, in place."""
    if not args.params:
        return
    flush_all(args)
    # found_inf set: the step is computed, and every write keeps the old value instead.
    keep = None if args.found_inf is None else args.found_inf.to(args.params[0].device) != 0
    grads = [unscaled(g, args.grad_scale) for g in args.grads]
    if args.maximize:  # the key is the same; everything else sees -g
        grads = [-g for g in grads]
    if not Variant(args.variant).buffered:
        _adaptive_memory(args, grads, keep)
        return
    if args.phase == Phase.REDUCE:  # the sums only: the optimizer sums them over processes
        args.reduced[:, 0] = torch.stack([torch.sum(g.double() ** 2) for g in grads])
        return
    if args.phase == Phase.UPDATE:
        norms = keys_from_sums(args.reduced[:, 0], args.synced)
    else:
        norms = gradient_keys(grads, args.synced)
    lr = args.lr if args.lr_tensor is None else args.lr_tensor

    for i, p in enumerate(args.params):
        lucky = None if args.rand is None else args.rand[i] < args.critical_test
        first, j, replace, k_before = decide(args.keys[i], args.counts[i], norms[i], lucky,
                                             keep, args.key_decay, args.inserts[i])
        _one_tensor(Variant(args.variant), args, lr, keep, first, j, replace, k_before, p,
                    grads[i], moment(args, "momenta", i), moment(args, "second_moments", i),
                    role(args.extras, i), args.buffers[i], role(args.scales, i),
                    role(args.sums, i), args.steps[i], role(args.rounding, i))


def role(tensors, i: int) -> Tensor | None:
    """Entry ``i`` of a role's per-tensor list, None where the role is unused."""
    return tensors[i] if tensors is not None and len(tensors) else None


def moment(a: StepArgs, name: str, i: int) -> Tensor | QuantizedMoment | None:
    """Tensor ``i``'s ``momenta`` or ``second_moments``: the tensor, or its 8-bit codes
    with their scales (docs/SPEC.md "8-bit moments")."""
    t = role(getattr(a, name), i)
    if t is None or t.dtype != torch.uint8:
        return t
    second = name == "second_moments"
    return QuantizedMoment(t, a.moment_scales[i][int(second)], second)


def _commit(dst: Tensor | QuantizedMoment, new: Tensor, keep: Tensor | None) -> None:
    """Write ``new`` into ``dst``, unless the step is skipped (``keep``, from found_inf)."""
    if isinstance(dst, QuantizedMoment):
        dst.commit(new, keep)
        return
    dst.copy_(new if keep is None else torch.where(keep, dst, new))


def _second_moment(sq: Tensor, u: Tensor, beta: float, keep: Tensor | None,
                   write: bool = True) -> Tensor:
    """``sq ← β·sq + (1−β)·u²`` (Adam's v, RMSprop's square average), written back
    (unless ``write`` is False)."""
    new = sq.to(u.dtype) * beta + (1 - beta) * u * u
    if write:
        _commit(sq, new, keep)
    return new


def decide(K: Tensor, k: Tensor, n: Tensor, lucky: Tensor | None, keep: Tensor | None,
           key_decay: float, inserts: Tensor):
    """The insert rule, shared by every variant: fill while ``k < C``; then replace the
    first-index argmin of the keys when ``n`` beats it strictly (or on a lucky coin).
    Writes the keys (the new one at slot j, then all decayed), the fill count and the
    count of inserts (fills and replacements), unless the step is skipped. Returns
    (first step?, slot j, replace?, k before the insert, at least 1), all device
    values."""
    C = K.shape[0]
    first = k == 0  # fresh state (SPEC "first step"): a device value, so torch.where
    full = k >= C
    j_min = torch.argmin(K)  # first index on ties
    j = torch.where(full, j_min, k.clamp(max=C - 1)).view(1)
    replace = ~full | (n > K.min())  # K[argmin K], NaN included
    if lucky is not None:
        replace = replace | lucky
    if keep is not None:
        replace = replace & ~keep
    k_before = k.clamp(min=1)
    K_written = K.index_copy(0, j, torch.where(replace, n, K.index_select(0, j)[0]).view(1))
    _commit(K, K_written * key_decay, keep)  # every key decays, the one just written too
    k.copy_(torch.where(replace & ~full, k + 1, k))
    inserts.copy_(torch.where(replace, inserts + 1, inserts))
    return first, j, replace, k_before


def insert(B: Tensor, S: Tensor | None, j: Tensor, replace: Tensor, new: Tensor,
           scales: Tensor | None = None) -> None:
    """``S ← S − B[j]``, ``B[j] ← new`` (rounded to the slot dtype; int8 slots: quantized,
    with their ``scales``), ``S ← S + B[j]`` where ``replace``, S adding and subtracting
    the values the slots hold (S None: no running sum is kept). Unfilled slots hold
    zeros, so this also fills a free slot."""
    if B.dtype == torch.int8:
        q, s = quantize(new)
        old_q, old_s = B.index_select(0, j)[0], scales.index_select(0, j)[0]
        if S is not None:
            S_new = S - dequantize(old_q, old_s).to(S.dtype) + dequantize(q, s).to(S.dtype)
        scales.index_copy_(0, j, torch.where(replace, s, old_s).unsqueeze(0))
        new, old = q, old_q
    else:
        new = new.to(B.dtype)
        old = B.index_select(0, j)[0]
        if S is not None:
            S_new = S - old.to(S.dtype) + new.to(S.dtype)  # S is fp32 or wider
    if S is not None:
        S.copy_(torch.where(replace, S_new, S))
    B.index_copy_(0, j, torch.where(replace, new, old).unsqueeze(0))



def flush_all(args: StepArgs) -> None:
    """Write every insert ``args.pending`` holds, for a backend that writes inserts in the
    step that decides them (found_inf does not matter: an earlier step decided them)."""
    for i, pending in enumerate(args.pending):
        flush_pending(args.buffers[i], role(args.sums, i), role(args.scales, i),
                      moment(args, "momenta", i), pending)


def flush_pending(B: Tensor, S: Tensor | None, scales: Tensor | None,
                  m: Tensor | QuantizedMoment, pending: Tensor) -> None:
    """Write a deferred insert (StepArgs.pending): the momentum ``m`` as stored goes into
    slot ``pending`` as :func:`insert` would have written it in the step that decided it,
    if ``pending >= 0``; then nothing is pending. Device values only."""
    insert(B, S, pending.clamp(min=0).view(1), pending >= 0, m.to(compute_dtype(m.dtype)),
           scales)
    pending.fill_(-1)


def _store_param(p: Tensor, x_new: Tensor, keep: Tensor | None, rounding: Tensor | None,
                 step_new: Tensor) -> None:
    """``p ← x_new``, rounded to p's dtype stochastically where ``rounding`` is given."""
    _commit(p, round_param(x_new, p.dtype, rounding, step_new), keep)


def _one_tensor(variant, a: StepArgs, lr, keep, first, j, replace, k_before, p, g, mom, sq,
                extra, B, scales, S, step, rounding):
    cdt = compute_dtype(p.dtype)
    x = p.to(cdt)
    zero = torch.zeros_like(g)
    held = S if S is not None else slot_sum(B, scales)
    mean = held.to(cdt) / k_before.to(cdt)  # the buffer as it was before this step's insert
    wd = a.weight_decay

    # ---- the direction u the base rule takes, and the value inserted into the buffer
    if variant == Variant.ADAM_CM:
        if wd != 0:  # decoupled (AdamW)
            x = x * (1 - lr * wd)
        m_new = torch.where(first, zero, mom.to(cdt).lerp(g, 1 - a.beta1))
        u = torch.where(first, zero, m_new + mean)  # the aggregate
        new = torch.where(first, g, m_new)  # SPEC quirk: the first slot is the raw gradient
    elif variant == Variant.SGD_CG:
        d = g + wd * x if wd != 0 else g  # the stored value includes weight decay (quirk)
        u = torch.where(first, d, d + mean)
        new = d
    else:
        if variant == Variant.ADAM_CG:
            u = torch.where(first, g, g + mean)
        else:  # RMSPROP_CG: the buffer mean alone (quirk)
            u = torch.where(first, g, mean)
        if wd != 0:  # coupled L2, after the aggregate
            u = u + wd * x
        new = g
    insert(B, S, j, replace, new, scales)

    step_new = step + 1
    _commit(step, step_new, keep)

    # ---- the base rule
    if variant in (Variant.ADAM_CM, Variant.ADAM_CG):
        if variant == Variant.ADAM_CM:
            num = u  # m stays the plain momentum; the aggregate moves p
        else:
            m_new = mom.to(cdt).lerp(u, 1 - a.beta1)
            num = m_new
        _commit(mom, m_new, keep)
        v_new = _second_moment(sq, u, a.beta2, keep)  # CM: v tracks the aggregate
        if extra is not None:  # amsgrad
            v_new = torch.maximum(extra.to(cdt), v_new)
            _commit(extra, v_new, keep)
        # Bias corrections in fp64: in fp32, 1 - beta2**step loses ~1e-5 to cancellation.
        bc1 = 1 - a.beta1 ** step_new.double()
        bc2 = 1 - a.beta2 ** step_new.double()
        denom = sqrt(v_new) / bc2.sqrt().to(cdt) + a.eps
        x_new = x - (lr / bc1).to(cdt) * num / denom
        if variant == Variant.ADAM_CM:
            # The first step's update is zero by definition (m = 0), also when eps = 0
            # makes it 0/0.
            x_new = torch.where(first, x, x_new)
    elif variant == Variant.SGD_CG:
        if mom is not None:  # the first momentum step copies d
            buf = torch.where(first, u, mom.to(cdt) * a.beta1 + (1 - a.dampening) * u)
            _commit(mom, buf, keep)
            u = buf
        x_new = x - lr * u
    else:  # RMSPROP_CG
        sq_new = _second_moment(sq, u, a.beta2, keep)
        if extra is not None:  # centered
            ga = extra.to(cdt).lerp(u, 1 - a.beta2)
            _commit(extra, ga, keep)
            avg = sqrt(sq_new - ga * ga) + a.eps
        else:
            avg = sqrt(sq_new) + a.eps
        if mom is not None:
            buf = mom.to(cdt) * a.beta1 + u / avg
            _commit(mom, buf, keep)
            x_new = x - lr * buf
        else:
            x_new = x - lr * (u / avg)
    _store_param(p, x_new, keep, rounding, step_new)


# ---------------------------------------------------------------- adaptive memory

def _lr(a: StepArgs):
    return a.lr if a.lr_tensor is None else a.lr_tensor


def _decayed(x: Tensor, a: StepArgs, lr) -> Tensor:
    """``x·(1 − lr·wd)`` (decoupled weight decay), rounded as AdamCM's."""
    return x * (1 - lr * a.weight_decay) if a.weight_decay != 0 else x


def _adaptive_memory(a: StepArgs, grads: list[Tensor], keep: Tensor | None) -> None:
    lr = _lr(a)
    if a.variant == Variant.ADAM_AM:
        for i, p in enumerate(a.params):
            _adam_am_tensor(a, lr, keep, p, grads[i], moment(a, "momenta", i),
                            moment(a, "second_moments", i), a.steps[i], a.memory[i], i)
        return
    totals = a.memory[0]
    moms = [moment(a, "momenta", i) for i in range(len(a.params))]
    gs = [g + a.weight_decay * p.to(g.dtype) if a.weight_decay != 0 else g
          for p, g in zip(a.params, grads)]
    if a.phase != Phase.UPDATE:
        sums = torch.zeros(2, dtype=torch.float64, device=totals.device)
        for g, d, step in zip(gs, moms, a.steps):
            sums += torch.where(step == 0, 0.0, sgd_am_sums(g, d.to(g.dtype), a.lam))
        if a.phase == Phase.REDUCE:
            totals[:2] += sums.float()
            return
        totals[:2] = sums.float()
    beta = sgd_am_beta(totals[0], totals[1], a.beta1)
    _commit(totals[2], beta, keep)
    coef_d = (beta + a.lam) / (1 + a.lam)
    coef_g = (1 - beta) / (1 + a.lam)
    for i, (p, g, d, step) in enumerate(zip(a.params, gs, moms, a.steps)):
        d_new = torch.where(step == 0, g, coef_d * d.to(g.dtype) + coef_g * g)
        _commit(d, d_new, keep)
        _store_param(p, p.to(g.dtype) - lr * d_new, keep, role(a.rounding, i), step + 1)
        _commit(step, step + 1, keep)


def sgd_am_sums(g: Tensor, d: Tensor, lam: float) -> Tensor:
    """fp64 [2]: D = Σ‖d − g‖², N = Σ (1+λ)·g·d − (d − g)·(g + λ·d), for one tensor."""
    delta = d - g
    n = (1 + lam) * g * d - delta * (g + lam * d)
    return torch.stack([torch.sum(delta * delta, dtype=torch.float64),
                        torch.sum(n, dtype=torch.float64)])


def _clip_ratio(num: Tensor, den: Tensor, beta_max: float) -> Tensor:
    """β = min(num/den, beta_max) where den > 0 and the ratio is > 0, else 0 (a NaN
    ratio too): fp64 in, fp32 out."""
    r = num / den
    ok = (den > 0) & (r > 0)
    return torch.where(ok, r.clamp(max=beta_max), 0.0).float()


def sgd_am_beta(D: Tensor, N: Tensor, beta_max: float) -> Tensor:
    return _clip_ratio(N.double(), D.double(), beta_max)


def adam_am_planes(a: StepArgs, v_new: Tensor, step_new: Tensor, prod: Tensor):
    """(P, R, W): P = max(1 − β1max·prod, tiny) · (√v_new · k + eps) with
    k = 1/√(1 − β2^step) (fp64, rounded to fp32), R = 1 + λP and W = 1/(P·R). Every
    backend computes 1/P as R·W and 1/R as P·W: one division per element and pass (the
    fused kernels are bound by divider throughput, not memory, with three)."""
    k = (1 / (1 - a.beta2 ** step_new.double()).sqrt()).to(v_new.dtype)
    c = (1 - a.beta1 * prod).clamp(min=TINY)
    P = c * (sqrt(v_new) * k + a.eps)
    R = 1 + a.lam * P
    return P, R, 1 / (P * R)


def adam_am_sums(a: StepArgs, g: Tensor, x: Tensor, d: Tensor, P: Tensor, R: Tensor,
                 W: Tensor) -> Tensor:
    """fp64 [4] for one tensor: D = Σ δ²W, M = Σ δ(g + λPd)W, X = Σ x·δ and
    Y = Σ g·(d/P + μx), with δ = d − g (and d/P as d·(R·W))."""
    delta = d - g
    y = d * (R * W)
    if a.weight_decay != 0:
        y = y + a.weight_decay * x
    terms = (delta * delta * W, delta * (g + a.lam * P * d) * W, x * delta, g * y)
    return torch.stack([torch.sum(t, dtype=torch.float64) for t in terms])


def adam_am_beta(a: StepArgs, sums: Tensor, first: Tensor, prev_lr: Tensor, lr) -> Tensor:
    """AdamAM's β for one tensor (fp64 from the sums, fp32 out): β1max on its first step,
    else clip((G − M − μX)/D, 0, β1max) with G = (1 + μη)·prev_lr·Y/η (0 when η = 0)."""
    D, M, X, Y = sums.unbind()
    eta = torch.as_tensor(lr, dtype=torch.float64, device=sums.device)
    G = torch.where(eta > 0, (1 + a.weight_decay * eta) * prev_lr.double() * Y / eta, 0.0)
    beta = _clip_ratio(G - M - a.weight_decay * X, D, a.beta1)
    return torch.where(first, a.beta1, beta)


def _adam_am_tensor(a: StepArgs, lr, keep, p, g, d_state, v_state, step, memory,
                    i: int) -> None:
    x = p.to(g.dtype)
    d = d_state.to(g.dtype)
    prod, prev_lr = memory[0], memory[1]
    step_new = step + 1
    v_new = _second_moment(v_state, g, a.beta2, keep, write=a.phase != Phase.REDUCE)
    P, R, W = adam_am_planes(a, v_new, step_new, prod)
    if a.phase == Phase.UPDATE:  # summed over the processes
        sums = a.reduced[i]
    else:
        sums = adam_am_sums(a, g, x, d, P, R, W)
        if a.phase == Phase.REDUCE:
            a.reduced[i] = sums
            return
    beta = adam_am_beta(a, sums, step == 0, prev_lr, lr)
    d_new = ((1 - beta) * g + (a.lam * P + beta) * d) * (P * W)  # ... / R
    _commit(d_state, d_new, keep)
    _store_param(p, _decayed(x, a, lr) - lr * d_new * (R * W), keep,  # ... − lr·d/P
                 role(a.rounding, i), step_new)
    _commit(step, step_new, keep)
    eta = torch.as_tensor(lr, dtype=torch.float32, device=memory.device)
    _commit(memory, torch.stack([prod * beta, eta, beta]), keep)
