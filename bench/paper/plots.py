"""The suite's figures (PNG), drawn from its JSON results."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from surfaces import SURFACES  # noqa: E402

# Adam in orange, not grey: a grey line vanishes on the grey surfaces of the trajectory
# plots. (Adam+CM int8 appears in no figure; brown keeps it distinct anyway.)
COLORS = {"Adam": "tab:orange", "Adam+CG": "tab:blue", "Adam+SAM": "tab:green",
          "Adam+CM": "tab:red", "Adam+CM int8": "tab:brown", "Adam+SAM+CM": "tab:purple"}
MARKERS = {"Adam": "o", "Adam+CG": "s", "Adam+SAM": "^", "Adam+CM": "D",
           "Adam+CM int8": "P", "Adam+SAM+CM": "v"}
LINESTYLES = {"Adam": "-", "Adam+CG": "--", "Adam+SAM": ":", "Adam+CM": "-",
              "Adam+CM int8": "-.", "Adam+SAM+CM": "-."}


def trajectories(result: dict, out: Path) -> list[Path]:
    files = []
    for surface, runs in result.items():
        f, (x0, x1, y0, y1), best, _ = SURFACES[surface]
        xs, ys = torch.linspace(x0, x1, 200), torch.linspace(y0, y1, 200)
        X, Y = torch.meshgrid(xs, ys, indexing="xy")
        Z = f(torch.stack([X, Y], -1))
        fig, ax = plt.subplots(figsize=(7, 6.4))
        # Levels at quantiles of the surface (its range spans orders of magnitude), the
        # top 5 % of values in the last colour (extend="max").
        levels = torch.quantile(Z.flatten(), torch.linspace(0, 0.95, 30)).unique()
        cs = ax.contourf(X, Y, Z, levels=levels.tolist(), cmap="Greys_r", alpha=0.8,
                         extend="max")
        cbar = fig.colorbar(cs, ax=ax, fraction=0.046, pad=0.03, spacing="proportional")
        cbar.set_label(f"f(x, y) ({surface.replace('_', ' ')}; levels at quantiles)")
        cbar.ax.yaxis.set_major_locator(MaxNLocator(8))
        for name, r in runs.items():
            for i, path in enumerate(r["paths"]):
                p = torch.tensor(path)
                ax.plot(p[:, 0], p[:, 1], color=COLORS[name], lw=1.2,
                        label=name if i == 0 else None)
                ax.plot(p[0, 0], p[0, 1], "o", color="black", ms=4)
                ax.plot(p[-1, 0], p[-1, 1], "*", color=COLORS[name], ms=9, mec="black",
                        mew=0.4)
        ax.plot(*best, "x", color="gold", ms=10, mew=2, label="global minimum")
        ax.plot([], [], "o", color="black", ms=4, ls="none", label="start")
        ax.plot([], [], "*", color="white", mec="black", mew=0.6, ms=9, ls="none",
                label="end (optimizer's colour)")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(f"{surface.replace('_', ' ')}: paths from the same starts")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4,
                  frameon=False)
        files.append(_save(fig, out / f"trajectories_{surface}.png"))
    return files


def escape(result: dict, out: Path) -> list[Path]:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4))
    curves = result["by_sharpness"]
    # Equal curves (e.g. several optimizers that never escape: all zeros) would hide each
    # other: each curve is drawn shifted by a small offset of its own, with its own marker
    # and line style, and the legend's title names the curves that coincide.
    names = list(curves)
    step = 0.012
    groups = []
    for name in names:
        for g in groups:
            if curves[g[0]] == curves[name]:
                g.append(name)
                break
        else:
            groups.append([name])
    for i, name in enumerate(names):
        shift = (i - (len(names) - 1) / 2) * step
        a.plot(result["sharpness"], [v + shift for v in curves[name]],
               marker=MARKERS[name], ls=LINESTYLES[name], color=COLORS[name], ms=5,
               label=name)
    a.set_xscale("log", base=2)
    a.set_xticks(result["sharpness"], [str(s) for s in result["sharpness"]])
    a.minorticks_off()
    a.set_xlabel("sharpness s of the sharp well (Hessian eigenvalue s²)")
    a.set_ylabel("escape ratio")
    a.set_title("escape from the sharp well")
    same = "; ".join(" = ".join(g) for g in groups if len(g) > 1)
    a.legend(fontsize=7, title_fontsize=7, loc="upper left",
             title=(f"equal curves: {same}\n" if same else "")
             + f"(each curve shifted by ≤ ±{step * (len(names) - 1) / 2:.3f} to stay visible)")
    b.plot(result["topC"], result["by_topC"], "o-", color=COLORS["Adam+CM"])
    b.set_xscale("log")
    b.set_xticks(result["topC"], [str(c) for c in result["topC"]])  # integers only
    b.minorticks_off()
    b.set_xlabel("buffer size topC")
    b.set_ylabel("escape ratio")
    b.set_title(f"Adam+CM, sharpness {result['sharpness_for_topC']}")
    for ax in (a, b):
        ax.set_ylim(-0.05, 1.05)
    return [_save(fig, out / "escape_ratio.png")]


def buffer_over_training(result: dict, out: Path) -> list[Path]:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, trace in result.items():
        steps = [t["step"] for t in trace]
        a.plot(steps, [t["variance"] for t in trace], color=COLORS[name], label=name)
        b.plot(steps, [t["agreement"] for t in trace], color=COLORS[name], label=name)
    a.set_yscale("log")
    a.set_title("buffer variance (mean ‖B_i − mean‖²)")
    b.set_title("agreement (cosine of the top-key slot with the others)")
    for ax in (a, b):
        ax.set_xlabel("step (digits CNN)")
        ax.legend(fontsize=8)
    return [_save(fig, out / "buffer_over_training.png")]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
