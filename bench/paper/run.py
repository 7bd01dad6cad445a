#!/usr/bin/env python
"""The paper's experiments (Malviya et al., TMLR 2024) as one command, on a CPU.

    python bench/paper/run.py            # the default set: about 5 minutes on 2 cores
    python bench/paper/run.py --quick    # fewer steps, starts and seeds: under 2 minutes
    python bench/paper/run.py --smoke    # a few steps of everything (the tests run it)

Runs the toy trajectories (Goldstein-Price, Ackley, Levy, Ackley+Rosenbrock), the final
loss and sharpness table on Goldstein-Price and Levy (Table 5), the escape ratio from a
sharp well against its sharpness and against topC (Fig. 5 and 12), the buffer's variance
and agreement over training (Fig. 10), and two small real tasks (a character LSTM on
Python's documentation, a CNN on scikit-learn's digits), with the public optimizer
classes on their default backend. Writes ``results.json``, ``summary.md`` and PNGs to
``--out`` (default: bench/paper/results/).
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

# (toy steps, table seeds, escape starts, escape steps, sharpness values, topC values,
#  task seeds, LSTM steps, CNN epochs, diagnostics epochs). The default set takes about
# 5 minutes on 2 cores, --quick about 1.
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
    ap.add_argument("--out", default=str(HERE / "results"))
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


def summary(r: dict) -> str:
    m = r["meta"]
    lines = [f"Suite size `{m['size']}`, {m['when']}, torch {m['torch']}, cm_fused "
             f"{m['cm_fused']}, {m['cores']} cores, {m['seconds']} s.", "",
             "Final loss and sharpness (top Hessian eigenvalue), mean ± std over "
             f"{m['settings']['seeds']} random starts, {m['settings']['steps']} steps:", "",
             "| surface | optimizer | loss | sharpness |", "| --- | --- | ---: | ---: |"]
    for surface, rows in r["table5"].items():
        for name, v in rows.items():
            lines.append(f"| {surface} | {name} | {v['loss_mean']:.4g} ± {v['loss_std']:.2g} "
                         f"| {v['sharpness_mean']:.4g} ± {v['sharpness_std']:.2g} |")
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
    lines += [f"Real tasks, mean ± std over {t['settings']['seeds']} seeds "
              f"(LSTM {t['settings']['lstm_steps']} steps, CNN {t['settings']['cnn_epochs']} "
              "epochs):", "",
              "| optimizer | char LSTM val. perplexity | digits CNN test accuracy | "
              "CNN train loss | CNN sharpness |", "| --- | ---: | ---: | ---: | ---: |"]
    for name in t["char_lstm"]:
        ppl = t["char_lstm"][name]["val_perplexity"]
        c = t["digits_cnn"][name]
        lines.append(f"| {name} | {ppl['mean']:.3f} ± {ppl['std']:.3f} | "
                     f"{c['test_accuracy']['mean']:.4f} ± {c['test_accuracy']['std']:.4f} | "
                     f"{c['train_loss']['mean']:.4f} ± {c['train_loss']['std']:.4f} | "
                     f"{c['sharpness']['mean']:.3f} ± {c['sharpness']['std']:.3f} |")
    d = r["buffer_over_training"]
    lines += ["", "Buffer over training (digits CNN), last record: " + "; ".join(
        f"{name}: variance {tr[-1]['variance']:.3g}, agreement {tr[-1]['agreement']:.3f}"
        for name, tr in d.items() if tr), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
