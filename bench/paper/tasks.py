"""Two small real tasks with data that ships with a package (nothing is downloaded):

- a character-level LSTM language model on the text of Python's own documentation
  (``pydoc_data/topics.py``, in every Python install): validation perplexity, the
  analogue of the paper's Penn Treebank LSTM (lr 1e-3, topC 5, decay 0.7);
- a small CNN on scikit-learn's handwritten digits (8x8, 1797 images): test accuracy and
  the sharpness (top Hessian eigenvalue of the training loss) of the solution;

and the buffer's variance and agreement over training, Adam+CG against Adam+CM (the
paper's Fig. 10).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
from torch import nn

from common import make_optimizer, top_eigenvalue, train_step

# (Adam+CM int8: buffer_dtype=torch.int8, against Adam+CM's seed-to-seed spread)
TASK_OPTIMIZERS = ("Adam", "Adam+CG", "Adam+CM", "Adam+CM int8", "Adam+SAM+CM")
BUFFER = dict(topC=5, decay=0.7)  # the paper's LSTM settings, for both buffers


# ------------------------------------------------------------ character LSTM

def _text(chars: int) -> str:
    import pydoc_data.topics

    return Path(pydoc_data.topics.__file__).read_text(encoding="utf-8")[:chars]


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, 32)
        self.lstm = nn.LSTM(32, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


def char_lstm(name: str, seed: int, steps: int, chars: int = 200_000, seq: int = 64,
              batch: int = 32) -> dict:
    text = _text(chars)
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text])
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    torch.manual_seed(seed)
    model = CharLSTM(len(vocab))
    opt = make_optimizer(name, list(model.parameters()), lr=1e-3, **BUFFER)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        starts = torch.randint(0, len(train) - seq - 1, (batch,), generator=g)
        x = torch.stack([train[s:s + seq] for s in starts])
        y = torch.stack([train[s + 1:s + seq + 1] for s in starts])
        train_step(opt, lambda: loss_fn(model(x).flatten(0, 1), y.flatten()))
    with torch.no_grad():
        n = (len(val) - 1) // seq * seq
        x, y = val[:n].view(-1, seq), val[1:n + 1].view(-1, seq)
        val_loss = loss_fn(model(x).flatten(0, 1), y.flatten()).item()
    return {"val_perplexity": math.exp(val_loss)}


# ------------------------------------------------------------ digits CNN

def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(y))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64, 10))


def digits_cnn(name: str, seed: int, epochs: int, batch: int = 64, diagnostics_every: int = 0,
               sharpness_iters: int = 20) -> dict:
    (xt, yt), (xv, yv) = _digits()
    torch.manual_seed(seed)
    model = small_cnn()
    opt = make_optimizer(name, list(model.parameters()), lr=1e-3, **BUFFER)
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    trace, step = [], 0
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=g).split(batch):
            train_step(opt, lambda: loss_fn(model(xt[idx]), yt[idx]))
            step += 1
            if diagnostics_every and step % diagnostics_every == 0:
                d = opt.buffer_diagnostics()[0]
                trace.append({"step": step, **{k: v.item() for k, v in d.items()}})
    with torch.no_grad():
        acc = (model(xv).argmax(1) == yv).float().mean().item()
        train_loss = loss_fn(model(xt), yt).item()
    params = [p for p in model.parameters()]
    sharp = top_eigenvalue(lambda: loss_fn(model(xt), yt), params, iters=sharpness_iters)
    return {"test_accuracy": acc, "train_loss": train_loss, "sharpness": sharp,
            "diagnostics": trace}


# ------------------------------------------------------------ the experiments

def _summary(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values),
            "runs": values}


def real_tasks(seeds: int, lstm_steps: int, cnn_epochs: int, progress) -> dict:
    out = {"char_lstm": {}, "digits_cnn": {}}
    for name in TASK_OPTIMIZERS:
        progress(f"char LSTM: {name}, {seeds} seeds")
        runs = [char_lstm(name, s, lstm_steps) for s in range(seeds)]
        out["char_lstm"][name] = {"val_perplexity": _summary(runs, "val_perplexity")}
        progress(f"digits CNN: {name}, {seeds} seeds")
        runs = [digits_cnn(name, s, cnn_epochs) for s in range(seeds)]
        out["digits_cnn"][name] = {k: _summary(runs, k)
                                   for k in ("test_accuracy", "train_loss", "sharpness")}
    out["settings"] = {"lstm_steps": lstm_steps, "cnn_epochs": cnn_epochs, "seeds": seeds,
                       "lr": 1e-3, **BUFFER}
    return out


def buffer_over_training(epochs: int, progress) -> dict:
    """Buffer variance and agreement every 5 steps of the digits CNN, CG vs CM."""
    out = {}
    for name in ("Adam+CG", "Adam+CM"):
        progress(f"buffer diagnostics over training: {name}")
        out[name] = digits_cnn(name, 0, epochs, diagnostics_every=5,
                               sharpness_iters=1)["diagnostics"]
    return out
