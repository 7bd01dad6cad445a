#!/usr/bin/env python
"""Every GPU figure in one command, for a session that is lent a CUDA device.

    python bench/gpu_check.py            # the GPU tests, the compile gate, host time and
                                         # the benchmark's quick sets for every optimizer
    python bench/gpu_check.py --full     # and the full sweep for AdamCM (longer)

Each part has a time limit (together 7.5 minutes for the default run, so it fits a
device call even if every part hits its limit); none of this has run on a GPU yet: the
limits are guesses, not measurements.

Writes under bench/results/ (commit them): ``gpu_check_<stamp>.txt``, a summary (device,
versions, commit, each part's outcome and its last lines), the test log, the host-time
table, and the benchmark's rows appended to ``results.jsonl`` with its table in
``gpu_<stamp>.txt``. Without a CUDA device it says so and exits with status 2.
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

    py = sys.executable
    parts = [
        run("GPU tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/"],
            path("gpu_tests"), 150),
        run("compile gate (default set)", [py, "-m", "pytest", "-q", "-s",
                                           "tests/test_compile_gate.py"],
            path("compile_gate"), 90),
        run("host time per step", [py, "bench/host_time.py",
                                   "--optimizer", "adamcm,adamcg,sgdcg,rmspropcg,adamam,sgdam"],
            path("host_time"), 60),
        run("benchmark", [py, "bench/run.py", "--optimizer", "all", "--buffer-dtype", "none,int8",
                          "--out", os.path.join(args.out_dir, "results.jsonl")],
            path("gpu"), 150),
    ]
    if args.full:
        parts.append(run("benchmark, full sweep", [py, "bench/run.py", "--full", "--out",
                                                   os.path.join(args.out_dir, "results.jsonl")],
                         path("gpu_full"), 600))
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
