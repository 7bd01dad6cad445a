"""Compile Triton kernel variants for a CUDA target without a GPU, and report what the
compiler made of them (the child process of tests/test_compile_gate.py).

Reads a JSON list of variants on stdin, each ``{"kernel", "args", "constexprs",
"options"}`` as
``launch.launch_log`` recorded a launch of the real launcher; compiles each for every
``--arch`` through Triton's own compiler (its bundled ptxas; no device, no interpreter:
TRITON_INTERPRET must be unset here, which is why this is a separate process), and
writes a JSON list of results: registers, stack frame and spill bytes (the report of
Triton's own ``ptxas -v`` run, with its flags), the 16- and 8-byte vector global loads
and stores in the PTX, and the loads a loop iteration issues after its first store
(``late_ld``, in the TTGIR's program order: neither LLVM nor ptxas moves a global load
above a store that may alias it, so each such load waits on memory a second time).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from triton import knobs  # noqa: E402

from cm_fused.triton import adaptive, kernels  # noqa: E402

# Compile every time (a cached kernel has no ptxas log), and print ptxas's report.
knobs.compilation.always_compile = True
knobs.nvidia.dump_ptxas_log = True

KERNELS = {name: getattr(mod, name) for mod in (kernels, adaptive) for name in dir(mod)
           if name.endswith("_kernel") and hasattr(getattr(mod, name), "arg_names")}
# launch_log's names for argument types -> Triton signature types
ARG_TYPES = {"torch.float32": "*fp32", "torch.float64": "*fp64", "torch.int64": "*i64",
             "torch.int32": "*i32", "torch.bfloat16": "*bf16", "torch.float16": "*fp16",
             "int": "i32", "fp32": "fp32"}
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "int8": tl.int8,
          "uint8": tl.uint8}


def _constexpr(text: str):
    if text in ("True", "False"):
        return text == "True"
    if text in DTYPES:
        return DTYPES[text]
    return int(text)


def _ptxas_report(log: str) -> dict:
    """Registers, stack frame and spill bytes from Triton's own ``ptxas -v`` run."""
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    if not (frame and regs):
        raise RuntimeError(f"no ptxas report in: {log[-500:]!r}")
    return {"reg": int(regs.group(1)), "stack": int(frame.group(1)),
            "spill": int(frame.group(2)) + int(frame.group(3))}


def late_loads(ttgir: str) -> int:
    """Loads after the first store of their loop's body, in program order (every scf.for;
    an scf.if's regions count in text order, so a load in an else after a store in the
    then is counted too: an upper bound)."""
    lines = ttgir.splitlines()
    late, i = 0, 0
    while i < len(lines):
        if "scf.for" in lines[i] and lines[i].rstrip().endswith("{"):
            depth, stored, i = 1, False, i + 1
            while i < len(lines) and depth:
                stored = stored or "tt.store" in lines[i]
                late += stored and "tt.load" in lines[i]
                depth += lines[i].count("{") - lines[i].count("}")
                i += 1
        else:
            i += 1
    return late


def compile_variant(variant: dict, arch: int) -> dict:
    fn = KERNELS[variant["kernel"]]
    consts = {k: _constexpr(v) for k, v in variant["constexprs"]}
    runtime = [n for n in fn.arg_names if n not in consts]
    sig = dict(zip(runtime, (ARG_TYPES[a] for a in variant["args"])))
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(fn=fn, signature={n: sig[n] for n in fn.arg_names},
                    constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    out = {**variant, "arch": arch}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # where Triton prints its ptxas -v log
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options=dict(**variant["options"], enable_fp_fusion=False))
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        return {**out, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
    ptx = k.asm["ptx"]
    return {**out, **_ptxas_report(log.getvalue()),
            "v4_loads": len(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.v4\.", ptx)),
            "v4_stores": len(re.findall(r"st\.global(?:\.[a-z0-9]+)*\.v4\.", ptx)),
            "v2_loads": len(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.v2\.", ptx)),
            "late_ld": late_loads(k.asm["ttgir"]),
            # 1.5 * 2**23, the round-half-even constant of the int8 slots and the e4m3
            # subnormals: present unless the compiler folded (y + c) - c into y
            "rne_const": ptx.count("0f4B400000")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, action="append", required=True)
    args = ap.parse_args()
    variants = json.load(sys.stdin)
    results = [compile_variant(v, arch) for arch in args.arch for v in variants]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
