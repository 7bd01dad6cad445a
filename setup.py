"""cm_fused: Adam with Critical Momenta for PyTorch.

The C++ CPU extension ``cm_fused._C`` (sources in csrc/, flags in csrc/build.json) is
compiled when torch is importable at build time (``pip install --no-build-isolation``);
``CM_FUSED_NO_EXT=1`` skips it. A failed compile does not fail the install (unless
``CM_FUSED_REQUIRE_EXT=1``): cm_fused/cpu.py then JIT-builds the sources shipped inside
the package (cm_fused/csrc/) on first use, and reports the backend unavailable, with the
reason, if that fails too.
"""
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
SOURCE_SUFFIXES = {".cpp", ".h", ".json"}


class build_py_with_csrc(build_py):
    """Also copy csrc/ into the package (cm_fused/csrc/) so an installed wheel can JIT-build
    the extension, e.g. for another torch than the one it was built against."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "cm_fused" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((ROOT / CSRC).iterdir()):
            if f.suffix in SOURCE_SUFFIXES:
                shutil.copy2(f, dest / f.name)


def extension():
    """([ext_modules], {cmdclass}) for the C++ extension, or nothing when it is skipped."""
    if os.environ.get("CM_FUSED_NO_EXT") == "1":
        print("cm_fused: CM_FUSED_NO_EXT=1, not building the C++ extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        print(f"cm_fused: torch is not importable at build time ({e}); not building the C++ "
              f"extension (it is JIT-built on first use). Use pip install "
              f"--no-build-isolation to build it now.", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any compiler/ninja failure
                if os.environ.get("CM_FUSED_REQUIRE_EXT") == "1":
                    raise
                print(f"cm_fused: WARNING: building the C++ extension failed ({e}); "
                      f"installing without it. The cpu backend will try a JIT build on "
                      f"first use and otherwise report why it is unavailable.",
                      file=sys.stderr)

    flags = json.loads((ROOT / CSRC / "build.json").read_text())
    sources = sorted(f"{CSRC}/{f.name}" for f in (ROOT / CSRC).glob("*.cpp"))
    ext = CppExtension(
        "cm_fused._C",
        sources=sources,
        include_dirs=[str(ROOT / CSRC)],
        # Unquoted on purpose; adam_cm.cpp stringizes it (see cm_fused/cpu.py).
        extra_compile_args=[*flags["cflags"], f"-DCM_FUSED_TORCH_VERSION={torch.__version__}"],
        extra_link_args=list(flags["ldflags"]),
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension()

# Metadata, dependencies and extras are in pyproject.toml; this file adds the C++ build.
setup(
    ext_modules=ext_modules,
    cmdclass={"build_py": build_py_with_csrc, **cmdclass},
    zip_safe=False,
)
