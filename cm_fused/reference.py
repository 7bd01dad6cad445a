"""The reference backend: shared/SPEC.md written as plain PyTorch, one tensor at a time.

This is the oracle every fused backend is tested against, so it favours being obviously
right over being fast. Two rules keep it usable on a GPU as well: no ``.item()`` and no
Python branch on a device value (device-side conditions go through ``torch.where``), so a
step never waits on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """All arithmetic in fp32, or in the storage dtype when that is wider."""
    return torch.promote_types(dtype, torch.float32)


def unscaled(grad: Tensor, grad_scale: Tensor | None) -> Tensor:
    g = grad.to(compute_dtype(grad.dtype))
    return g if grad_scale is None else g / grad_scale.to(g.dtype)


def gradient_keys(grads: list[Tensor], synced: bool) -> Tensor:
    """One fp32 priority key per (unscaled) gradient: its own L2 norm, or (synced) the sum
    of all norms. The synced key is a sum of per-tensor norms, not the global norm (SPEC
    quirk)."""
    norms = torch.stack([torch.linalg.vector_norm(g).float() for g in grads])
    return norms.sum().expand(len(grads)) if synced else norms


def unavailable_reason() -> str | None:
    return None


def unsupported_reason(device: torch.device, dtypes: set[torch.dtype]) -> str | None:
    bad = sorted(str(d) for d in dtypes if not d.is_floating_point)
    return f"parameters must be floating point, got {', '.join(bad)}" if bad else None


def adam_cm_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    buffers: list[Tensor],
    keys: list[Tensor],
    counts: list[Tensor],
    sums: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decay: float,
    critical_test: float,
    amsgrad: bool,
    synced: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    rand: Tensor | None = None,
) -> None:
    """One Adam+CM step (kappa > 0) over the tensors of one param group, in place."""
    if not params:
        return
    # found_inf set: the step is computed, and every write keeps the old value instead.
    keep = None if found_inf is None else found_inf.to(params[0].device) != 0
    grads = [unscaled(g, grad_scale) for g in grads]
    norms = gradient_keys(grads, synced)
    for i, p in enumerate(params):
        _one_tensor(
            p, grads[i], exp_avgs[i], exp_avg_sqs[i],
            max_exp_avg_sqs[i] if amsgrad else None, buffers[i], keys[i], counts[i],
            sums[i], steps[i], norms[i],
            None if rand is None else rand[i] < critical_test, keep,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            decay=decay,
        )


def _commit(dst: Tensor, new: Tensor, keep: Tensor | None) -> None:
    """Write ``new`` into ``dst``, unless the step is skipped (``keep``, from found_inf)."""
    dst.copy_(new if keep is None else torch.where(keep, dst, new))


def _one_tensor(p, g, m, v, v_max, B, K, k, S, step, n, lucky, keep, *, lr, beta1, beta2,
                eps, weight_decay, decay):
    cdt = compute_dtype(p.dtype)
    C = B.shape[0]
    first = k == 0  # fresh state (SPEC "first step"): a device value, so torch.where below

    x = p.to(cdt)
    if weight_decay != 0:
        x = x * (1 - lr * weight_decay)

    m_new = torch.where(first, torch.zeros_like(g), m.to(cdt).lerp(g, 1 - beta1))
    # The aggregate uses the buffer as it was before this step's insert.
    mean = S.to(cdt) / k.clamp(min=1).to(cdt)
    a = torch.where(first, torch.zeros_like(g), m_new + mean)

    # Insert: the raw gradient on the first step (SPEC quirk), the momentum afterwards.
    # Unfilled slots hold zeros, so "S - B[j] + new" also covers filling a free slot.
    new_slot = torch.where(first, g, m_new).to(B.dtype)
    full = k >= C
    j_min = torch.argmin(K)  # first index on ties
    j = torch.where(full, j_min, k.clamp(max=C - 1)).view(1)
    replace = ~full | (n > K[j_min])
    if lucky is not None:
        replace = replace | lucky
    if keep is not None:
        replace = replace & ~keep
    old_slot = B.index_select(0, j)[0]
    S_new = S - old_slot.to(S.dtype) + new_slot.to(S.dtype)  # S is fp32 or wider
    S.copy_(torch.where(replace, S_new, S))
    B.index_copy_(0, j, torch.where(replace, new_slot, old_slot).unsqueeze(0))
    K_written = K.index_copy(0, j, torch.where(replace, n, K.index_select(0, j)[0]).view(1))
    _commit(K, K_written * decay, keep)  # every key decays, the one just written too
    k.copy_(torch.where(replace & ~full, k + 1, k))

    # v tracks the aggregate, not the gradient.
    v_new = v.to(cdt) * beta2 + (1 - beta2) * a * a
    _commit(v, v_new, keep)
    if v_max is not None:
        v_new = torch.maximum(v_max.to(cdt), v_new)
        _commit(v_max, v_new, keep)
    _commit(m, m_new, keep)

    step_new = step + 1
    _commit(step, step_new, keep)
    # Bias corrections in fp64: in fp32, 1 - beta2**step loses ~1e-5 to cancellation.
    bc1 = 1 - beta1 ** step_new.double()
    bc2 = 1 - beta2 ** step_new.double()
    denom = v_new.sqrt() / bc2.sqrt().to(cdt) + eps
    # The first step's update is zero by definition (m = 0), also when eps = 0 makes it 0/0.
    x_new = torch.where(first, x, x - (lr / bc1).to(cdt) * a / denom)
    _commit(p, x_new, keep)
