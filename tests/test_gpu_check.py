"""bench/gpu_check.py and bench/gpu_rows.py without a GPU: every row's code at toy sizes on
CPU (the C++ backend, else the reference), a failing row recorded while the next one still
runs, rows past the time budget skipped, and the default parts' time limits within one
device call. On a CUDA device the same code runs at the real sizes (bench/gpu_check.py)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = str(Path(__file__).resolve().parent.parent / "bench")
_saved_path = list(sys.path)
sys.path.insert(0, BENCH)
try:
    import gpu_check
    import gpu_rows
    import harness as H
finally:  # bench/ holds run.py, memory.py, distributed.py: keep them off other tests' path
    sys.path[:] = _saved_path

CPU = torch.device("cpu")
COUNTERPARTS = {"adamcm": "torch_adamw_fused", "adamcg": "torch_adam_fused",
                "sgdcg": "torch_sgd_fused", "rmspropcg": "torch_rmsprop_foreach",
                "adamam": "torch_adamw_fused", "sgdam": "torch_sgd_fused"}
ONE_DEVICE_CALL_S = 9 * 60


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The command as gpu_check runs it, at toy sizes on CPU (one thread: torch's fused CPU
    steps wait ~100 ms per step for a taken core on a busy 2-core machine)."""
    out = tmp_path_factory.mktemp("gpu_rows")
    threads = torch.get_num_threads()
    try:
        rc = gpu_rows.main(["--device", "cpu", "--tiny", "--out-dir", str(out),
                            "--stamp", "test", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (out / "gpu_rows.jsonl").read_text().splitlines()]
    return rc, rows, (out / "gpu_rows_test.txt").read_text()


def _positive(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def test_every_row_is_measured_at_toy_sizes_on_cpu(tiny_run):
    rc, rows, table = tiny_run
    assert rc == 0, [(r["label"], r["reason"]) for r in rows if r["status"] == "error"]
    assert [r["row"] for r in rows[:3]] == ["cuda graph", "small tensors", "param groups"]
    assert rows[1]["label"] == "small tensors: adamcm, 60 tensors of 8-16, fp32"
    assert rows[2]["label"] == "param groups: adamcm, gpt2-d16 in 6 groups (lr per group), fp32"
    assert rows[2]["groups"] == 6 and rows[1]["tensors"] == 60
    # every optimizer against its torch counterpart, fp32 and bf16, slots as params and int8
    counterparts = [r for r in rows if r["row"] == "counterpart"]
    assert sorted((r["optimizer"], r["param_dtype"], r["buffer_dtype"] or "-")
                  for r in counterparts) == sorted(
        (o, d, b) for o in COUNTERPARTS for d in ("fp32", "bf16")
        for b in (("-", "int8") if H.OPTIMIZERS[o].buffered else ("-",)))
    assert len(rows) == 3 + len(counterparts)
    for r in rows[1:]:
        assert r["status"] == "ok", (r["label"], r["reason"])
        assert r["provider"] in ("cm_cpu", "cm_reference")
        assert r["baseline"] == COUNTERPARTS[r["optimizer"]], r["label"]
        for k in ("median_ms", "host_ms", "baseline_ms", "baseline_host_ms", "ratio"):
            assert _positive(r[k]), (r["label"], k, r[k])
        assert r["ratio_p20"] <= r["ratio"] <= r["ratio_p80"]
    for r in rows:
        assert r["run_id"] == "test" and r["device_type"] == "cpu"
        assert r["torch"] == torch.__version__ and r["triton"] and r["commit"]
        assert r["label"] in table
    assert f"{len(rows)} of {len(rows)} rows done" in table


def test_the_cuda_graph_row_says_it_needs_cuda(tiny_run):
    _, rows, table = tiny_run
    (graph,) = [r for r in rows if r["row"] == "cuda graph"]
    assert graph["status"] == "skipped" and "needs CUDA" in graph["reason"]
    assert graph["label"] == ("cuda graph: adamcm, MLP 2x32 (batch 8), "
                              "forward+backward+step")
    assert "skipped: needs CUDA" in table


def test_a_failing_row_is_recorded_and_the_next_still_runs():
    def boom():
        raise RuntimeError("deliberate failure\nsecond line")

    ctx = gpu_rows.Context(CPU, gpu_rows.TINY, gpu_rows.cm_provider(CPU))
    small = gpu_rows.plan(ctx)[1]
    specs = [gpu_rows.Spec("broken", "adamcm", "raises", {}, boom), small]
    seen = []
    rows = gpu_rows.run_specs(specs, dict(run_id="t"), CPU, math.inf, seen.append)
    assert seen == rows and len(rows) == 2
    assert rows[0]["status"] == "error"
    assert rows[0]["reason"] == "RuntimeError: deliberate failure"
    assert rows[1]["status"] == "ok" and _positive(rows[1]["median_ms"])
    meta = dict(run_id="t", device="cpu", torch="-", triton="-", cm_fused="-", commit="-")
    assert "broken: adamcm, raises" in gpu_rows.table(meta, rows, 2)
    assert "error: RuntimeError: deliberate failure" in gpu_rows.table(meta, rows, 2)


def test_rows_past_the_budget_are_skipped_not_run():
    def must_not_run():
        raise AssertionError("a row started after the budget was spent")

    specs = [gpu_rows.Spec("late", "adamcm", str(i), {}, must_not_run) for i in range(2)]
    rows = gpu_rows.run_specs(specs, {}, CPU, -math.inf)
    assert [(r["status"], r["reason"]) for r in rows] == [("skipped", gpu_rows.OUT_OF_TIME)] * 2


def test_param_groups_reach_the_optimizer(monkeypatch):
    split = gpu_rows.layer_lr_groups(6, 1e-3)
    seen, made = [], []
    make = H.make_optimizer

    def record(*args, **kwargs):
        made.append(make(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(H, "make_optimizer", record)

    def spy(params):
        seen.append((params, split(params)))
        return seen[-1][1]

    params, grads = H.make_tensors(gpu_rows.TINY.shapes, torch.float32, CPU, 3)
    H.measure(H.PROVIDERS["cm_reference"], params, grads, CPU, topC=2, buffer_dtype=None,
              reps=1, warmup=1, optimizer="adamcm", baseline=H.PROVIDERS["torch_fused"],
              groups=spy)
    assert len(seen) == 2  # the package's optimizer and its baseline
    assert [len(o.param_groups) for o in made] == [6, 6]
    assert type(made[0]).__name__ == "AdamCM" and made[1].defaults["fused"]
    for flat, groups in seen:
        assert len(flat) == len(params) == 16
        # consecutive slices covering every tensor once, in order
        joined = [p for g in groups for p in g["params"]]
        assert len(joined) == len(flat) and all(a is b for a, b in zip(joined, flat))
        assert sorted({len(g["params"]) for g in groups}) == [2, 3]
        lrs = [g["lr"] for g in groups]
        assert lrs[-1] == 1e-3 and lrs[0] == pytest.approx(1e-3 * 0.9 ** 5)
        assert all(a < b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ValueError, match="non-empty groups"):
        split([torch.zeros(1)] * 5)


def test_the_default_gpu_check_fits_one_device_call():
    parts = gpu_check.plan("OUT", "STAMP")
    total = sum(limit for *_, limit in parts)
    assert total < ONE_DEVICE_CALL_S
    assert f"{total} s in all" in gpu_check.__doc__  # the docstring's budget is this one
    (rows,) = [p for p in parts if p[1][0] == "bench/gpu_rows.py"]
    _, cmd, name, limit = rows
    assert cmd[cmd.index("--out-dir") + 1] == "OUT" and cmd[cmd.index("--stamp") + 1] == "STAMP"
    assert 0 < float(cmd[cmd.index("--budget-s") + 1]) < limit
    assert name != "gpu_rows"  # its log must not overwrite the table gpu_rows writes
    assert len(gpu_check.plan("OUT", "STAMP", full=True)) == len(parts) + 1
