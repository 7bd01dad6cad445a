"""What the Triton test modules share: the skip when Triton is not importable, the
failure when it is but the backend is not, the device, the shapes, and AdamCM makers."""
import pytest
import torch

from cm_fused import AdamCM

try:
    import triton  # noqa: F401
except ImportError as e:  # the only reason to skip: no Triton at all
    pytest.skip(f"triton is not importable ({e})", allow_module_level=True)

import cm_fused.triton as triton_backend  # noqa: E402

# Triton imports, so the backend must work: a kernel that fails to load (or a
# TRITON_INTERPRET=0 without a CUDA device) fails every test, with the reason.
REASON = triton_backend.unavailable_reason()

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Shapes for lock-step runs: 0-dim, 1, odd, empty, and 4097 (several chunks, the last
# one a single element, with the chunk sizes of the small_chunks fixture).
SHAPES = [(), (1,), (4097,), (3, 5), (0,), (2, 33)]


@pytest.fixture(autouse=True)
def backend_available(small_chunks):
    """(autouse in every module that imports it)"""
    if REASON is not None:
        pytest.fail(f"triton is importable but the triton backend is unavailable: {REASON}",
                    pytrace=False)


def tri(**kw):
    return lambda params: AdamCM(params, backend="triton", **kw)


def ref(**kw):
    return lambda params: AdamCM(params, backend="reference", **kw)
