"""The Triton kernels as an H100 (sm_90) and an A100 (sm_80) would get them, without a GPU.

The launcher is driven on small CPU tensors (under the interpreter) over a matrix of
optimizers and configurations with ``launch.launch_log`` on; every distinct kernel
variant it launched (kernel, argument types, constexprs, warps) is then compiled for
both targets by Triton's own compiler in a separate process (tests/compile_gate.py;
the default run compiles the subset for sm_90 alone, ``-m slow`` everything for both),
and the test asserts: it compiles; no register spills (ptxas's report; the streamed
kernels under the launcher's register ceiling, launch.MAXNREG); in the streamed kernels
(norm, update, adaptive memory), no load of a loop iteration after its first store,
and 16-byte vector global loads in aligned buckets of every dtype (none where the
bucket is unaligned; no 8-byte ones where params, gradients or state are 2-byte, but
for int8 slots and 8-bit moments); and, with int8 slots or 8-bit moments (adaptive
memory's too), the quantizer's
rounding constant in the code (not folded away).
``python -m pytest tests/test_compile_gate.py -s`` prints the table (``-m aot`` selects
the gate alone); the default run compiles a representative subset, ``-m slow`` every
configuration of every optimizer, dtype and topC up to 256 (the Triton backend's bound).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from compare import make_params, set_grads
from family import ADAPTIVE, EVERY, FAMILY, cases, require

try:
    import triton  # noqa: F401
except ImportError as e:
    pytest.skip(f"triton is not importable ({e})", allow_module_level=True)

pytestmark = pytest.mark.aot

ARCHS = (90, 80)  # (-m slow; the default run compiles for sm_90 alone, to fit its time)
SHAPES = [(64,), (3, 5), (2, 33), ()]
HERE = os.path.dirname(os.path.abspath(__file__))


def _drive(name: str, kw: dict, dtype=torch.float32, scaler=False, odd=False, groups=1):
    """Two steps of EVERY[name] on the Triton backend; the launches it made."""
    from cm_fused.triton import launch
    params = make_params(SHAPES, dtype=dtype)
    if odd:  # 4-byte-aligned views: the unaligned bucket
        for p in params:
            flat = torch.zeros(p.numel() + 1, dtype=dtype)
            flat[1:] = p.data.flatten()
            p.data = flat[1:].view(p.shape)
    cls = EVERY[name].cls
    if groups > 1:
        opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 2e-3}],
                  backend="triton", **kw)
    else:
        opt = cls(params, backend="triton", **kw)
    launch.launch_log = []
    try:
        for t in range(2):
            set_grads(params, t)
            if scaler:
                opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)
            torch.manual_seed(t)
            opt.step()
        return list(launch.launch_log)
    finally:
        launch.launch_log = None


def _configs(full: bool):
    """(label, driver keywords) of the launches to compile."""
    out = []
    for name, member in EVERY.items():
        out.append((f"{name}/all/fp32/scaler", name, dict(kw=member.configs["all"],
                                                          scaler=True)))
        out.append((f"{name}/tensor_lr/bf16", name,
                    dict(kw=member.configs["tensor_lr"], dtype=torch.bfloat16)))
        if member.buffered:
            out.append((f"{name}/topC64", name, dict(kw=dict(topC=64))))
            out.append((f"{name}/topC256", name, dict(kw=dict(topC=256, synced=False))))
            out.append((f"{name}/int8/all", name,
                        dict(kw={**member.configs["all"], "buffer_dtype": torch.int8})))
    out.append(("adamcg/int8/bf16", "adamcg",  # (the doubled block with int8 slots)
                dict(kw={**EVERY["adamcg"].configs["all"], "buffer_dtype": torch.int8},
                     dtype=torch.bfloat16)))
    # 8-bit moments (the critical-buffer variants): with the params' slots, fp32 and bf16
    # (the doubled block); with int8 slots and no running sum (topC 3); with int8 slots
    # and the sum (topC 9). SHAPES' (64,) is at min_8bit_size 64, the others below: both
    # kinds of bucket. The default run compiles one of each layout, -m slow all of them.
    eight = dict(state_dtype=torch.int8, min_8bit_size=64)
    layouts = {"": ({}, torch.float32), "/bf16": ({}, torch.bfloat16),
               "/int8/no_sum": (dict(buffer_dtype=torch.int8, topC=3), torch.float32),
               "/int8/sum/bf16": (dict(buffer_dtype=torch.int8, topC=9), torch.bfloat16)}
    default = {"rmspropcg", "adamcm/bf16", "adamcm/int8/no_sum", "sgdcg/int8/sum/bf16"}
    for name, member in FAMILY.items():  # (centered RMSprop has no 8-bit moments)
        kw = {**member.configs["momentum" if name == "rmspropcg" else "all"], **eight}
        for layout, (slots, dtype) in layouts.items():
            if full or name + layout in default:
                out.append((f"{name}/m8{layout}", name,
                            dict(kw={**kw, **slots}, dtype=dtype)))
    # Adaptive memory's 8-bit moments (no slots): its reduce and update passes, fp32 and
    # bf16 params; the default run one dtype each.
    for name, member in ADAPTIVE.items():
        for layout, dtype in (("", torch.float32), ("/bf16", torch.bfloat16)):
            if full or name + layout in ("adamam", "sgdam/bf16"):
                out.append((f"{name}/m8{layout}", name,
                            dict(kw={**member.configs["all"], **eight}, dtype=dtype)))
    # Stochastic rounding of bf16/fp16 params: the update kernels' ROUNDING variants
    # (every optimizer; fp16 and an unaligned bucket under -m slow).
    for name, member in EVERY.items():
        out.append((f"{name}/rounding/bf16", name,
                    dict(kw={**member.configs["all"], "stochastic_rounding": True},
                         dtype=torch.bfloat16)))
    out.append(("adamcm/unaligned", "adamcm", dict(kw={}, odd=True)))
    out.append(("adamam/unaligned", "adamam", dict(kw={}, odd=True)))
    out.append(("sgdam/two groups", "sgdam", dict(kw=dict(lr=1e-2), groups=2)))
    if full:
        for p in cases(members=EVERY):
            name, cfg = p.values
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                out.append((f"{name}/{cfg}/{dtype}", name,
                            dict(kw=EVERY[name].configs[cfg], dtype=dtype, scaler=True)))
        for name, member in EVERY.items():
            rounded = {**member.configs["all"], "stochastic_rounding": True}
            out.append((f"{name}/rounding/fp16", name, dict(kw=rounded, dtype=torch.float16)))
            out.append((f"{name}/rounding/bf16/unaligned", name,
                        dict(kw=rounded, dtype=torch.bfloat16, odd=True)))
            if member.buffered:
                for c in (1, 2, 3, 5, 8, 16, 32, 64, 128, 256):  # triton's max_top_c
                    for slot in (torch.bfloat16, torch.float16, torch.int8):
                        out.append((f"{name}/topC{c}/{slot}", name,
                                    dict(kw=dict(topC=c, buffer_dtype=slot))))
    return out


def _variants(full: bool) -> dict:
    """Distinct launched variants -> the configurations that launched them."""
    seen: dict = {}
    for label, name, how in _configs(full):
        for kernel, _grid, spec, consts, options in _drive(name, **how):
            key = json.dumps({"kernel": kernel, "args": list(spec),
                              "constexprs": [list(c) for c in consts], "options": options})
            seen.setdefault(key, []).append(label)
    return seen


def _compile(variants: list[dict], archs) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # (the checkout's package, whether or not it is installed)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                      env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, os.path.join(HERE, "compile_gate.py"),
                          *(f"--arch={a}" for a in archs)], input=json.dumps(variants),
                         capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def _short(consts) -> str:
    skip = {"BLOCK", "RBLOCK", "TB", "NUM_WARPS"}
    return " ".join(f"{k}={v}" for k, v in consts if k not in skip and v not in ("False",))


def _gate(full: bool, capsys, archs=ARCHS):
    require("triton")
    seen = _variants(full)
    variants = [json.loads(k) for k in seen]
    from cm_fused.triton import launch
    assert isinstance(launch.MAXNREG, int) and 0 < launch.MAXNREG <= 255  # (stated: see it)
    for v in variants:  # the streamed kernels launch under the register ceiling
        streamed = v["kernel"] in ("_norm_kernel", "_update_kernel", "_am_kernel")
        assert v["options"]["maxnreg"] == (launch.MAXNREG if streamed else None), v
    results = _compile(variants, archs)
    errors = [r for r in results if "error" in r]
    assert not errors, "\n".join(f"sm_{r['arch']} {r['kernel']} {_short(r['constexprs'])}: "
                                 f"{r['error']}" for r in errors[:5])
    lines = [f"{'kernel':18} {'arch':6} {'regs':>4} {'spill':>5} {'stack':>5} {'v4 ld':>5} "
             f"{'v4 st':>5} {'v2 ld':>5} {'late':>4}  variant"]
    for r in sorted(results, key=lambda r: (r["kernel"], r["arch"], _short(r["constexprs"]))):
        lines.append(f"{r['kernel']:18} sm_{r['arch']:<3} {r['reg']:>4} "
                     f"{r['spill']:>5} {r['stack']:>5} "
                     f"{r['v4_loads']:>5} {r['v4_stores']:>5} {r['v2_loads']:>5} "
                     f"{r['late_ld']:>4}  {_short(r['constexprs'])}")
    with capsys.disabled():
        print(f"\n{len(variants)} kernel variants x {len(archs)} targets\n" + "\n".join(lines))
    spills = [r for r in results if r["spill"]]
    assert not spills, [(r["kernel"], r["arch"], r["spill"], _short(r["constexprs"]))
                        for r in spills]
    streamed = ("_norm_kernel", "_update_kernel", "_am_kernel")
    for r in results:
        consts = dict(r["constexprs"])
        what = (r["kernel"], r["arch"], _short(r["constexprs"]))
        codes = consts.get("B_DT") == "int8" or "uint8" in (consts.get("M_DT"),
                                                             consts.get("V_DT"))
        # the quantizers' rounding (int8 values, e4m3 subnormals) not folded away, where
        # the kernel encodes (adaptive memory's reduce pass only decodes)
        if codes and consts.get("REDUCE") != "True":
            assert r["rne_const"] > 0, what
        if r["kernel"] not in streamed:
            continue
        assert r["late_ld"] == 0, what  # every load of a block before its first store
        if consts["ALIGNED"] == "True":  # 16-byte loads, for 2-byte streams too
            assert r["v4_loads"] > 0, what
            # (1-byte codes, int8 slots' and 8-bit moments', load 8 bytes at the
            # doubled block; the PTX does not say which stream a load reads, so those
            # buckets are spared)
            narrow = any(consts.get(k) in ("bf16", "fp16") for k in ("P_DT", "G_DT", "M_DT",
                                                                     "V_DT", "X_DT"))
            if narrow and not codes:
                assert r["v2_loads"] == 0, what
        else:
            assert r["v4_loads"] == 0, what
    return results


# The launcher's own CHUNK and BLOCK (not the tests' small ones: the vector width
# follows from BLOCK / threads).
def test_every_launched_kernel_variant_compiles_for_sm90(one_thread, capsys):
    results = _gate(False, capsys, archs=(90,))
    kernels = {r["kernel"] for r in results}
    assert kernels == {"_norm_kernel", "_reduce_kernel", "_decide_kernel", "_update_kernel",
                       "_am_kernel", "_am_decide_kernel"}


@pytest.mark.slow
def test_every_configuration_compiles_for_sm90_and_sm80(one_thread, capsys):
    _gate(True, capsys)
