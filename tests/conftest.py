"""Session set-up shared by the tests.

Without a CUDA device the Triton kernels run under the Triton interpreter on CPU
tensors. Triton decides interpreter mode when a kernel is defined (``@triton.jit``), so
``TRITON_INTERPRET=1`` is set here, before any test module imports ``cm_fused.triton``'s
kernels. With a CUDA device nothing is set: the kernels compile for the GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
