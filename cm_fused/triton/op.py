"""The fused Triton step as a ``torch.library`` custom op with mutation annotations.

``cm_fused_triton::adam_cm_step_`` (its own namespace: the C++ backend owns
``TORCH_LIBRARY(cm_fused)``). Registered for CUDA, and for CPU too when the kernels run
under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the CPU tests
``opcheck`` it. The launcher keeps host-side caches keyed on data pointers, so the op
is opaque to ``torch.compile`` (a ``custom_op``, not a ``triton_op``); its fake
implementation does nothing, as the op returns nothing and only mutates its inputs.

The schema cannot say "float or Tensor", so a tensor lr travels as ``lr_tensor`` (and
``lr`` is then ignored).
"""
# No ``from __future__ import annotations``: custom_op infers the schema from the hints.
from typing import Optional

import torch
from torch import Tensor

from . import kernels, launch

NAME = "cm_fused_triton::adam_cm_step_"
INTERPRETED = type(kernels._update_kernel).__name__ == "InterpretedFunction"
MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "buffers", "keys",
           "counts", "sums", "steps")


def eager_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor], buffers: list[Tensor],
    keys: list[Tensor], counts: list[Tensor], sums: list[Tensor], steps: list[Tensor],
    lr: float, lr_tensor: Optional[Tensor], beta1: float, beta2: float, eps: float,
    weight_decay: float, decay: float, critical_test: float, amsgrad: bool,
    synced: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
    rand: Optional[Tensor],
) -> None:
    """The op's kernel, also called directly in eager mode (no dispatcher: a custom op
    with ten mutated tensor lists costs tens of microseconds per tensor of host time)."""
    launch.step(
        dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
             max_exp_avg_sqs=max_exp_avg_sqs, buffers=buffers, keys=keys, counts=counts,
             sums=sums, steps=steps),
        lr=lr, lr_tensor=lr_tensor, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, decay=decay, critical_test=critical_test,
        amsgrad=amsgrad, synced=synced, grad_scale=grad_scale, found_inf=found_inf,
        rand=rand)


adam_cm_step_ = torch.library.custom_op(
    NAME, mutates_args=MUTATED,
    device_types=("cuda", "cpu") if INTERPRETED else ("cuda",))(eager_step)


@adam_cm_step_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, buffers, keys, counts, sums,
      steps, lr, lr_tensor, beta1, beta2, eps, weight_decay, decay, critical_test,
      amsgrad, synced, grad_scale, found_inf, rand) -> None:
    return None
