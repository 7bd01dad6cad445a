"""Mixed precision as the training frameworks do it, with a cm_fused optimizer.

float16 autocast needs a loss scaler. The loop below is the one in PyTorch's AMP recipe,
which Lightning, Accelerate and the Hugging Face Trainer also use:

    scaler.scale(loss).backward()    # gradients of loss * scale
    scaler.unscale_(opt)             # divide them by the scale, note any inf/NaN
    clip_grad_norm_(params, max_norm)  # clipping sees the true gradients
    scaler.step(opt)                 # skipped (changes nothing) if a gradient overflowed
    scaler.update()                  # smaller scale after an overflow, larger now and then

cm_fused's optimizers take GradScaler's ``found_inf`` as torch's fused optimizers do: a
step with an overflowed gradient changes no parameter and no state. bfloat16 has float32's
range, so a bfloat16 autocast forward needs no scaler: ``GradScaler(enabled=False)`` turns
the same loop into plain ``backward``, ``clip_grad_norm_`` and ``opt.step()``.

Run ``python docs/examples/mixed_precision.py`` to train a small model both ways with
AdamCM and with torch's AdamW (which AdamCM is with ``kappa=0``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import cm_fused


def make_model(seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """A small regression MLP with float32 parameters (autocast narrows the compute)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 1)).to(device)


def batches(steps: int, batch: int = 16, seed: int = 1, device: str = "cpu"):
    """``steps`` (x, y) batches of a fixed random regression task, the same every call."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=gen)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, 8, generator=gen)
        y = torch.tanh(x @ w) + 0.1 * torch.randn(batch, 1, generator=gen)
        out.append((x.to(device), y.to(device)))
    return out


def make_scaler(dtype: torch.dtype, device: str = "cpu", *, init_scale: float = 2.0 ** 20,
                growth_factor: float = 3.0, backoff_factor: float = 0.25,
                growth_interval: int = 3) -> torch.amp.GradScaler:
    """A loss scaler for float16 autocast; disabled (a no-op) for bfloat16 or float32.

    The defaults make the scaler busy: the first scale overflows float16 at once, and the
    scale grows every 3 good steps (by 3, not a power of two) until it overflows again."""
    return torch.amp.GradScaler(device, init_scale=init_scale, growth_factor=growth_factor,
                                backoff_factor=backoff_factor,
                                growth_interval=growth_interval,
                                enabled=dtype == torch.float16)


def train_step(model, optimizer, scaler, x, y, *, dtype=torch.float16, max_norm=1.0,
               device_type: str = "cpu") -> torch.Tensor:
    """One step in the frameworks' order; returns the (unscaled, float32) loss."""
    optimizer.zero_grad()
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(x)
    loss = torch.nn.functional.mse_loss(out.float(), y)  # the loss in float32
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


@dataclass
class Run:
    losses: list[float] = field(default_factory=list)   # per step (before its update)
    scales: list[float] = field(default_factory=list)   # the scale each step ran with
    skipped: list[bool] = field(default_factory=list)   # the scaler skipped the step
    params: list[list[torch.Tensor]] = field(default_factory=list)  # after every step
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None

    @property
    def final_params(self) -> list[torch.Tensor]:
        return self.params[-1]


def train(make_optimizer: Callable, steps: int = 20, *, dtype: torch.dtype = torch.float16,
          max_norm: float = 1.0, seed: int = 0, device: str = "cpu",
          scaler_kwargs: dict | None = None) -> Run:
    """Train make_model(seed) for ``steps`` steps with ``make_optimizer(params)``.

    ``dtype``: the autocast dtype of the forward (float16: with a GradScaler; bfloat16 or
    float32: without one). Every run with the same arguments sees the same initial
    parameters and the same batches, so two optimizers' trajectories can be compared."""
    model = make_model(seed, device)
    optimizer = make_optimizer(model.parameters())
    scaler = make_scaler(dtype, device, **(scaler_kwargs or {}))
    run = Run(model=model, optimizer=optimizer, scaler=scaler)
    for x, y in batches(steps, device=device):
        scale = scaler.get_scale()  # (1.0 when disabled)
        loss = train_step(model, optimizer, scaler, x, y, dtype=dtype, max_norm=max_norm,
                          device_type=torch.device(device).type)
        run.losses.append(loss.item())
        run.scales.append(scale)
        # GradScaler backs the scale off exactly when the step found an inf/NaN gradient
        run.skipped.append(scaler.is_enabled() and scaler.get_scale() < scale)
        run.params.append([p.detach().clone() for p in model.parameters()])
    return run


if __name__ == "__main__":
    steps = 60
    for dtype in (torch.float16, torch.bfloat16):
        for name, make in [
            ("AdamCM", lambda p: cm_fused.AdamCM(p, lr=1e-2, weight_decay=0.01)),
            ("AdamCM kappa=0", lambda p: cm_fused.AdamCM(p, lr=1e-2, weight_decay=0.01,
                                                         kappa=0.0)),
            ("torch AdamW", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01)),
        ]:
            run = train(make, steps, dtype=dtype)
            print(f"{str(dtype):15} {name:15} loss {run.losses[0]:.4f} -> "
                  f"{run.losses[-1]:.4f}, {sum(run.skipped)} of {steps} steps skipped "
                  f"(overflow), final scale {run.scaler.get_scale():g}")
