#!/usr/bin/env python
"""Bar chart of optimizer step time per provider, one panel per parameter set.

    python bench/plot.py                                   # latest run in bench/runs/results.jsonl
    python bench/plot.py bench/results/results.jsonl --run 20261122T160919Z --out step.png
    python bench/plot.py --run all --log

Bars are medians, whiskers the 20th..80th percentiles, bars grouped by configuration
(param dtype, buffer dtype, topC); the AdamW bars of a dtype are repeated in each of its
configurations as the baseline. Rows that were skipped or failed are listed under the
panel. Needs matplotlib (`pip install matplotlib`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_IN = os.path.join(HERE, "runs", "results.jsonl")  # run.py's default --out


def load(path: str, run: str) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        sys.exit(f"{path} holds no rows")
    if run == "latest":
        run = max(r["run_id"] for r in rows)
    if run != "all":
        rows = [r for r in rows if r["run_id"] == run]
        if not rows:
            sys.exit(f"no rows with run_id {run!r} in {path}")
    return rows


def _ms(y: float) -> str:
    """Milliseconds without exponents: 3020 ms, 15.2 ms, 0.981 ms."""
    return f"{y:.0f} ms" if y >= 100 else f"{y:.3g} ms"


def _short(text, n=70) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[:n - 3] + "..."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", default=DEFAULT_IN, help="JSON lines from bench/run.py")
    ap.add_argument("--run", default="latest", help="run_id to plot, 'latest' (default) or 'all'")
    ap.add_argument("--out", help="PNG path (default: next to the results, named after the run)")
    ap.add_argument("--log", action="store_true", default=None,
                    help="logarithmic time axis (default: when times in a panel span > 30x)")
    ap.add_argument("--linear", dest="log", action="store_false", help="linear time axis")
    args = ap.parse_args(argv)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/plot.py needs matplotlib, which is not installed here.\n"
              "Install it with:  python -m pip install matplotlib\n"
              "(the results themselves are in the JSON lines file; run.py does not need it)",
              file=sys.stderr)
        return 2

    rows = load(args.results, args.run)
    for r in rows:  # rows of runs before --optimizer existed are AdamCM's
        r.setdefault("optimizer", "adamcm")
    sets = list(dict.fromkeys((r["optimizer"], r["param_set"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}

    def cfg(r):
        return (r["param_dtype"], r["buffer_dtype"] or "-", r["topC"])

    widest = max(len({r["provider"] for r in rows if (r["optimizer"], r["param_set"]) == k})
                 for k in sets)
    fig, axes = plt.subplots(len(sets), 1, figsize=(max(8, 1.2 * widest + 6),
                                                    3.6 * len(sets)), squeeze=False)
    for ax, (oname, sname) in zip(axes[:, 0], sets):
        mine = [r for r in rows if (r["optimizer"], r["param_set"]) == (oname, sname)]
        ok = [r for r in mine if r["status"] == "ok"]
        # Configurations are those of the CM rows; AdamW rows (topC None) join each of their dtype.
        configs = sorted({cfg(r) for r in mine if r["topC"] is not None},
                         key=lambda c: (c[0], c[1], c[2])) or sorted({cfg(r) for r in mine},
                                                                      key=str)
        here = list(dict.fromkeys(r["provider"] for r in mine))  # run order: baseline first
        width = 0.8 / max(1, len(here))
        for pi, prov in enumerate(here):
            xs, ys, lo, hi, ratios = [], [], [], [], []
            for ci, c in enumerate(configs):
                for r in ok:
                    if r["provider"] != prov or r["param_dtype"] != c[0]:
                        continue
                    if r["topC"] is not None and cfg(r) != c:
                        continue
                    xs.append(ci + (pi - (len(here) - 1) / 2) * width)
                    ys.append(r["median_ms"])
                    lo.append(r["median_ms"] - r["p20_ms"])
                    hi.append(r["p80_ms"] - r["median_ms"])
                    ratios.append(r.get("ratio"))
                    break
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=prov, color=colors[prov])
                for x, y, top, q in zip(xs, ys, hi, ratios):
                    # above the whisker's cap, so the cap never strikes the label through
                    text = _ms(y) + (f"\nx{q:.2f}" if q is not None else "")
                    ax.annotate(text, (x, y + top), ha="center", va="bottom", fontsize=7,
                                xytext=(0, 3), textcoords="offset points")
        ax.margins(y=0.18)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([f"{d}, buf {b}, C={c if c is not None else '-'}"
                            for d, b, c in configs], fontsize=8)
        ax.set_ylabel("step time, ms (median)")
        times = [r["median_ms"] for r in ok]
        if args.log or (args.log is None and times and max(times) > 30 * min(times)):
            ax.set_yscale("log")
            ax.set_ylabel("step time, ms (median, log)")
        first = mine[0]
        ax.set_title(f"{oname}, {sname}: {first['numel'] / 1e6:.1f}M params in "
                     f"{first['tensors']} tensors", fontsize=10)
        missing = sorted({f"{r['provider']}: {r['status']} ({_short(r.get('reason'))})"
                          for r in mine if r["status"] != "ok"})
        if missing:
            ax.text(0.0, -0.22, "not measured: " + "; ".join(missing), transform=ax.transAxes,
                    fontsize=7, va="top")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # off the bars
    meta = rows[0]
    fig.suptitle(f"optimizer.step() on {meta['device']} | torch {meta['torch']} | "
                 f"commit {meta['commit']} | run {meta['run_id'] if args.run != 'all' else 'all'}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.results)),
                                   f"step_time_{meta['run_id'] if args.run != 'all' else 'all'}.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
