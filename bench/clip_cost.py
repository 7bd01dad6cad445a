"""What clipping by the global gradient norm costs a step, three ways, side by side:

- ``step``: the optimizer's step alone;
- ``fused clip``: the same optimizer with ``max_grad_norm`` (the norm read in one pass
  over the gradients, the coefficient applied inside the update: cm_fused/clipping.py);
- ``clip_grad_norm_ + step``: torch's clip (a norm pass, then every gradient rewritten),
  then the step.

Timed in alternating rounds on the same parameters and gradient sets (each round steps
every variant ``--reps`` times in turn); the ratios to ``step`` are the medians of the
per-round ratios, so machine drift cancels. The gradients' norm is above
``max_grad_norm`` on every step (every step clips).

    python bench/clip_cost.py [--sets gpt2-11m] [--optimizer adamcm] [--backend cpu]

Prints a table and writes it to bench/results/clip_cost_<set>_<backend>.txt (--out).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import git_commit, loadavg, make_tensors, set_grads, versions  # noqa: E402
from param_sets import SETS  # noqa: E402

import cm_fused  # noqa: E402

CLASSES = {"adamcm": cm_fused.AdamCM, "adamcg": cm_fused.AdamCG, "sgdcg": cm_fused.SGDCG,
           "rmspropcg": cm_fused.RMSpropCG, "adamam": cm_fused.AdamAM,
           "sgdam": cm_fused.SGDAM}
MAX_NORM = 1.0  # the gradients' norm is ~sqrt(numel) * GRAD_STD: far above it


def _variants(cls, params, backend):
    plain = cls(params, backend=backend)
    fused = cls(params, backend=backend, max_grad_norm=MAX_NORM)
    torch_clip = cls(params, backend=backend)

    def clip_then_step():
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        torch_clip.step()

    return {"step": plain.step, "fused clip": fused.step,
            "clip_grad_norm_ + step": clip_then_step}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="gpt2-11m")
    ap.add_argument("--optimizer", default="adamcm")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    lines = [f"# bench/clip_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
             f"{git_commit()}, {versions()}, {torch.get_num_threads()} threads, "
             f"load {loadavg()}",
             f"{'set':10} {'optimizer':9} {'variant':24} {'median ms':>10} {'ratio':>7}"]
    for set_name in args.sets.split(","):
        for name in args.optimizer.split(","):
            params, grads = make_tensors(SETS[set_name], torch.float32, torch.device("cpu"),
                                         grad_sets=2)
            variants = _variants(CLASSES[name], params, args.backend)
            times = {k: [] for k in variants}
            for r in range(args.rounds + 1):  # round 0 warms up (state allocated)
                for label, step in variants.items():
                    ms = []
                    for i in range(args.reps):
                        # fresh gradients: clip_grad_norm_ rewrites them in place
                        set_grads(params, [g.clone() for g in grads[i % 2]])
                        t0 = time.perf_counter()
                        step()
                        ms.append((time.perf_counter() - t0) * 1e3)
                    if r:
                        times[label].append(statistics.median(ms))
            base = times["step"]
            for label, ts in times.items():
                ratio = statistics.median(t / b for t, b in zip(ts, base))
                lines.append(f"{set_name:10} {name:9} {label:24} {statistics.median(ts):10.2f} "
                             f"{ratio:7.3f}")
                print(lines[-1], flush=True)
    out = Path(args.out) / f"clip_cost_{args.sets.replace(',', '+')}_{args.backend}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
