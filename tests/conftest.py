"""Session set-up shared by the tests.

Without a CUDA device the Triton kernels run under the Triton interpreter on CPU
tensors. Triton decides interpreter mode when a kernel is defined (``@triton.jit``), so
``TRITON_INTERPRET=1`` is set here, before any test module imports ``cm_fused.triton``'s
kernels. With a CUDA device nothing is set: the kernels compile for the GPU.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def small_chunks(monkeypatch):
    """Triton chunks of 1024 elements in loops of 256: 4097 elements = 5 chunks, the last
    one element long. (Interpreter cost grows with the number of programs, not their
    width.) Yields the launch module, for tests that shrink them further."""
    from cm_fused.triton import launch
    monkeypatch.setattr(launch, "CHUNK", 1024)
    monkeypatch.setattr(launch, "BLOCK", 256)
    yield launch


@pytest.fixture
def one_thread():
    """One intra-op thread: comparisons do not depend on it (the C++ kernel is
    thread-count deterministic, tested on its own), and an OpenMP pool on a busy 2-core
    machine makes hundreds of tiny reference ops crawl."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
