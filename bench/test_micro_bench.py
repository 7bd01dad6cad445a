"""pytest-benchmark micro-benchmarks of one optimizer step, plus checks of the harness.

Not part of the default test run (pytest.ini: testpaths = tests). Run them with

    python -m pytest bench/test_micro_bench.py
    python -m pytest bench/test_micro_bench.py --benchmark-only --benchmark-columns=min,median,iqr,rounds

A small GPT-2-shaped list (d=128, 2 layers: ~0.7M parameters in 28 tensors), fp32, each
provider that can run on this device; the others are skipped with the reason. Each round
gets the next of three pre-made gradient sets (in pytest-benchmark's untimed setup), after
topC+3 warm-up steps that fill the buffer. On CUDA the timed call ends with a synchronize.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import param_sets  # noqa: E402

SHAPES = param_sets.SETS["gpt2-tiny"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOPC = 5

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # the harness checks still run; the benchmarks say why they do not
    @pytest.fixture
    def benchmark():
        pytest.skip("pytest-benchmark is not installed (python -m pip install pytest-benchmark)")


# ---------------------------------------------------------------- harness checks (fast)

def test_byte_model_matches_the_design_numbers():
    f32, bf16 = torch.float32, torch.bfloat16
    assert H.bytes_per_step("torch", 1, f32) == 28
    assert H.bytes_per_step("torch", 1, bf16) == 14
    assert H.bytes_per_step("cm", 1, f32) == 48
    assert H.bytes_per_step("cm", 1, f32, bf16) == 44          # bf16 slots save 4 B
    assert H.bytes_per_step("cm", 1, bf16) == 28               # bf16 params, slots, fp32 S
    assert H.bytes_per_step("cm", 1, f32, replaced=False) == 36
    assert H.bytes_per_step("cm", 1000, f32) == 48_000
    assert H.bytes_per_step("cm", 1, f32, optimizer="adamcg") == 48
    assert H.bytes_per_step("cm", 1, f32, single_pass=True) == 44  # the norm in the update
    assert H.single_pass(H.PROVIDERS["cm_cpu"], "adamcm", f32)
    assert not H.single_pass(H.PROVIDERS["cm_cpu"], "adamcm", bf16)
    assert not H.single_pass(H.PROVIDERS["cm_cpu"], "adamcg", f32)
    for o in ("sgdcg", "rmspropcg"):  # momentum SGD / RMSprop: 20 B; + g, S, slot, S
        assert H.bytes_per_step("torch", 1, f32, optimizer=o) == 20
        assert H.bytes_per_step("cm", 1, f32, optimizer=o) == 40
    # adaptive memory: a reduce pass over g, d, v, p (AdamAM); g, d, p (SGDAM, with wd)
    assert H.bytes_per_step("cm", 1, f32, optimizer="adamam") == 44
    assert H.bytes_per_step("cm", 1, f32, optimizer="sgdam") == 32
    assert H.bytes_per_step("torch", 1, f32, optimizer="sgdam") == 20
    # torchao's AdamW8bit: p, g and the write of p (12 B), m and v one byte each way
    # and a scale per 256 (4.0625 B)
    assert H.bytes_per_step("peer", 256, f32) == 256 * 12 + 4 * 260


def test_the_peer_runs_only_when_named_and_only_beside_adamw():
    """(bench/run.py's default providers leave it out: its compiled step is slow here)"""
    peer = H.PROVIDERS["torchao_adamw8bit"]
    assert peer.explicit and peer.kind == "peer"
    reason = H.why_not(peer, torch.device("cpu"), torch.float32, "adamcg")
    assert reason is not None and "AdamW-based" in reason


def test_paired_measurement_alternates_with_the_baseline():
    params, grads = H.make_tensors(SHAPES[:6], torch.float32, torch.device("cpu"), 3)
    res = H.measure(H.PROVIDERS["cm_reference"], params, grads, torch.device("cpu"), topC=2,
                    buffer_dtype=None, reps=4, warmup=1, optimizer="sgdcg",
                    baseline=H.PROVIDERS["torch_fused"])
    assert res["reps"] == 4 and res["paired_ratio_p20"] <= res["paired_ratio"]
    assert res["paired_ratio"] <= res["paired_ratio_p80"] and res["paired_baseline_ms"] > 0


def test_quantiles_interpolate():
    q = H.quantiles([5.0, 1.0, 2.0, 3.0, 4.0])
    assert q["median_ms"] == 3.0 and q["min_ms"] == 1.0
    assert q["p20_ms"] == pytest.approx(1.8) and q["p80_ms"] == pytest.approx(4.2)


def test_param_sets_have_the_published_sizes():
    assert param_sets.numel("gpt2-124m") == 124_439_808     # HF gpt2, tied head
    assert param_sets.numel("resnet18") == 11_689_512       # torchvision resnet18
    assert param_sets.numel("resnet50") == 25_557_032       # torchvision resnet50
    assert len(param_sets.SETS["gpt2-11m"]) == 148


def test_gradient_sets_are_fresh_and_nonzero():
    params, grads = H.make_tensors(SHAPES[:4], torch.float32, torch.device("cpu"), 3)
    assert len(grads) == 3
    for gs in grads:
        assert all(g.abs().sum() > 0 for g in gs)
    assert not torch.equal(grads[0][0], grads[1][0])


def test_a_slot_is_replaced_every_timed_step():
    """The byte model assumes a replacement per step: check the keys say so."""
    params, grads = H.make_tensors(SHAPES, torch.float32, torch.device("cpu"), 3)
    ps = [torch.nn.Parameter(p) for p in params]
    opt = H.make_optimizer(H.PROVIDERS["cm_reference"], ps, TOPC, None, "adamcm")
    for i in range(TOPC + 6):
        H.set_grads(ps, grads[i % 3])
        before = opt.state[ps[0]]["cm_keys"].clone() if i >= TOPC else None
        opt.step()
        if before is not None:  # full buffer: exactly one key is new, the rest decayed
            after = opt.state[ps[0]]["cm_keys"]
            changed = (after != before * H.OPTIMIZERS["adamcm"].cm_hyper["decay"]).sum().item()
            assert changed == 1, (i, before, after)


# ---------------------------------------------------------------- micro-benchmarks

@pytest.fixture(scope="module")
def tensors():
    return H.make_tensors(SHAPES, torch.float32, DEVICE, 3)


@pytest.mark.parametrize("provider", [p for p, v in H.PROVIDERS.items()
                                      if not (v.compiled or v.explicit)])
def test_step(benchmark, provider, tensors):
    prov = H.PROVIDERS[provider]
    reason = H.why_not(prov, DEVICE, torch.float32)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    base, grads = tensors
    params = [torch.nn.Parameter(t.clone()) for t in base]
    opt = H.make_optimizer(prov, params, TOPC if prov.kind == "cm" else None, None)
    H.time_steps(opt.step, params, grads, DEVICE, TOPC + 3)  # warm-up, buffer full
    counter = iter(range(10**9))

    def setup():
        H.set_grads(params, grads[next(counter) % len(grads)])

    def step():
        opt.step()
        H.sync(DEVICE)

    benchmark.group = f"step {DEVICE.type} fp32 {len(SHAPES)} tensors"
    benchmark.extra_info.update(provider=provider, numel=sum(p.numel() for p in params),
                                bytes_per_step=H.bytes_per_step(
                                    prov.kind, sum(p.numel() for p in params), torch.float32))
    benchmark.pedantic(step, setup=setup, rounds=30, warmup_rounds=2, iterations=1)
    assert all(torch.isfinite(p).all() for p in params)
