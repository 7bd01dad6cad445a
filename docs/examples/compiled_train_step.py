"""torch.compile of a whole training step (forward, loss, backward, optimizer step,
zero_grad) with a cm_fused optimizer.

    @torch.compile
    def train_step(x, y):
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

Dynamo cannot put all of it in one graph; on torch 2.13 it makes TWO graphs with TWO
graph breaks, compiled on the first call and reused by every later one:

1. the forward and the loss (AOTAutograd compiles its backward alongside);
   ``loss.backward()`` is a graph break (dynamo does not trace ``Tensor.backward``
   unless compiled autograd is on), so the backward runs eagerly, through graph 1's
   compiled backward;
2. ``optimizer.step()``, resumed after the backward: the whole step, every parameter, in
   one graph (on the ``cpu`` backend one fused C++ op; on ``reference``, the reference's
   tensor ops); ``optimizer.zero_grad()`` is a graph break (dynamo skips
   ``Optimizer.zero_grad`` on purpose) and runs eagerly. The frame resumed after it only
   returns ``loss``: no operation, no graph.

The optimizer's state is created inside the first traced step (its tensors become graph
attributes), so the second call finds the same guards and nothing recompiles.

Run ``python docs/examples/compiled_train_step.py`` to compare a compiled run with an
eager one (the first call compiles for tens of seconds on a small CPU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch._dynamo.utils import counters

import cm_fused


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 1))


def batches(steps: int, batch: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 8, generator=gen), torch.randn(batch, 1, generator=gen))
            for _ in range(steps)]


def make_train_step(model, optimizer, loss_fn=torch.nn.functional.mse_loss):
    """The whole training step as one Python function, to compile or to run eagerly."""
    def train_step(x, y):
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss
    return train_step


def compile_stats() -> dict:
    """What dynamo has compiled since the last ``torch._dynamo.reset()`` and
    ``counters.clear()``: graphs (a recompilation adds one) and graph breaks (by reason)."""
    return dict(graphs=counters["stats"]["unique_graphs"],
                graph_breaks=sum(counters["graph_break"].values()),
                break_reasons=[r.splitlines()[0] for r in counters["graph_break"]])


@dataclass
class Run:
    losses: list[float] = field(default_factory=list)
    graphs: list[int] = field(default_factory=list)  # graphs compiled so far, per step
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    stats: dict = field(default_factory=dict)         # compile_stats() at the end

    @property
    def params(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.model.parameters()]


def train(make_optimizer: Callable, steps: int = 6, *, compile: bool = True,
          compiler: str = "inductor", seed: int = 0) -> Run:
    """``steps`` training steps of make_model(seed) with ``make_optimizer(params)``, the
    step compiled (``compiler``: torch.compile's backend) or eager. Compiling resets
    dynamo first (its caches and counters are global), so the stats are this run's."""
    model = make_model(seed)
    optimizer = make_optimizer(model.parameters())
    step = make_train_step(model, optimizer)
    if compile:
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(step, backend=compiler)
    run = Run(model=model, optimizer=optimizer)
    for x, y in batches(steps):
        run.losses.append(step(x, y).item())
        run.graphs.append(compile_stats()["graphs"])
    run.stats = compile_stats()
    return run


if __name__ == "__main__":
    import time

    for backend in ("cpu", "reference"):
        make = lambda p: cm_fused.AdamCM(p, lr=1e-2, weight_decay=0.01,  # noqa: E731
                                         backend=backend)
        start = time.perf_counter()
        compiled = train(make, steps=20)
        seconds = time.perf_counter() - start
        eager = train(make, steps=20, compile=False)
        diff = max((a - b).abs().max().item() for a, b in zip(compiled.params, eager.params))
        print(f"AdamCM on {backend!r}: {seconds:.1f} s compiled (first call included), "
              f"loss {compiled.losses[0]:.4f} -> {compiled.losses[-1]:.4f}; "
              f"{compiled.stats['graphs']} graphs, {compiled.stats['graph_breaks']} graph "
              f"breaks ({'; '.join(compiled.stats['break_reasons'])}); "
              f"max |compiled - eager| over the params {diff:.2e}")
