"""Training a Hugging Face model with `transformers.Trainer` and a cm_fused optimizer.

Two ways to hand the optimizer to the Trainer:

* ``route="optimizers"``: build the optimizer (and its LR scheduler) yourself and pass
  ``optimizers=(optimizer, scheduler)``: you choose the param groups.
* ``route="cls_and_kwargs"``: pass ``optimizer_cls_and_kwargs=(AdamCM, {...})``: the
  Trainer builds it on its own param groups (no weight decay on biases and LayerNorm) and
  its scheduler from ``lr_scheduler_type``.

Either way the Trainer clips gradients (``max_grad_norm``), steps the optimizer, saves
``optimizer.state_dict()`` (the critical buffer included) to ``optimizer.pt`` in each
checkpoint, next to the scheduler's and the RNG states (dropout, and the optimizers'
``critical_test`` coins), and ``resume_from_checkpoint`` loads them all back
(``torch.load(..., weights_only=True)``) and continues the run bit for bit. Everything here runs on the CPU
in seconds: a 2-layer GPT-2 built from a config (nothing is downloaded) on synthetic tokens.

    python docs/examples/hf_trainer.py
"""
from __future__ import annotations

import os
import tempfile
from typing import NamedTuple

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                          TrainingArguments, get_cosine_schedule_with_warmup)

import cm_fused
from cm_fused import AdamCM

SEQ_LEN = 16
BATCH_SIZE = 4


class TokenData(torch.utils.data.Dataset):
    """Synthetic language: each sequence counts up from a random start by a random
    stride, mod the vocabulary; the model can learn it, so the loss falls."""

    def __init__(self, n=24, vocab=64, seq_len=SEQ_LEN, seed=1234):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(seq_len)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_model(seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


class Recorder(TrainerCallback):
    """Keeps what the Trainer logs at each step (``logging_steps=1``): the step's loss and
    the gradient norm before clipping, exactly as computed (fp32 values as Python floats)."""

    def __init__(self):
        self.losses, self.grad_norms = {}, {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]
            self.grad_norms[state.global_step] = logs.get("grad_norm")


class StopAt(TrainerCallback):
    """Ends training after step ``step`` (after its checkpoint is saved): an interrupted run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class Run(NamedTuple):
    losses: dict      # global step -> training loss of that step
    grad_norms: dict  # global step -> gradient norm before clipping
    trainer: Trainer


def train(output_dir, max_steps=8, *, route="optimizers", optimizer_cls=AdamCM,
          optimizer_kwargs=None, backend="auto", lr=3e-3, max_grad_norm=1.0,
          save_steps=None, stop_at=None, resume_from_checkpoint=None, seed=0,
          callbacks=()) -> Run:
    """Train the tiny GPT-2 for ``max_steps`` steps.

    save_steps: write ``output_dir/checkpoint-<step>`` every that many steps (None: never).
    stop_at: stop after that step, as if the job had been killed (the schedule still
        spans ``max_steps``).
    resume_from_checkpoint: a checkpoint directory to continue from.
    callbacks: more `TrainerCallback`s.
    """
    kwargs = dict(optimizer_kwargs or {}, lr=lr, backend=backend)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=lr,
        lr_scheduler_type="cosine",      # used by the cls_and_kwargs route
        warmup_steps=2,
        weight_decay=0.01,
        max_grad_norm=max_grad_norm,     # the Trainer clips before every optimizer step
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
    )
    model = make_model(seed)
    recorder = Recorder()
    callbacks = [recorder, *callbacks] + ([StopAt(stop_at)] if stop_at else [])
    if route == "optimizers":
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = optimizer_cls([{"params": decay, "weight_decay": 0.01},
                                   {"params": no_decay, "weight_decay": 0.0}], **kwargs)
        scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2,
                                                    num_training_steps=max_steps)
        trainer = Trainer(model=model, args=args, train_dataset=TokenData(),
                          optimizers=(optimizer, scheduler), callbacks=callbacks)
    elif route == "cls_and_kwargs":
        trainer = Trainer(model=model, args=args, train_dataset=TokenData(),
                          optimizer_cls_and_kwargs=(optimizer_cls, kwargs),
                          callbacks=callbacks)
    else:
        raise ValueError(f"route must be 'optimizers' or 'cls_and_kwargs', not {route!r}")
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return Run(recorder.losses, recorder.grad_norms, trainer)


if __name__ == "__main__":
    backend = "cpu" if cm_fused.backends()["cpu"] == "available" else "reference"
    with tempfile.TemporaryDirectory() as tmp:
        for route in ("optimizers", "cls_and_kwargs"):
            full = train(os.path.join(tmp, route, "full"), 8, route=route, backend=backend)
            part = os.path.join(tmp, route, "part")
            train(part, 8, route=route, backend=backend, save_steps=4, stop_at=4)  # killed at 4
            resumed = train(part, 8, route=route, backend=backend, save_steps=4,
                            resume_from_checkpoint=os.path.join(part, "checkpoint-4"))
            print(f"{route}: {type(full.trainer.optimizer.optimizer).__name__} on {backend}")
            for step in sorted(full.losses):
                again = resumed.losses.get(step)
                print(f"  step {step}: {full.losses[step]:.6f}"
                      + ("" if again is None else f"  resumed {again:.6f}"
                         f"  {'identical' if again == full.losses[step] else 'DIFFERENT'}"))
