#!/usr/bin/env python
"""Every GPU figure in one command, for a session that is lent a CUDA device.

    python bench/gpu_check.py            # the GPU tests, host time, the benchmark's quick
                                         # sets for every optimizer and the GPU rows of
                                         # bench/gpu_rows.py
    python bench/gpu_check.py --full     # and the full sweep for AdamCM (longer)

Each part has a time limit, so that the default run fits one device call even if every
part hits its limit (``plan``: 485 s in all, under ~9 minutes):

    200 s  GPU tests (pytest -m gpu; the whole-iteration CUDA graph for every optimizer)
     60 s  host time per step (bench/host_time.py, six optimizers)
    150 s  benchmark (bench/run.py --optimizer all --buffer-dtype none,int8, the fused
           providers: torch_foreach, torch_fused, cm_triton)
     75 s  GPU rows (bench/gpu_rows.py: a CUDA-graph training iteration, 10,000 small
           tensors, 48 param groups, every optimizer against its torch counterpart on
           GPT-2-124M in fp32 and bf16 with slots as params and int8); it starts no row
           after 60 s, and keeps every row it finished

None of this has run on a GPU yet: the limits are guesses, not measurements. (The
compile gate needs no GPU: it runs in the default test command.) A part that
fails or runs out of time is reported (its status and last lines), and the next runs.

Writes under bench/results/ (commit them): ``gpu_check_<stamp>.txt``, a summary (device,
versions, commit, each part's outcome and its last lines), the test log, the host-time
table, the benchmark's rows appended to ``results.jsonl`` with its table in
``gpu_<stamp>.txt``, and the GPU rows appended to ``gpu_rows.jsonl`` with their table in
``gpu_rows_<stamp>.txt`` (their log in ``gpu_rows_log_<stamp>.txt``). Without a CUDA
device it says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)


def run(label: str, cmd: list[str], out_path: str, timeout: int) -> dict:
    """Run one part, its output to out_path; never raises (a failure is reported)."""
    t0 = time.perf_counter()
    print(f"[gpu_check] {label}: {' '.join(cmd)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=env)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"{e.stdout or ''}{e.stderr or ''}\nTIMED OUT after {timeout} s"
    with open(out_path, "w") as f:
        f.write(text)
    tail = "\n".join(text.strip().splitlines()[-12:])
    secs = time.perf_counter() - t0
    print(f"[gpu_check] {label}: rc={rc} in {secs:.0f} s", flush=True)
    return dict(label=label, rc=rc, seconds=secs, path=os.path.relpath(out_path, ROOT),
                tail=tail)


ROWS_S = 75  # the GPU rows' limit; it starts no row in its last 15 s (a row takes seconds)


def plan(out_dir: str, stamp: str, full: bool = False) -> list[tuple[str, list[str], str, int]]:
    """The parts: (label, arguments of the interpreter, log name, time limit in seconds)."""
    results = os.path.join(out_dir, "results.jsonl")
    parts = [
        ("GPU tests", ["-m", "pytest", "-q", "-m", "gpu", "tests/"], "gpu_tests", 200),
        ("host time per step", ["bench/host_time.py", "--optimizer",
                                "adamcm,adamcg,sgdcg,rmspropcg,adamam,sgdam"], "host_time", 60),
        # (the fused paths only: the reference and torch's for-loop on GPT-2-124M would
        # not fit the limit, and run.py writes its rows at the end)
        ("benchmark", ["bench/run.py", "--optimizer", "all", "--buffer-dtype", "none,int8",
                       "--providers", "torch_foreach,torch_fused,cm_triton",
                       "--out", results], "gpu", 150),
        ("GPU rows", ["bench/gpu_rows.py", "--out-dir", out_dir, "--stamp", stamp,
                      "--budget-s", str(ROWS_S - 15)], "gpu_rows_log", ROWS_S),
    ]
    if full:
        parts.append(("benchmark, full sweep", ["bench/run.py", "--full", "--out", results],
                      "gpu_full", 600))
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true",
                    help="also the full benchmark sweep for AdamCM (topC, dtypes, all sets)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device in this process; nothing to measure (the CPU test "
              "command is in the README)", file=sys.stderr)
        return 2
    import harness as H
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(args.out_dir, exist_ok=True)

    def path(name):
        return os.path.join(args.out_dir, f"{name}_{stamp}.txt")

    parts = [run(label, [sys.executable, *cmd], path(name), limit)
             for label, cmd, name, limit in plan(args.out_dir, stamp, args.full)]
    dev = torch.device("cuda")
    summary = [f"gpu_check {stamp}",
               f"device: {H.device_name(dev)} | versions: {H.versions()} | commit "
               f"{H.git_commit()}", ""]
    for p in parts:
        summary += [f"## {p['label']}: rc={p['rc']} ({p['seconds']:.0f} s), log {p['path']}",
                    p["tail"], ""]
    with open(path("gpu_check"), "w") as f:
        f.write("\n".join(summary))
    print("\n".join(summary))
    return 0 if all(p["rc"] == 0 for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
