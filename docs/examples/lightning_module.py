"""cm_fused under Lightning: a LightningModule whose ``configure_optimizers`` returns an
AdamCM and a per-step LR schedule, checkpointed by ``ModelCheckpoint`` and resumed with
``trainer.fit(model, ckpt_path=...)``; and the same model trained with SAM around AdamCM
under manual optimization.

Run ``python docs/examples/lightning_module.py``: it trains 8 steps, resumes a second run
from the step-4 checkpoint, and prints both runs' losses (equal, bit for bit).
``tests/test_integrations_lightning.py`` imports this file and calls :func:`train`.

What Lightning saves: ``checkpoint["optimizer_states"]`` is ``[opt.state_dict()]`` (the
critical buffer is in it as tensors; SAM's is its base optimizer's) and
``checkpoint["lr_schedulers"]`` is ``[scheduler.state_dict()]``. On resume Lightning
builds a fresh optimizer and scheduler with ``configure_optimizers``, then calls their
``load_state_dict``.
"""
from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cm_fused

BATCH = 16
BATCHES_PER_EPOCH = 4  # a checkpoint every 4 steps falls on an epoch's end (see train())


def make_data(n: int = BATCH * BATCHES_PER_EPOCH, d_in: int = 8, seed: int = 0) -> TensorDataset:
    """A fixed synthetic regression set: y = tanh(x·w) + noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def make_scheduler(opt: torch.optim.Optimizer, lr: float, total_steps: int):
    """OneCycle: warm up to ``lr`` and anneal, cycling Adam's beta1 (or SGD's momentum)
    too where the optimizer has one."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total_steps,
        cycle_momentum="betas" in opt.defaults or opt.defaults.get("momentum", 0) > 0)


class MLP(pl.LightningModule):
    """A two-layer MLP trained by any cm_fused optimizer (by name), with a OneCycle LR
    schedule stepped after every optimizer step."""

    def __init__(self, optimizer: str = "AdamCM", lr: float = 1e-2, backend: str = "cpu",
                 **optimizer_kwargs):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        self.optimizer_name, self.lr, self.backend = optimizer, lr, backend
        self.optimizer_kwargs = optimizer_kwargs
        self.losses: list[torch.Tensor] = []  # one per training step of this fit

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.losses.append(loss.detach().clone())
        return loss

    def make_optimizer(self) -> torch.optim.Optimizer:
        cls = getattr(cm_fused, self.optimizer_name)
        return cls(self.parameters(), lr=self.lr, backend=self.backend, **self.optimizer_kwargs)

    def configure_optimizers(self):
        opt = self.make_optimizer()
        scheduler = make_scheduler(opt, self.lr, total_steps=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(make_data(), batch_size=BATCH, shuffle=False, num_workers=0)


class SAMMLP(MLP):
    """The same model, trained by ``cm_fused.SAM`` around a cm_fused optimizer under
    manual optimization: two forward/backward passes per step."""

    def __init__(self, rho: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.rho = rho
        self.automatic_optimization = False

    def make_optimizer(self) -> torch.optim.Optimizer:
        base = getattr(cm_fused, self.optimizer_name)
        return cm_fused.SAM(self.parameters(), base, rho=self.rho, lr=self.lr,
                            backend=self.backend, **self.optimizer_kwargs)

    def training_step(self, batch, batch_idx):
        opt, scheduler = self.optimizers(), self.lr_schedulers()
        opt.zero_grad()
        loss = self.loss(batch)
        self.manual_backward(loss)  # the gradient at w

        def at_perturbed_point():  # called by SAM at w + e(w), after first_step
            self.manual_backward(self.loss(batch))

        # opt.step(closure) is SAM's first_step(zero_grad=True), the closure, second_step().
        # Calling opt.first_step()/opt.second_step() directly would train the same, but only
        # a step through Lightning's optimizer wrapper counts in trainer.global_step (which
        # max_steps and ModelCheckpoint(every_n_train_steps) follow).
        # ModelCheckpoint warns that it saves the weights after this step and suggests
        # keeping pre-step ones: don't; the post-step weights match the optimizer state and
        # global_step it saves, which is what an exact resume needs.
        opt.step(closure=at_perturbed_point)
        scheduler.step()
        self.losses.append(loss.detach().clone())


class Result(NamedTuple):
    losses: torch.Tensor          # the loss of each step this fit ran (before its update)
    state_dict: dict              # the model's parameters at the end
    lr: float                     # the scheduler's last lr
    optimizer: torch.optim.Optimizer  # the optimizer Lightning stepped (SAM for sam=True)


def train(root_dir: str, max_steps: int, ckpt_path: str | None = None, sam: bool = False,
          backend: str = "cpu", optimizer: str = "AdamCM", every_n_train_steps: int | None = 4,
          callbacks: list | tuple = (), seed: int = 0, **kwargs) -> Result:
    """Train (or, with ``ckpt_path``, resume) to ``max_steps`` steps, saving
    ``root_dir/checkpoints/step=K.ckpt`` every ``every_n_train_steps`` steps (None: no
    checkpoints). ``kwargs`` go to the optimizer (``lr``, ``topC``, ...; SAM: ``rho``).

    Make ``every_n_train_steps`` a multiple of BATCHES_PER_EPOCH to resume exactly: a plain
    DataLoader is not resumable mid-epoch (Lightning restarts the epoch's batches and
    warns).
    """
    pl.seed_everything(seed, verbose=False)
    model = (SAMMLP if sam else MLP)(optimizer=optimizer, backend=backend, **kwargs)
    callbacks = list(callbacks)
    if every_n_train_steps:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(root_dir, "checkpoints"),
                                         filename="{step}", save_top_k=-1,
                                         every_n_train_steps=every_n_train_steps))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                         callbacks=callbacks, enable_checkpointing=bool(every_n_train_steps),
                         default_root_dir=root_dir, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True)
    # weights_only=True: a cm_fused checkpoint holds only tensors and plain values
    trainer.fit(model, ckpt_path=ckpt_path, weights_only=True)
    return Result(torch.stack(model.losses),
                  {k: v.detach().clone() for k, v in model.state_dict().items()},
                  trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0],
                  trainer.optimizers[0])


if __name__ == "__main__":
    for sam in (False, True):
        with tempfile.TemporaryDirectory() as root:
            full = train(root, max_steps=8, sam=sam)
            ckpt = os.path.join(root, "checkpoints", "step=4.ckpt")
            with tempfile.TemporaryDirectory() as root2:
                resumed = train(root2, max_steps=8, ckpt_path=ckpt, sam=sam)
        name = "SAM(AdamCM)" if sam else "AdamCM"
        print(f"{name}: losses {[round(v, 4) for v in full.losses.tolist()]}")
        print(f"{name}: resumed at step 4: {[round(v, 4) for v in resumed.losses.tolist()]}")
        same = all(torch.equal(full.state_dict[k], resumed.state_dict[k]) for k in full.state_dict)
        print(f"{name}: final parameters bit-identical: {same}")
