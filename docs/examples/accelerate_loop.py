"""A plain training loop under Hugging Face `accelerate` with a cm_fused optimizer, saved
mid-run with `accelerator.save_state` and resumed bit for bit with `accelerator.load_state`.

`save_state` writes the model, `optimizer.state_dict()` (the critical buffer included),
the LR scheduler, the RNG states (dropout continues exactly) and any object registered
with `register_for_checkpointing` (here, the step counter). On resume, the loop skips the
batches of the interrupted epoch with `accelerator.skip_first_batches`; a seedable sampler
(`use_seedable_sampler=True`, reshuffled from `data_seed + epoch`) gives every epoch the
same order in both runs.

    python docs/examples/accelerate_loop.py
"""
from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn

import cm_fused
from cm_fused import AdamCM

VOCAB, SEQ_LEN, BATCH_SIZE = 64, 16, 4


def token_data(n=24, seed=1234) -> torch.utils.data.TensorDataset:
    """Sequences counting up from a random start by a random stride, mod VOCAB."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return torch.utils.data.TensorDataset((start + stride * torch.arange(SEQ_LEN)) % VOCAB)


class TinyLM(nn.Module):
    """Next-token prediction from the current token and its position, with dropout."""

    def __init__(self, dim=32):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(SEQ_LEN, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                 nn.Dropout(0.1), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.head(h + self.mlp(h))


class Progress:
    """The step counter, saved and restored with the rest of the state."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


class Run(NamedTuple):
    losses: dict      # step -> loss of that step (a Python float, exactly the fp32 loss)
    model: nn.Module  # unwrapped
    optimizer: torch.optim.Optimizer  # the cm_fused optimizer (unwrapped)
    scheduler: torch.optim.lr_scheduler.LRScheduler


def train(checkpoint_dir, total_steps=8, *, optimizer_cls=AdamCM, optimizer_kwargs=None,
          backend="auto", lr=3e-3, max_grad_norm=1.0, save_at=None, stop_after=None,
          resume=False, seed=0) -> Run:
    """Train TinyLM for ``total_steps`` optimizer steps (several epochs of 6 batches).

    save_at: after that step, ``accelerator.save_state(checkpoint_dir)``.
    stop_after: return after that step, as if the job had been killed.
    resume: first ``accelerator.load_state(checkpoint_dir)``, then continue from there.
    """
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=seed))
    set_seed(seed)
    model = TinyLM()
    optimizer = optimizer_cls(model.parameters(), lr=lr, backend=backend,
                              **(optimizer_kwargs or {}))
    # OneCycleLR also cycles the momentum (Adam's beta1, SGD's/RMSprop's momentum),
    # through the param groups, where every cm_fused optimizer reads it at each step.
    cycle_momentum = "betas" in optimizer.defaults or "momentum" in optimizer.defaults
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                    cycle_momentum=cycle_momentum)
    # The loader's own generator keeps DataLoader's per-epoch seed draw off the global RNG,
    # which dropout uses.
    loader = torch.utils.data.DataLoader(token_data(), batch_size=BATCH_SIZE, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if resume:
        accelerator.load_state(checkpoint_dir)

    losses = {}
    model.train()
    while progress.step < total_steps:
        epoch, done = divmod(progress.step, len(loader))
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, done) if done else loader
        for (ids,) in batches:
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.step += 1
            losses[progress.step] = loss.item()
            if progress.step == save_at:
                accelerator.save_state(checkpoint_dir)
            if progress.step in (stop_after, total_steps):
                break
        if progress.step == stop_after:
            break
    return Run(losses, accelerator.unwrap_model(model), optimizer.optimizer, scheduler.scheduler)


if __name__ == "__main__":
    backend = "cpu" if cm_fused.backends()["cpu"] == "available" else "reference"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        full = train(None, 10, backend=backend)
        train(ckpt, 10, backend=backend, save_at=7, stop_after=7)  # killed after step 7
        resumed = train(ckpt, 10, backend=backend, resume=True)
        print(f"AdamCM on {backend}, checkpoint after step 7 (mid epoch 2)")
        for step, loss in full.losses.items():
            again = resumed.losses.get(step)
            print(f"  step {step:2d}: {loss:.6f}" + ("" if again is None else
                  f"  resumed {again:.6f}  {'identical' if again == loss else 'DIFFERENT'}"))
        same = all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(),
                                                      resumed.model.state_dict().values()))
        print("final parameters", "identical" if same else "DIFFERENT")
