"""The fused Triton step as a ``torch.library`` op: ``cm_fused_triton::step_``.

Its schema is the one every fused step has, generated from
:class:`cm_fused.contract.StepArgs` (with mutation annotations and a fake
implementation). Registered for CUDA, and for CPU too when the kernels run under the
Triton interpreter (``TRITON_INTERPRET=1``), which is how the CPU tests ``opcheck`` it;
that is why it lives in its own namespace (``cm_fused::step_`` is the C++ kernel's on
CPU). The launcher keeps host-side caches keyed on data pointers, so the op is opaque to
``torch.compile`` (a kernel registered for the device, not a ``triton_op``).
"""
import torch

from ..contract import StepArgs, define_op
from . import kernels, launch

NAME = "cm_fused_triton::step_"
INTERPRETED = type(kernels._update_kernel).__name__ == "InterpretedFunction"


def _kernel(*args) -> None:
    launch.step(StepArgs.from_op_args(args))


define_op(NAME)
torch.library.register_kernel(NAME, ("cuda", "cpu") if INTERPRETED else ("cuda",), _kernel)
