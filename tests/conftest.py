"""Session set-up shared by the tests.

Without a CUDA device the Triton kernels run under the Triton interpreter on CPU
tensors. Triton decides interpreter mode when a kernel is defined (``@triton.jit``), so
``TRITON_INTERPRET=1`` is set here, before any test module imports ``cm_fused.triton``'s
kernels. With a CUDA device nothing is set: the kernels compile for the GPU.
"""
import os

import pytest
import torch

from family import ADAPTIVE, FAMILY

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_patches_the_language_once_per_launch():
    """Triton's interpreter swaps ``triton.language`` for its interpreted twin when a
    kernel is launched and swaps it back when the launch ends; it also redoes the swap at
    every call of a ``@triton.jit`` helper inside the kernel, although the launch's swap
    is still in place (tens of thousands of attribute sets, about half of our kernels'
    interpreted time). Skip those redundant swaps: the arithmetic interpreted is the same,
    the launch's own swap and restore are untouched. Where the interpreter's internals
    differ from what this expects, nothing is changed."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "_once_per_launch", False) \
            or not hasattr(interpreter, "_LangPatchScope"):
        return
    swapped = []  # the language modules the running launch swapped (none between launches)
    found = {}  # id(a module's globals) -> the language modules it names

    def languages(fn):
        key = id(fn.__globals__)
        if key not in found:
            found[key] = {id(v) for v in fn.__globals__.values()
                          if v is interpreter.tl or v is interpreter.tl.core}
        return found[key]

    def patch_lang(fn):
        if swapped and languages(fn) <= swapped[-1]:
            return interpreter._LangPatchScope()  # a helper's call: already swapped
        scope = original(fn)
        if swapped:
            return scope
        swapped.append(languages(fn))
        restore = scope.restore

        def restore_and_forget():
            swapped.clear()
            restore()

        scope.restore = restore_and_forget
        return scope

    patch_lang._once_per_launch = True
    interpreter._patch_lang = patch_lang


_interpreter_patches_the_language_once_per_launch()


@pytest.fixture(params=list(FAMILY))
def family_ref(request):
    """Every buffered optimizer, as a constructor on the reference backend."""
    cls = FAMILY[request.param].cls
    return lambda params, **kw: cls(params, backend="reference", **kw)


@pytest.fixture(params=list(ADAPTIVE))
def adaptive_ref(request):
    """AdamAM and SGDAM, as constructors on the reference backend."""
    cls = ADAPTIVE[request.param].cls
    return lambda params, **kw: cls(params, backend="reference", **kw)


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
