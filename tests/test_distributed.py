"""Training over several processes: FSDP2 (sharded DTensor parameters and state), DDP,
and torch.distributed.checkpoint, with real processes (2 ranks, gloo on CPU, loopback).

Each launch runs many configurations in one pair of processes (starting them costs
seconds); the processes save what they got (distributed_worker.py) and the tests here
compare: sharded vs one process on the same data (every optimizer on every backend), DDP
vs one process, and a checkpoint resumed in fresh processes vs the run that went on.
"""
from __future__ import annotations

import pytest
import torch

import distributed_worker as W
from family import BACKENDS, EVERY, require

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch built without torch.distributed")

WORLD = 2


def _spec(name: str, **kw) -> dict:
    member = EVERY[name]
    config = dict(member.configs.get("all", {}))
    config.update(kw)
    if name == "sgdam":
        config["two_groups"] = True  # one beta over both groups and both processes
    return {"optimizer": member.cls.__name__, **config}


# Every optimizer on the reference and C++ backends with its "all" configuration (the
# critical_test coin included), the fused ones also clipping by the global norm (the
# worker's gradient norms swing around 1: about half the steps clip); plus the defaults
# (synced keys), torch's own step (kappa = 0) and HSDP. The Triton backend (interpreted:
# ~20 s a run) takes AdamCM (single-pass norm, deferred inserts) and SGDAM (one decision
# over groups) by default, its other optimizers under -m slow.
CLIP = {"max_grad_norm": 1.0}
SPECS = {f"{name}-{backend}": _spec(name, backend=backend,
                                    **(CLIP if backend != "reference" else {}))
         for name in EVERY for backend in BACKENDS
         if backend != "triton" or name in ("adamcm", "sgdam")}
SPECS["adamcm-synced-cpu"] = _spec("adamcm", backend="cpu", synced=True, critical_test=0.0)
SPECS["adamcm-kappa0-cpu"] = _spec("adamcm", backend="cpu", kappa=0.0, **CLIP)
SPECS["adamcm-hsdp-cpu"] = _spec("adamcm", backend="cpu", hsdp=True, **CLIP)
SPECS["adamam-hsdp-cpu"] = _spec("adamam", backend="cpu", hsdp=True)
SLOW_SPECS = {f"{name}-triton": _spec(name, backend="triton", **CLIP)
              for name in EVERY if f"{name}-triton" not in SPECS}


def _load(path):
    return torch.load(path, weights_only=False)


def _launch(tmp_path_factory, specs):
    for backend in BACKENDS:
        require(backend)
    tmp = tmp_path_factory.mktemp("fsdp")
    W.launch(W.fsdp_vs_single, WORLD, tmp, (specs,))
    return tmp


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return _launch(tmp_path_factory, SPECS)


@pytest.fixture(scope="module")
def fsdp_slow(tmp_path_factory):
    return _launch(tmp_path_factory, SLOW_SPECS)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    scale = b.abs().max().clamp(min=1e-12)
    return bool(((a.double() - b.double()).abs().max() <= rtol * scale).item()) \
        if a.numel() else True


@pytest.mark.parametrize("name", sorted(SPECS))
def test_fsdp2_matches_one_process(fsdp, name):
    _check_fsdp2(fsdp, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_SPECS))
def test_fsdp2_matches_one_process_triton(fsdp_slow, name):
    _check_fsdp2(fsdp_slow, name)


def _check_fsdp2(fsdp, name):
    ranks = [_load(fsdp / f"fsdp-{name}-rank{r}.pt") for r in range(WORLD)]
    single, sharded = ranks[0]["single"], ranks[0]["sharded"]
    # The last layer (1 row) has an empty shard on rank 1: the uneven case is exercised.
    assert ranks[1]["local_numels"][-2:] == [0, 0]
    for r in ranks[1:]:  # every rank holds the same model after gathering
        for a, b in zip(r["sharded"]["params"], sharded["params"]):
            assert torch.equal(a, b)
    # The clip's norm is over every shard: the one process's, on every rank.
    assert (single["grad_norm"] is None) == ("max_grad_norm" not in SPECS.get(
        name, SLOW_SPECS.get(name)))
    if single["grad_norm"] is not None:
        for r in ranks:
            assert _close(r["sharded"]["grad_norm"], single["grad_norm"], 1e-5)
    for i, (a, b) in enumerate(zip(sharded["params"], single["params"])):
        assert _close(a, b, 1e-5), f"param {i}: {(a - b).abs().max()}"
    for i, st in single["state"].items():
        got = sharded["state"][i]
        assert set(got) == set(st)
        for key, value in st.items():
            if key.startswith("__"):
                continue
            if key in ("cm_count", "step"):  # the same decisions as one process
                assert torch.equal(got[key], value), (i, key)
            else:  # keys up to summation order; the rest to rounding
                assert _close(got[key], value, 1e-5), (i, key)
        # State shaped like the parameter is sharded like it; the buffer one dim further.
        for key, kind in got["__types__"].items():
            shaped = key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer",
                             "square_avg", "grad_avg", "d", "v", "cm_sum", "cm_buffer")
            assert kind == ("DTensor" if shaped else "Tensor"), (i, key, kind)
            if shaped:
                want = "Shard(dim=1)," if key == "cm_buffer" else "Shard(dim=0),"
                if "hsdp" in name:
                    want = "Replicate(), " + want[:-1]
                assert got["__placements__"][key] == f"({want})"


def test_ddp_matches_one_process(tmp_path):
    require("cpu")
    specs = {"adamcm": _spec("adamcm", backend="cpu", synced=True),
             "sgdam": _spec("sgdam", backend="cpu")}
    W.launch(W.ddp_vs_single, WORLD, tmp_path, (specs,))
    for name in specs:
        ranks = [_load(tmp_path / f"ddp-{name}-rank{r}.pt") for r in range(WORLD)]
        single = ranks[0]["single"]
        for r in ranks:
            for i, (a, b) in enumerate(zip(r["ddp"]["params"], single["params"])):
                assert _close(a, b, 1e-5), (name, i)
            for i, st in single["state"].items():
                for key in ("cm_count", "step"):
                    if key in st:
                        assert torch.equal(r["ddp"]["state"][i][key], st[key]), (name, i)


@pytest.mark.parametrize("name", ["adamcm", "adamam", "sgdam"])
def test_dcp_resume_in_fresh_processes_is_bit_identical(tmp_path, name):
    require("cpu")
    spec = _spec(name, backend="cpu")
    W.launch(W.dcp_run, WORLD, tmp_path, (spec, "first"))
    W.launch(W.dcp_run, WORLD, tmp_path, (spec, "resume"))
    for r in range(WORLD):
        first = _load(tmp_path / f"dcp-first-rank{r}.pt")
        resumed = _load(tmp_path / f"dcp-resume-rank{r}.pt")
        for a, b in zip(first["params"], resumed["params"]):
            assert torch.equal(a, b)
        for i, st in first["state"].items():
            for key, value in st.items():
                if not key.startswith("__"):
                    assert torch.equal(resumed["state"][i][key], value), (i, key)


def test_refusals_change_nothing(tmp_path):
    """Placements the step cannot take (stochastic rounding of a dim-1 shard among them),
    and a plain-tensor checkpoint for DTensor parameters, raise a clear error before
    anything changes."""
    require("cpu")
    W.launch(W.refusals, WORLD, tmp_path)
    for r in range(WORLD):
        got = _load(tmp_path / f"refusals-rank{r}.pt")
        assert got["partial"][0] == "NotImplementedError" and "Partial" in got["partial"][1]
        assert got["rounding_dim1"][0] == "NotImplementedError"
        assert "stochastic_rounding" in got["rounding_dim1"][1]
        assert got["misplaced_grad"][0] == "RuntimeError"
        assert "placed as the parameter" in got["misplaced_grad"][1]
        assert got["misplaced_grad_settled"][0] == "RuntimeError"
        assert got["plain_checkpoint"][0] == "ValueError"
        assert "torch.distributed.checkpoint" in got["plain_checkpoint"][1]
        assert got["sgdam_mixed"][0] == "NotImplementedError"
        changed = [name for name, same in got["unchanged"].items() if not same]
        assert not changed, f"refused, yet parameters or state changed: {changed}"


def test_mixed_group_exchanges_only_the_sharded_rows(tmp_path):
    """A group of a sharded, a replicated DTensor and a plain tensor: the synced key sums
    the whole tensors' norms, as one process would."""
    require("cpu")
    # (no coins: both runs draw from this process's one generator, one after the other)
    specs = {"adamcm": _spec("adamcm", backend="cpu", synced=True, critical_test=0.0),
             "adamam": _spec("adamam", backend="cpu")}
    W.launch(W.mixed_group, WORLD, tmp_path, (specs,))
    for r in range(WORLD):
        got = _load(tmp_path / f"mixed-rank{r}.pt")
        for name in specs:
            whole, placed = got[name]["whole"], got[name]["placed"]
            for i, (a, b) in enumerate(zip(placed["params"], whole["params"])):
                assert _close(a, b, 1e-5), (name, i)
            for i, st in whole["state"].items():
                for key in ("cm_count", "cm_inserts", "step"):
                    if key in st:
                        assert torch.equal(placed["state"][i][key], st[key]), (name, i, key)
                if "cm_keys" in st:  # (a wrong exchange made them 17-26% too large)
                    assert _close(placed["state"][i]["cm_keys"], st["cm_keys"], 1e-5), (name, i)
                    assert st["cm_inserts"].item() >= 2, (name, i)  # (not vacuous)
