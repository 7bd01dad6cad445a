"""Pure-bf16 training with and without stochastic rounding, against fp32 parameters.

The paper suite's digits CNN (bench/paper/tasks.py) trained by AdamCM with its
parameters in fp32, in bf16 rounded to nearest, and in bf16 with
``stochastic_rounding=True``; the lr decays along a cosine to 1% of its peak, so that late
updates fall under half a bf16 step of most weights (round to nearest loses them). The
forward and backward run in fp32 on fp32 copies of the bf16 weights (the gradient is
rounded to bf16), so that the parameters' storage is the only difference between the
runs. Reports the final training loss and test accuracy of each, per seed.

    python bench/paper/bf16_rounding.py [--seeds 3] [--epochs 40] [--backend cpu]

Writes bench/paper/results/bf16_rounding.md (--out).
"""
from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import git_commit, versions  # noqa: E402
from tasks import _digits, small_cnn  # noqa: E402

import cm_fused  # noqa: E402

RUNS = {"fp32 params": (torch.float32, False), "bf16, round to nearest": (torch.bfloat16, False),
        "bf16, stochastic rounding": (torch.bfloat16, True)}


def train(dtype: torch.dtype, stochastic: bool, seed: int, epochs: int, backend: str,
          lr: float = 3e-3, batch: int = 64) -> dict:
    (xt, yt), (xv, yv) = _digits()
    torch.manual_seed(seed)
    model = small_cnn()
    stored = [nn.Parameter(p.detach().to(dtype)) for p in model.parameters()]
    kw = dict(stochastic_rounding=True, rounding_seed=seed) if stochastic else {}
    opt = cm_fused.AdamCM(stored, lr=lr, backend=backend, **kw)
    total = epochs * math.ceil(len(yt) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0))))
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()

    def load():  # the model computes in fp32 from the stored values
        with torch.no_grad():
            for p, s in zip(model.parameters(), stored):
                p.copy_(s)

    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=g).split(batch):
            load()
            model.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            for p, s in zip(model.parameters(), stored):
                s.grad = p.grad.to(dtype)
            opt.step()
            sched.step()
    load()
    with torch.no_grad():
        return {"train_loss": loss_fn(model(xt), yt).item(),
                "test_accuracy": (model(xv).argmax(1) == yv).float().mean().item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    rows = []
    for label, (dtype, stochastic) in RUNS.items():
        runs = [train(dtype, stochastic, s, args.epochs, args.backend) for s in range(args.seeds)]
        losses = [r["train_loss"] for r in runs]
        accs = [r["test_accuracy"] for r in runs]
        rows.append(f"| {label} | {' / '.join(f'{x:.4f}' for x in losses)} | "
                    f"{statistics.mean(losses):.4f} | {' / '.join(f'{a:.3f}' for a in accs)} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# Pure-bf16 training: stochastic rounding against round to nearest",
        "",
        f"`python bench/paper/bf16_rounding.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f" ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit "
        f"{git_commit()}, {versions()}). AdamCM (topC 5) on the digits CNN, lr 3e-3 on a "
        f"cosine to 3e-5, {args.epochs} epochs, {args.backend} backend; seeds 0..{args.seeds - 1}.",
        "",
        "| params | final training loss per seed | mean | test accuracy per seed |",
        "|---|---|---|---|", *rows, ""])
    out = Path(args.out) / "bf16_rounding.md"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
