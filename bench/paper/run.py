#!/usr/bin/env python
"""The paper's experiments (Malviya et al., TMLR 2024) as one command, on a CPU.

    python bench/paper/run.py            # the default set: 9 to 16 minutes on 2 cores
    python bench/paper/run.py --quick    # fewer steps, starts and seeds: 1 to 3.5 minutes
    python bench/paper/run.py --smoke    # a few steps of everything (the tests run it)

Times on this project's 2-core CPU machine: the default set 964 s with the test suite
running alongside (2026-11-24, the committed run) and 554 s idle (the run before it,
without the int8 row; docs/paper.md); --quick 63 s idle and 211 s with a test run
alongside (2026-12-03, ``time python bench/paper/run.py --quick --out /tmp/paper_quick``).

Runs the toy trajectories (Goldstein-Price, Ackley, Levy, Ackley+Rosenbrock), the final
loss and sharpness table on Goldstein-Price and Levy (Table 5), the escape ratio from a
sharp well against its sharpness and against topC (Fig. 5 and 12), the buffer's variance
and agreement over training (Fig. 10), and two small real tasks (a character LSTM on
Python's documentation, a CNN on scikit-learn's digits), with the public optimizer
classes on their default backend. Writes ``results.json``, ``summary.md`` and PNGs to
``--out`` (default: bench/runs/paper/, untracked). The committed results in
bench/paper/results/ (shown by docs/paper.md) are regenerated with
``python bench/paper/run.py --out bench/paper/results``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import cm_fused  # noqa: E402
import plots  # noqa: E402
import tasks  # noqa: E402
import toy  # noqa: E402
from common import NAMES  # noqa: E402

# Untracked (.gitignore: /bench/runs/), as bench/run.py's runs: a user's run never
# overwrites the committed results in bench/paper/results/ (regenerate those with
# --out bench/paper/results).
DEFAULT_OUT = HERE.parent / "runs" / "paper"

# (toy steps, table seeds, escape starts, escape steps, sharpness values, topC values,
#  task seeds, LSTM steps, CNN epochs, diagnostics epochs). Run times: the docstring.
SIZES = {
    "default": dict(steps=500, seeds=20, starts=100, escape_steps=300,
                    sharpness=[1, 2, 4, 8, 16], top_cs=[1, 2, 5, 10, 20], task_seeds=3,
                    lstm_steps=1000, cnn_epochs=30, diag_epochs=10),
    "quick": dict(steps=200, seeds=4, starts=8, escape_steps=200, sharpness=[2, 4, 8],
                  top_cs=[1, 5, 20], task_seeds=1, lstm_steps=150, cnn_epochs=4,
                  diag_epochs=2),
    "smoke": dict(steps=5, seeds=1, starts=1, escape_steps=5, sharpness=[4],
                  top_cs=[2], task_seeds=1, lstm_steps=2, cnn_epochs=1, diag_epochs=1),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true")
    size.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=str(DEFAULT_OUT),
                    help=f"output folder (default: {DEFAULT_OUT.relative_to(HERE.parent.parent)}"
                         ", untracked; the published results: --out bench/paper/results)")
    args = ap.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "default"
    cfg = SIZES[name]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results = {"meta": {
        "size": name, "settings": cfg, "optimizers": NAMES,
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "cm_fused": cm_fused.__version__,
        "python": platform.python_version(), "cores": os.cpu_count(),
        "backends": {k: v or "available" for k, v in cm_fused.backends().items()}}}
    results["trajectories"] = toy.trajectories(cfg["steps"], progress)
    results["table5"] = toy.table(["goldstein_price", "levy"], cfg["seeds"], cfg["steps"],
                                  progress)
    results["escape"] = toy.escape(cfg["sharpness"], cfg["top_cs"], cfg["starts"],
                                   cfg["escape_steps"], progress)
    results["buffer_over_training"] = tasks.buffer_over_training(cfg["diag_epochs"],
                                                                 progress)
    results["real_tasks"] = tasks.real_tasks(cfg["task_seeds"], cfg["lstm_steps"],
                                             cfg["cnn_epochs"], progress)
    results["meta"]["seconds"] = round(time.perf_counter() - start, 1)

    progress("plots")
    files = (plots.trajectories(results["trajectories"], out)
             + plots.escape(results["escape"], out)
             + plots.buffer_over_training(results["buffer_over_training"], out))
    (out / "results.json").write_text(json.dumps(results))
    (out / "summary.md").write_text(summary(results))
    print(summary(results))
    print(f"written: {out / 'results.json'}, {out / 'summary.md'}, "
          f"{', '.join(f.name for f in files)}")
    return results


def _pm(mean: float, std: float, fmt: str, std_fmt: str, single: bool) -> str:
    """``mean ± std``; the mean alone from a single run (its std, 0, is no spread)."""
    return f"{mean:{fmt}}" if single else f"{mean:{fmt}} ± {std:{std_fmt}}"


def _over(n: int, what: str) -> str:
    return f"one {what}" if n == 1 else f"mean ± std over {n} {what}s"


def summary(r: dict) -> str:
    m = r["meta"]
    lines = [f"Suite size `{m['size']}`, {m['when']}, torch {m['torch']}, cm_fused "
             f"{m['cm_fused']}, {m['cores']} cores, {m['seconds']} s.", "",
             "Final loss and sharpness (top Hessian eigenvalue), "
             f"{_over(m['settings']['seeds'], 'random start')}, {m['settings']['steps']} "
             "steps:", "",
             "| surface | optimizer | loss | sharpness |", "| --- | --- | ---: | ---: |"]
    one = m["settings"]["seeds"] == 1  # a single start or seed: no spread to print
    for surface, rows in r["table5"].items():
        for name, v in rows.items():
            lines.append(f"| {surface} | {name} | "
                         f"{_pm(v['loss_mean'], v['loss_std'], '.4g', '.2g', one)} | "
                         f"{_pm(v['sharpness_mean'], v['sharpness_std'], '.4g', '.2g', one)} |")
    e = r["escape"]
    lines += ["", f"Escape ratio from the sharp well ({e['starts']} starts, "
              f"{e['steps']} steps, lr {e['lr']}), by sharpness {e['sharpness']}; in "
              "brackets, the fraction that left the sharp well at all:", "",
              "| optimizer | " + " | ".join(f"s={s}" for s in e["sharpness"]) + " |",
              "| --- |" + " ---: |" * len(e["sharpness"])]
    for name, ratios in e["by_sharpness"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{x:.2f} ({y:.2f})" for x, y in zip(ratios, e["left"][name])) + " |")
    lines += ["", f"Adam+CM at sharpness {e['sharpness_for_topC']}, by topC "
              f"{e['topC']}: " + ", ".join(f"{x:.2f}" for x in e["by_topC"]), ""]
    t = r["real_tasks"]
    lines += [f"Real tasks, {_over(t['settings']['seeds'], 'seed')} "
              f"(LSTM {t['settings']['lstm_steps']} steps, CNN {t['settings']['cnn_epochs']} "
              "epochs):", "",
              "| optimizer | char LSTM val. perplexity | digits CNN test accuracy | "
              "CNN train loss | CNN sharpness |", "| --- | ---: | ---: | ---: | ---: |"]
    one = t["settings"]["seeds"] == 1
    for name in t["char_lstm"]:
        ppl = t["char_lstm"][name]["val_perplexity"]
        c = t["digits_cnn"][name]
        lines.append(f"| {name} | {_pm(ppl['mean'], ppl['std'], '.3f', '.3f', one)} | "
                     + " | ".join(_pm(c[k]["mean"], c[k]["std"], fmt, fmt, one) for k, fmt in
                                  (("test_accuracy", ".4f"), ("train_loss", ".4f"),
                                   ("sharpness", ".3f"))) + " |")
    d = r["buffer_over_training"]
    lines += ["", "Buffer over training (digits CNN), last record: " + "; ".join(
        f"{name}: variance {tr[-1]['variance']:.3g}, agreement {tr[-1]['agreement']:.3f}"
        for name, tr in d.items() if tr), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
