"""The package as a user installs it: both wheel-building commands of the README make a
platform wheel with the stripped C++ kernel and the sources to rebuild it, and the
metadata pip shows."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a checkout holds that a build reads (not the in-place built library).
SOURCES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "csrc",
           "cm_fused")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    dst = tmp_path_factory.mktemp("checkout")
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.so", "*.egg-info"))
        else:
            shutil.copy2(src, dst / name)
    return dst


COMMANDS = {
    "pip wheel": [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                  "-q", ".", "-w", "{out}"],
    "build": [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", "{out}", "."],
}


# (-m slow: each compiles the whole kernel, 100 s of the default run's 10 minutes; the
# default run's own install compiles it from the same setup.py and fails without it,
# CM_FUSED_REQUIRE_EXT=1 in .ci/run)
@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_both_build_commands_make_a_platform_wheel_with_the_stripped_kernel(checkout,
                                                                            tmp_path, command):
    if command == "build":
        pytest.importorskip("build", reason="python -m build needs the 'build' package "
                                            "(pip install cm_fused[test] has it)")
    out = tmp_path / "dist"
    args = [a.format(out=out) for a in COMMANDS[command]]
    env = {**os.environ, "CM_FUSED_REQUIRE_EXT": "1"}
    run = subprocess.run(args, cwd=checkout, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    assert not wheel.name.endswith("-none-any.whl"), wheel.name  # a platform wheel
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (lib,) = [n for n in names if n.startswith("cm_fused/_C") and n.endswith(".so")]
        size = z.getinfo(lib).file_size
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    # (stripped: 2.4 MB since the 8-bit-moment kernels doubled the update instantiations;
    # with debug info it was 17 times the stripped size: csrc/build.json)
    assert size < 4 * 2 ** 20, f"{lib} is {size} bytes: not stripped?"
    for src in ("step.cpp", "buffered.cpp", "adaptive.cpp", "step.h", "passes.h", "decide.h",
                "step_kernels.h", "build.json"):  # JIT fallback
        assert f"cm_fused/csrc/{src}" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    for line in ("Name: cm_fused", "License-Expression: MIT", "Requires-Dist: torch>=2.7",
                 "Provides-Extra: test", "Provides-Extra: bench", "Summary: Adam with"):
        assert line in meta, line
