"""The C++ CPU backend: finds, checks and loads the extension, and calls its op.

The op ``cm_fused::step_`` is the kappa > 0 step of docs/SPEC.md over all tensors of a
group, for every variant. Its schema is defined here from
:class:`cm_fused.contract.StepArgs`; the extension (csrc/step.cpp) registers the CPU
kernel for it. Where the kernel comes from, in order:

1. already registered in this process (loaded by an earlier call, or by the user);
2. the prebuilt ``cm_fused/_C*.so`` that ``pip install`` compiled, if it was built
   against this very torch (its build tag is read from the file before loading it, so a
   binary for another torch is never loaded);
3. a JIT build of the shipped C++ sources with ``torch.utils.cpp_extension.load``
   (ninja, cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).

If none works, :func:`unavailable_reason` says why (and ``backend="auto"`` falls back to
the reference backend with one warning). Importing this module never builds anything.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
from pathlib import Path

import torch
from .contract import Capabilities, StepArgs, define_op
from .registry import FUSED_DTYPES

log = logging.getLogger("cm_fused")
OP = "cm_fused::step_"
# AdamCM with fp32 params defers its inserts (csrc/buffered.cpp); every variant steps
# 8-bit moments.
CAPABILITIES = Capabilities(defers_inserts=True, eight_bit_moments=True)
_TAG = b"CM_FUSED_BUILT_WITH_TORCH="
_PACKAGE_DIR = Path(__file__).resolve().parent

_lock = threading.Lock()
# source: "prebuilt", "jit" or "already registered"; path: the library loaded, if any.
_status: dict = {"done": False, "reason": None, "source": None, "path": None}


# ---------------------------------------------------------------- finding the extension

def source_dir() -> Path | None:
    """The C++ sources: shipped in the package (wheel), or the repository's csrc/."""
    for d in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (d / "step.cpp").is_file() and (d / "build.json").is_file():
            return d
    return None


def build_flags(csrc: Path) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) of the extension, shared with setup.py."""
    spec = json.loads((csrc / "build.json").read_text())
    # Unquoted: quotes do not survive every build tool; step.cpp stringizes it.
    version = f"-DCM_FUSED_TORCH_VERSION={torch.__version__}"
    return [*spec["cflags"], version], list(spec["ldflags"])


def build_tag(path: str | os.PathLike) -> str | None:
    """The torch version a built extension was compiled against (read from its bytes)."""
    data = Path(path).read_bytes()
    start = data.find(_TAG)
    if start < 0:
        return None
    start += len(_TAG)
    end = data.find(b";", start)
    return data[start:end].decode("ascii", "replace") if end > start else None


def _registered() -> bool:
    """Whether a CPU kernel for the op is registered in this process."""
    define_op(OP)
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU")


def _load_prebuilt() -> str | None:
    """Load the pip-built cm_fused._C; None if loaded, else why not."""
    try:
        spec = importlib.util.find_spec("cm_fused._C")
    except (ImportError, ValueError) as e:
        return f"cannot look up cm_fused._C: {e}"
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        where = os.path.dirname(os.path.abspath(__file__))
        return (f"no prebuilt extension next to {where} (a source checkout that was not "
                f"installed with `pip install -e .`, an install with CM_FUSED_NO_EXT=1, or "
                f"a failed build)")
    tag = build_tag(spec.origin)
    if tag != torch.__version__:
        return (f"the prebuilt extension {spec.origin} was built for torch {tag or '(unknown)'}, "
                f"this is torch {torch.__version__}")
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as e:
        return f"the prebuilt extension {spec.origin} failed to load: {e}"
    return None if _registered() else f"{spec.origin} loaded but does not define {OP}"


def _jit_build(why_not_prebuilt: str = "") -> str | None:
    """Compile and load the shipped sources; None if that worked, else why not. Says so,
    in one line, before it starts: it takes a while, once."""
    if os.environ.get("CM_FUSED_NO_JIT") == "1":
        return "JIT build disabled by CM_FUSED_NO_JIT=1"
    csrc = source_dir()
    if csrc is None:
        return f"the C++ sources are not shipped with this install ({_PACKAGE_DIR})"
    try:
        from torch.utils import cpp_extension
        cflags, ldflags = build_flags(csrc)
        log.warning("cm_fused: compiling the C++ CPU kernel for torch %s (%s); this takes "
                    "about 15 s on 2 cores, once: it is cached in %s",
                    torch.__version__, why_not_prebuilt or "no prebuilt kernel",
                    os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions"))
        start = time.perf_counter()
        cpp_extension.load(
            name="cm_fused_cpu",
            sources=sorted(str(p) for p in csrc.glob("*.cpp")),
            extra_cflags=cflags, extra_ldflags=ldflags, extra_include_paths=[str(csrc)],
            is_python_module=False,
            verbose=os.environ.get("CM_FUSED_VERBOSE_BUILD") == "1",
        )
    except Exception as e:  # noqa: BLE001 - any build failure: report it, do not crash
        detail = _summary(str(e)) or type(e).__name__
        return (f"the JIT build of the C++ extension failed ({type(e).__name__}: {detail}); "
                f"set CM_FUSED_VERBOSE_BUILD=1 to see the compiler output")
    log.info("cm_fused: the C++ CPU kernel is ready (%.1f s)", time.perf_counter() - start)
    return None if _registered() else f"the JIT-built extension does not define {OP}"


def _summary(log: str, keep: int = 4) -> str:
    """The telling lines of a build log (errors, not the long compiler command lines)."""
    lines = [ln.strip() for ln in log.strip().splitlines() if ln.strip()]
    telling = [ln for ln in lines if any(w in ln.lower() for w in
                                         ("error", "not found", "no such file", "failed"))
               and not ln.startswith("[")]
    return " | ".join(ln[:200] for ln in (telling or lines)[-keep:])


def load() -> str | None:
    """Make the op available (once per process); None if it is, else the reason."""
    with _lock:
        if not _status["done"]:
            reasons = []
            if _registered():
                _status["source"] = "already registered"
            else:
                for source, attempt in (("prebuilt", _load_prebuilt),
                                        ("jit", lambda: _jit_build(reasons[0]))):
                    known = set(torch.ops.loaded_libraries)
                    why = attempt()
                    if why is None:
                        _status["source"] = source
                        _status["path"] = next(iter(set(torch.ops.loaded_libraries) - known),
                                               None)
                        break
                    reasons.append(why)
            if _status["source"] is None:
                _status["reason"] = "the C++ extension is unavailable: " + "; ".join(reasons)
            else:
                _register_fakes()
            _status["done"] = True
        return _status["reason"]


def loaded_from() -> tuple[str | None, str | None]:
    """(how the extension was loaded, the library file), after :func:`load`."""
    load()
    return _status["source"], _status["path"]


def kernel_name() -> str:
    """Which kernel build runs on this CPU: 'AVX512', 'AVX2' or 'DEFAULT' (the one matching
    torch's own, ``torch.backends.cpu.get_cpu_capability()``, where this CPU has it)."""
    reason = load()
    if reason:
        raise RuntimeError(reason)
    return torch.ops.cm_fused.cpu_kernel_name()


# ---------------------------------------------------------------- backend interface

def unavailable_reason() -> str | None:
    return load()


def unsupported_reason(device: torch.device, dtypes: set[torch.dtype]) -> str | None:
    if torch.device(device).type != "cpu":
        return f"the C++ kernel steps CPU tensors only, got {device}"
    bad = sorted(str(d) for d in dtypes if d not in FUSED_DTYPES)
    if bad:
        return (f"the C++ kernel takes float32, bfloat16 or float16 parameters, "
                f"got {', '.join(bad)}")
    return None


def step(args: StepArgs) -> None:
    """One step (kappa > 0) of one param group, in place (see cm_fused.contract.StepArgs);
    params and grads must be contiguous (the optimizer passes contiguous copies of
    strided ones)."""
    if not args.params:
        return
    # load() takes a lock, which torch.compile cannot trace: only call it until it is done.
    reason = _status["reason"] if _status["done"] else load()
    if reason:
        raise RuntimeError(reason)
    torch.ops.cm_fused.step_(*args.op_args())


def square_sums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's sum of squares, fp64 ``[len(tensors)]``: the fused clip's norm
    (cm_fused/clipping.py) at the bandwidth of the step, where torch's CPU norm is
    compute-bound (csrc/step.cpp)."""
    reason = _status["reason"] if _status["done"] else load()
    if reason:
        raise RuntimeError(reason)
    if not tensors:  # (the dispatcher needs a tensor to pick the CPU kernel)
        return torch.zeros(0, dtype=torch.float64)
    return torch.ops.cm_fused.square_sums(tensors)


def _square_sums_fake(tensors):
    return torch.empty((len(tensors),), dtype=torch.float64, device="cpu")


def _register_fakes() -> None:
    """The fake (shape) implementation of the ops the library defines, for torch.compile;
    the schema of square_sums is the library's own (csrc/step.cpp)."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("cm_fused::square_sums", "CPU"):
        torch.library.register_fake("cm_fused::square_sums")(_square_sums_fake)
