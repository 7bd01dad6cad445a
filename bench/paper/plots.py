"""The suite's figures (PNG), drawn from its JSON results."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from surfaces import SURFACES  # noqa: E402

COLORS = {"Adam": "tab:gray", "Adam+CG": "tab:blue", "Adam+SAM": "tab:green",
          "Adam+CM": "tab:red", "Adam+CM int8": "tab:orange", "Adam+SAM+CM": "tab:purple"}


def trajectories(result: dict, out: Path) -> list[Path]:
    files = []
    for surface, runs in result.items():
        f, (x0, x1, y0, y1), best, _ = SURFACES[surface]
        xs, ys = torch.linspace(x0, x1, 200), torch.linspace(y0, y1, 200)
        X, Y = torch.meshgrid(xs, ys, indexing="xy")
        Z = f(torch.stack([X, Y], -1))
        fig, ax = plt.subplots(figsize=(6, 5))
        levels = torch.quantile(Z.flatten(), torch.linspace(0, 0.95, 30)).unique()
        ax.contourf(X, Y, Z, levels=levels.tolist(), cmap="Greys_r", alpha=0.8)
        for name, r in runs.items():
            for i, path in enumerate(r["paths"]):
                p = torch.tensor(path)
                ax.plot(p[:, 0], p[:, 1], color=COLORS[name], lw=1.2,
                        label=name if i == 0 else None)
                ax.plot(p[0, 0], p[0, 1], "o", color="black", ms=4)
                ax.plot(p[-1, 0], p[-1, 1], "*", color=COLORS[name], ms=9)
        ax.plot(*best, "x", color="gold", ms=10, mew=2, label="global minimum")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(f"{surface.replace('_', ' ')}: paths from the same starts")
        ax.legend(fontsize=7, loc="upper right")
        files.append(_save(fig, out / f"trajectories_{surface}.png"))
    return files


def escape(result: dict, out: Path) -> list[Path]:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, ratios in result["by_sharpness"].items():
        a.plot(result["sharpness"], ratios, "o-", color=COLORS[name], label=name)
    a.set_xscale("log", base=2)
    a.set_xlabel("sharpness s of the sharp well (Hessian eigenvalue s²)")
    a.set_ylabel("escape ratio")
    a.set_title("escape from the sharp well")
    a.legend(fontsize=8)
    b.plot(result["topC"], result["by_topC"], "o-", color=COLORS["Adam+CM"])
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
