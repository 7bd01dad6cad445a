"""Adam+CM with all of its state in 8 bits against fp32 state, on the paper suite's tasks.

"Adam+CM 8-bit" is AdamCM with ``state_dtype=torch.int8`` (e4m3-coded moments),
``buffer_dtype=torch.int8`` (int8 slots, no running sum at topC 5) and
``min_8bit_size=0`` (every tensor 8-bit, the toy problems' two-element ones too);
"Adam+CM" keeps fp32 state. Both on their default backend (8-bit state: the reference
backend so far). Reports, per seed and as mean ± std: the char LSTM's validation
perplexity and the digits CNN's test accuracy and training loss (bench/paper/tasks.py),
and the escape ratio from the sharp well by sharpness (bench/paper/toy.py).

    python bench/paper/eight_bit_state.py [--seeds 3] [--lstm-steps 1000]
        [--cnn-epochs 30] [--starts 100] [--escape-steps 300]

Writes bench/paper/results/eight_bit_state.md (--out).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import git_commit, versions  # noqa: E402
from tasks import char_lstm, digits_cnn  # noqa: E402
from toy import escape_ratio  # noqa: E402

NAMES = ("Adam+CM", "Adam+CM 8-bit")
SHARPNESS = (4, 8, 16)


def _cell(values: list[float], digits: int) -> str:
    mean, std = statistics.mean(values), statistics.pstdev(values)
    runs = ", ".join(f"{v:.{digits}f}" for v in values)
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({runs})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lstm-steps", type=int, default=1000)
    ap.add_argument("--cnn-epochs", type=int, default=30)
    ap.add_argument("--starts", type=int, default=100)
    ap.add_argument("--escape-steps", type=int, default=300)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="cm_fused: backend 'auto' uses 'reference'")
    start = time.perf_counter()
    rows = {}
    for name in NAMES:
        lstm = [char_lstm(name, s, args.lstm_steps)["val_perplexity"] for s in range(args.seeds)]
        cnn = [digits_cnn(name, s, args.cnn_epochs) for s in range(args.seeds)]
        esc = [escape_ratio(name, sh, args.starts, args.escape_steps)[0] for sh in SHARPNESS]
        rows[name] = (lstm, cnn, esc)
        print(name, lstm, [c["test_accuracy"] for c in cnn], esc, flush=True)
    lines = [
        "# Adam+CM with 8-bit state against fp32 state",
        "",
        f"`python bench/paper/eight_bit_state.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit()}, "
        f"{versions()}, {time.perf_counter() - start:.0f} s. Mean ± std over seeds, "
        "each seed's value in brackets.",
        "",
        f"| state | char LSTM val. perplexity ({args.lstm_steps} steps) | digits CNN test "
        f"accuracy ({args.cnn_epochs} epochs) | CNN train loss |",
        "| --- | --- | --- | --- |",
    ]
    for name, (lstm, cnn, _) in rows.items():
        lines.append(f"| {name} | {_cell(lstm, 3)} | "
                     f"{_cell([c['test_accuracy'] for c in cnn], 4)} | "
                     f"{_cell([c['train_loss'] for c in cnn], 4)} |")
    lines += ["", f"Escape ratio from the sharp well ({args.starts} starts, "
              f"{args.escape_steps} steps), by sharpness:", "",
              "| state | " + " | ".join(f"s={s}" for s in SHARPNESS) + " |",
              "| --- |" + " ---: |" * len(SHARPNESS)]
    for name, (_, _, esc) in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{e:.2f}" for e in esc) + " |")
    out = Path(args.out) / "eight_bit_state.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines) + f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
