"""The two-dimensional test functions of the paper's toy experiments, in torch.

Each takes a tensor whose last dimension is 2 (x, y) and returns the value per point.
``SURFACES`` lists them with their plotting box and the minimum the literature gives.
"""
from __future__ import annotations

import math

import torch


def goldstein_price(p):
    x, y = p[..., 0], p[..., 1]
    a = 1 + (x + y + 1) ** 2 * (19 - 14 * x + 3 * x ** 2 - 14 * y + 6 * x * y + 3 * y ** 2)
    b = 30 + (2 * x - 3 * y) ** 2 * (18 - 32 * x + 12 * x ** 2 + 48 * y - 36 * x * y
                                     + 27 * y ** 2)
    return a * b


def ackley(p):
    x, y = p[..., 0], p[..., 1]
    r = torch.sqrt(0.5 * (x ** 2 + y ** 2) + 1e-12)  # (+1e-12: a finite gradient at 0)
    return (-20 * torch.exp(-0.2 * r)
            - torch.exp(0.5 * (torch.cos(2 * math.pi * x) + torch.cos(2 * math.pi * y)))
            + math.e + 20)


def levy(p):
    w1, w2 = 1 + (p[..., 0] - 1) / 4, 1 + (p[..., 1] - 1) / 4
    return (torch.sin(math.pi * w1) ** 2
            + (w1 - 1) ** 2 * (1 + 10 * torch.sin(math.pi * w1 + 1) ** 2)
            + (w2 - 1) ** 2 * (1 + torch.sin(2 * math.pi * w2) ** 2))


def ackley_rosenbrock(p):
    """Ackley's many sharp local minima on Rosenbrock's curved valley (scaled by 1/100),
    both minimal at (1, 1) after Ackley is moved there."""
    x, y = p[..., 0], p[..., 1]
    return ackley(p - 1) + ((1 - x) ** 2 + 100 * (y - x ** 2) ** 2) / 100


# name -> (function, plotting box (x0, x1, y0, y1), global minimum point, its value)
SURFACES = {
    "goldstein_price": (goldstein_price, (-2.0, 2.0, -2.0, 2.0), (0.0, -1.0), 3.0),
    "ackley": (ackley, (-4.0, 4.0, -4.0, 4.0), (0.0, 0.0), 0.0),
    "levy": (levy, (-6.0, 6.0, -6.0, 6.0), (1.0, 1.0), 0.0),
    "ackley_rosenbrock": (ackley_rosenbrock, (-2.0, 3.0, -2.0, 3.0), (1.0, 1.0), 0.0),
}


def two_wells(sharpness: float, sharp_at=(3.0, 0.0)):
    """The escape family: two Gaussian wells of depth 1, a flat one at the origin (unit
    width: Hessian eigenvalue 1 at its bottom) and a sharp one at ``sharp_at`` of width
    1/sharpness (Hessian eigenvalue sharpness² at its bottom):

        f(p) = -exp(-|p|²/2) - exp(-sharpness²·|p - c|²/2)
    """
    c = torch.tensor(sharp_at)

    def f(p):
        return (-torch.exp(-(p ** 2).sum(-1) / 2)
                - torch.exp(-sharpness ** 2 * ((p - c) ** 2).sum(-1) / 2))

    return f
