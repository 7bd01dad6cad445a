#!/usr/bin/env python
"""Optimizer-state bytes per parameter, measured from the state tensors.

    python bench/memory.py [--sets gpt2-124m,gpt2-11m]

Every optimizer steps once on parameters of the set on the ``meta`` device (state of the
right shapes and dtypes, no memory used, so any size runs anywhere); the table sums
``numel × element_size`` over every tensor in ``opt.state`` and divides by the number of
parameters. fp32 parameters. Writes the table to bench/results/memory_<sets>.txt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cm_fused  # noqa: E402
from harness import git_commit, versions  # noqa: E402
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
]


def state_bytes_per_param(shapes, factory) -> float:
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = factory(params)
    opt.step()
    total = sum(t.numel() * t.element_size() for st in opt.state.values()
                for t in st.values() if isinstance(t, torch.Tensor))
    return total / sum(p.numel() for p in params)


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
    text = "\n".join(lines) + "\n"
    dest = Path(__file__).resolve().parent / "results" / f"memory_{'_'.join(sets)}.txt"
    dest.write_text(text)
    print(text + f"written to {dest}")
    return text


if __name__ == "__main__":
    main()
