"""The toy experiments: trajectories on the test surfaces, the final loss and sharpness
table (the paper's Table 5), and the escape ratio from a sharp well (Fig. 5 and 12).

Each start is one two-element parameter with its own optimizer, as a user would run it
(one tensor: its key is its own gradient norm).
"""
from __future__ import annotations

import statistics

import torch

from common import NAMES, make_optimizer, top_eigenvalue, train_step
from surfaces import SURFACES, two_wells

# Learning rates per surface: a step that crosses a basin of the surface in tens of
# steps (the surfaces' scales differ by orders of magnitude).
LR = {"goldstein_price": 0.01, "ackley": 0.05, "levy": 0.05, "ackley_rosenbrock": 0.02}
# Fixed starts of the trajectory plots (inside each plotting box).
STARTS = {"goldstein_price": [(-1.5, 1.5), (1.2, 1.0), (0.5, -1.8)],
          "ackley": [(-3.2, 2.6), (2.4, 3.1), (3.3, -2.2)],
          "levy": [(-5.0, 4.5), (4.0, -4.5), (-4.5, -3.0)],
          "ackley_rosenbrock": [(-1.5, 2.5), (2.5, -1.5), (-1.0, -1.5)]}


def run(f, start, name: str, lr: float, steps: int, **buffer) -> torch.Tensor:
    """The path [steps + 1, 2] of one optimizer from one start."""
    p = torch.nn.Parameter(torch.tensor(start, dtype=torch.float32))
    opt = make_optimizer(name, [p], lr, **buffer)
    path = [p.detach().clone()]
    for _ in range(steps):
        train_step(opt, lambda: f(p))
        path.append(p.detach().clone())
    return torch.stack(path)


def trajectories(steps: int, progress) -> dict:
    out = {}
    for surface, (f, box, best, fbest) in SURFACES.items():
        out[surface] = {}
        for name in NAMES:
            progress(f"trajectories: {surface}, {name}")
            paths = [run(f, s, name, LR[surface], steps) for s in STARTS[surface]]
            out[surface][name] = {"paths": [[[round(v, 4) for v in xy] for xy in p.tolist()]
                                            for p in paths],
                                  "final_loss": [f(p[-1]).item() for p in paths]}
    return out


def _sharpness(f, point) -> float:
    p = torch.nn.Parameter(torch.tensor(point, dtype=torch.float32))
    return top_eigenvalue(lambda: f(p), [p], iters=30)


def table(surfaces: list[str], seeds: int, steps: int, progress) -> dict:
    """Final loss and sharpness (top Hessian eigenvalue), mean and std over seeds, from
    starts uniform in the surface's box."""
    out = {}
    for surface in surfaces:
        f, (x0, x1, y0, y1), _, _ = SURFACES[surface]
        g = torch.Generator().manual_seed(0)
        starts = [(x0 + (x1 - x0) * torch.rand(1, generator=g).item(),
                   y0 + (y1 - y0) * torch.rand(1, generator=g).item()) for _ in range(seeds)]
        out[surface] = {}
        for name in NAMES:
            progress(f"table: {surface}, {name}")
            ends = [run(f, s, name, LR[surface], steps)[-1].tolist() for s in starts]
            losses = [f(torch.tensor(e)).item() for e in ends]
            sharp = [_sharpness(f, e) for e in ends]
            out[surface][name] = {"loss_mean": statistics.mean(losses),
                                  "loss_std": statistics.pstdev(losses),
                                  "sharpness_mean": statistics.mean(sharp),
                                  "sharpness_std": statistics.pstdev(sharp)}
    return out


ESCAPE_LR = 0.05
SHARP_AT = (3.0, 0.0)


def escape_ratio(name: str, sharpness: float, starts: int, steps: int,
                 **buffer) -> tuple[float, float]:
    """Of the runs started inside the sharp well (normal around its bottom, std
    0.25/sharpness): the fraction that end in the flat well (within distance 1.5 of the
    origin: the escape ratio), and the fraction that end outside the sharp well (beyond
    3/sharpness of its bottom: left it, wherever they went)."""
    f = two_wells(sharpness, SHARP_AT)
    g = torch.Generator().manual_seed(1)
    escaped = left = 0
    for _ in range(starts):
        start = (torch.tensor(SHARP_AT) + 0.25 / sharpness * torch.randn(2, generator=g))
        end = run(f, start.tolist(), name, ESCAPE_LR, steps, **buffer)[-1]
        escaped += bool(end.norm() < 1.5)
        left += bool((end - torch.tensor(SHARP_AT)).norm() > 3 / sharpness)
    return escaped / starts, left / starts


def escape(sharpnesses: list[float], top_cs: list[int], starts: int, steps: int,
           progress) -> dict:
    by_sharpness, left = {}, {}
    for name in NAMES:
        progress(f"escape ratio vs sharpness: {name}")
        runs = [escape_ratio(name, s, starts, steps) for s in sharpnesses]
        by_sharpness[name], left[name] = [r[0] for r in runs], [r[1] for r in runs]
    fixed = sharpnesses[len(sharpnesses) // 2]
    progress(f"escape ratio vs topC (Adam+CM, sharpness {fixed})")
    by_c = [escape_ratio("Adam+CM", fixed, starts, steps, topC=c)[0] for c in top_cs]
    return {"sharpness": sharpnesses, "by_sharpness": by_sharpness, "left": left,
            "topC": top_cs, "sharpness_for_topC": fixed, "by_topC": by_c,
            "lr": ESCAPE_LR, "steps": steps, "starts": starts, "sharp_at": SHARP_AT}
