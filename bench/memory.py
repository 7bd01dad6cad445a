#!/usr/bin/env python
"""Optimizer-state bytes per parameter, measured from the state tensors.

    python bench/memory.py [--sets gpt2-124m,gpt2-11m]

Every optimizer steps once on parameters of the set on the ``meta`` device (state of the
right shapes and dtypes, no memory used, so any size runs anywhere); the table sums
``numel × element_size`` over every tensor in ``opt.state`` and divides by the number of
parameters. fp32 parameters. Writes the table to bench/results/memory_<sets>.txt.

The peers' 8-bit AdamW rows (torchao's ``AdamW8bit``, bitsandbytes' ``AdamW8bit``) run
where those libraries import, on CPU tensors (their state is a tensor subclass or needs
real memory): the bytes of its inner tensors are counted, each storage once (torchao's
code table is shared). A peer that does not import or run here is listed with the
reason.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cm_fused  # noqa: E402
from harness import PROVIDERS, git_commit, make_optimizer, versions  # noqa: E402
from param_sets import SETS  # noqa: E402

SLOTS = (("fp32", None), ("bf16", torch.bfloat16), ("int8", torch.int8))
# (row name, factory params -> optimizer)
ROWS = [
    ("torch AdamW", lambda ps: torch.optim.AdamW(ps, foreach=False)),
    ("torch SGD momentum 0.9", lambda ps: torch.optim.SGD(ps, momentum=0.9, foreach=False)),
    *[(f"AdamCM topC {c}, {name} slots",
       lambda ps, c=c, dt=dt: cm_fused.AdamCM(ps, topC=c, buffer_dtype=dt))
      for c in (5, 20) for name, dt in SLOTS],
    *[(f"{name} topC 10, {slot} slots", lambda ps, cls=cls, kw=kw, dt=dt: cls(
        ps, buffer_dtype=dt, **kw)) for name, cls, kw in (
            ("AdamCG", cm_fused.AdamCG, {}),
            ("SGDCG momentum 0.9,", cm_fused.SGDCG, dict(momentum=0.9)),
            ("RMSpropCG", cm_fused.RMSpropCG, {}))
      for slot, dt in SLOTS[::2]],
    ("AdamAM", lambda ps: cm_fused.AdamAM(ps)),
    ("SGDAM", lambda ps: cm_fused.SGDAM(ps)),
    # 8-bit moments (docs/SPEC.md "8-bit moments"; tensors under 4096 elements keep fp32)
    *[(f"AdamCM topC {c}, 8-bit moments, {name} slots",
       lambda ps, c=c, dt=dt: cm_fused.AdamCM(ps, topC=c, buffer_dtype=dt,
                                              state_dtype=torch.int8))
      for c in (5, 20) for name, dt in SLOTS[::2]],
    ("AdamCG topC 10, 8-bit moments, int8 slots", lambda ps: cm_fused.AdamCG(
        ps, buffer_dtype=torch.int8, state_dtype=torch.int8)),
    ("AdamAM, 8-bit moments", lambda ps: cm_fused.AdamAM(ps, state_dtype=torch.int8)),
]


def _torchao(ps):
    return make_optimizer(PROVIDERS["torchao_adamw8bit"], ps, None, None)


def _bitsandbytes(ps):
    import bitsandbytes
    return bitsandbytes.optim.AdamW8bit(ps)


# (row name, factory): stepped on CPU tensors
PEERS = [("torchao AdamW8bit", _torchao), ("bitsandbytes AdamW8bit", _bitsandbytes)]


def state_bytes_per_param(shapes, factory, device="meta") -> float:
    params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt = factory(params)
    opt.step()
    seen: dict = {}
    for st in opt.state.values():
        for t in st.values():
            if isinstance(t, torch.Tensor):
                for inner in _inner(t):
                    seen[_storage_key(inner)] = inner.numel() * inner.element_size()
    return sum(seen.values()) / sum(p.numel() for p in params)


def _inner(t: torch.Tensor) -> list:
    """A tensor subclass's inner tensors (torchao's OptimState8bit: codes, scale, qmap),
    else the tensor."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _inner(getattr(t, n))]
    return [t]


def _storage_key(t: torch.Tensor):
    if t.device.type == "meta":
        return id(t)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())


def _version(package: str) -> str:
    try:
        return f" ({importlib.metadata.version(package)})"
    except importlib.metadata.PackageNotFoundError:
        return ""


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="gpt2-124m,gpt2-11m")
    args = ap.parse_args(argv)
    sets = args.sets.split(",")
    lines = [f"# bench/memory.py: optimizer-state bytes per fp32 parameter, from the state "
             f"tensors after one step (meta device); commit {git_commit()}; {versions()}",
             f"{'optimizer':42}" + "".join(f"{s:>12}" for s in sets)]
    for name, factory in ROWS:
        lines.append(f"{name:42}" + "".join(
            f"{state_bytes_per_param(SETS[s], factory):12.2f}" for s in sets))
        print(lines[-1], flush=True)
    for name, factory in PEERS:
        try:
            row = "".join(f"{state_bytes_per_param(SETS[s], factory, 'cpu'):12.2f}"
                          for s in sets)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run here: say why
            row = f"  (not run here: {type(e).__name__}: {str(e).splitlines()[0][:80]})"
        lines.append(f"{name + _version(name.split()[0]):42}" + row)
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    dest = Path(__file__).resolve().parent / "results" / f"memory_{'_'.join(sets)}.txt"
    dest.write_text(text)
    print(text + f"written to {dest}")
    return text


if __name__ == "__main__":
    main()
