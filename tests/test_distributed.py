"""Training over several processes: FSDP2 (sharded DTensor parameters and state), DDP,
and torch.distributed.checkpoint, with real processes (2 ranks, gloo on CPU, loopback).

Each launch runs many configurations in one pair of processes (starting them costs
seconds); the processes save what they got (distributed_worker.py) and the tests here
compare: sharded vs one process on the same data (every optimizer on every backend), DDP
vs one process, a checkpoint resumed in fresh processes vs the run that went on, and
8-bit state of shards aligned and not aligned to its 256-element blocks vs one process.
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


# AdamCM with 8-bit state (moments and slots) of every tensor of the worker's model
# (whose shards do not start at a multiple of 256 elements; one is empty on rank 1)
DCP_8BIT = _spec("adamcm", backend="cpu", state_dtype=torch.int8, buffer_dtype=torch.int8,
                 min_8bit_size=0)


@pytest.mark.parametrize("name", ["adamcm", "adamam", "sgdam"])
def test_dcp_resume_in_fresh_processes_is_bit_identical(tmp_path, name):
    require("cpu")
    spec = _spec(name, backend="cpu")
    W.launch(W.dcp_run, WORLD, tmp_path, (spec, "first"))
    _check_resume(tmp_path, spec)


@pytest.fixture(scope="module")
def dcp_8bit(tmp_path_factory):
    """A run with 8-bit state, its DCP checkpoint at step 10 and its state at step 20."""
    require("cpu")
    tmp = tmp_path_factory.mktemp("dcp_8bit")
    W.launch(W.dcp_run, WORLD, tmp, (DCP_8BIT, "first"))
    return tmp


def test_dcp_resume_of_8bit_state_in_fresh_processes_is_bit_identical(dcp_8bit):
    _check_resume(dcp_8bit, DCP_8BIT)
    st = _load(dcp_8bit / "dcp-resume-rank0.pt")["state"][0]
    assert st["exp_avg"].dtype == torch.uint8 and st["cm_buffer"].dtype == torch.int8


def _check_resume(tmp_path, spec):
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


def test_dcp_8bit_state_refuses_another_world_size(dcp_8bit):
    """8-bit state's scales are per shard: a checkpoint of 2 shards loads into no other
    sharding (DCP refuses the scale table, whose first dimension is the shards)."""
    W.launch(W.dcp_run, 1, dcp_8bit, (DCP_8BIT, "resize"))
    kind, message = _load(dcp_8bit / "dcp-resize-rank0.pt")
    assert kind != "no error" and "Size mismatch" in message, (kind, message)
    assert "scales" in message, message


def test_refusals_change_nothing(tmp_path):
    """Placements the step cannot take (stochastic rounding or 8-bit state of a dim-1
    shard among them), a plain-tensor checkpoint for DTensor parameters and sharded 8-bit
    state loaded as full-precision (converted or cast) raise a clear error before
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
        for name in ("eight_bit_dim1", "int8_slots_dim1"):
            kind, message = got[name]
            assert kind == "NotImplementedError", (name, kind, message)
            assert "parameter 1 of its param group (shape (4, 6))" in message
            assert "(Shard(dim=1),)" in message and "HSDP" in message
        assert got["eight_bit_into_full"][0] == "ValueError"
        assert "not converted" in got["eight_bit_into_full"][1]
        assert got["eight_bit_cast"][0] == "ValueError"
        assert "was cast" in got["eight_bit_cast"][1]
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


# ------------------------------------------------------------------ 8-bit state

EIGHT = dict(state_dtype=torch.int8, buffer_dtype=torch.int8, min_8bit_size=100)
EIGHT_BIT_SPECS = {
    "adamcm-reference": _spec("adamcm", backend="reference", **EIGHT),
    "adamcm-cpu": _spec("adamcm", backend="cpu", **EIGHT),
    "adamcm-hsdp-cpu": _spec("adamcm", backend="cpu", hsdp=True, **EIGHT),
    # full-precision moments, int8 slots with their running sum
    "adamcm-slots-cpu": _spec("adamcm", backend="cpu", buffer_dtype=torch.int8),
    "adamcg-cpu": _spec("adamcg", backend="cpu", **EIGHT),
    "sgdcg-cpu": _spec("sgdcg", backend="cpu", **EIGHT),
    "rmspropcg-cpu": _spec("rmspropcg", backend="cpu", centered=False, **EIGHT),
    "adamam-reference": _spec("adamam", backend="reference", state_dtype=torch.int8,
                              min_8bit_size=100),
}
TABLES = ("moment_scales", "cm_scales")
# The unaligned shards' trajectories differ by quantization noise: measured at most 0.26
# of the largest distance a parameter moved (AdamCM, whose buffer amplifies it).
UNALIGNED_RTOL = 0.35


@pytest.fixture(scope="module")
def eight_bit(tmp_path_factory):
    for backend in ("reference", "cpu"):
        require(backend)
    tmp = tmp_path_factory.mktemp("eight_bit")
    W.launch(W.eight_bit, WORLD, tmp, (EIGHT_BIT_SPECS,))
    return [_load(tmp / f"eight-bit-rank{r}.pt") for r in range(WORLD)]


def _as_one_process(table: torch.Tensor, rows: int, numels: list[int]) -> torch.Tensor:
    """A sharded scale table (rank r's piece: row r) as one process's [rows, n_blocks]:
    each piece's first rows × n_blocks(its shard) values side by side; and whether the
    rest of every piece is still 0."""
    from cm_fused.quantize import n_blocks

    pieces, rest = [], []
    for r, n in enumerate(numels):
        used = rows * n_blocks(n)
        pieces.append(table[r, :used].view(rows, n_blocks(n)))
        rest.append(table[r, used:])
    return torch.cat(pieces, dim=1), bool((torch.cat(rest) == 0).all())


def _tables(ranks, name, i, st):
    """Tensor i's scale tables, each as one process's, checking their placement."""
    numels = [r[name]["local_numels"][i] for r in ranks]
    out = {}
    for key in TABLES:
        if key in st:
            want = "(Replicate(), Shard(dim=0))" if "hsdp" in name else "(Shard(dim=0),)"
            assert st["__placements__"][key] == want, (name, i, key)
            rows = st["cm_buffer"].shape[0] if key == "cm_scales" else 2
            out[key], padding_zero = _as_one_process(st[key], rows, numels)
            assert padding_zero, (name, i, key)
    return out


@pytest.mark.parametrize("name", sorted(EIGHT_BIT_SPECS))
def test_8bit_state_of_aligned_shards_is_one_process_bit_for_bit(eight_bit, name):
    """Shards starting at multiples of 256 elements hold one process's blocks: with the
    same gradients the parameters, the codes, the scales and the rest of the state are
    one process's, bit for bit."""
    ranks = eight_bit
    got = ranks[0][f"{name}-aligned"]
    whole, placed = got["whole"], got["placed"]
    for i, (a, b) in enumerate(zip(placed["params"], whole["params"])):
        assert torch.equal(a, b), (i, (a - b).abs().max())
    eight = 0
    for i, st in whole["state"].items():
        mine = placed["state"][i]
        tables = _tables(ranks, f"{name}-aligned", i, mine)
        assert set(mine) == set(st)
        for key, value in st.items():
            if not key.startswith("__"):
                assert torch.equal(tables.get(key, mine[key]), value), (i, key)
        eight += sum(v.dtype in (torch.uint8, torch.int8) for v in st.values()
                     if isinstance(v, torch.Tensor))
    assert eight, "no 8-bit state: vacuous"


@pytest.mark.parametrize("name", sorted(EIGHT_BIT_SPECS))
def test_8bit_state_of_unaligned_shards_is_close_to_one_process(eight_bit, name):
    """Shards starting elsewhere quantize other blocks: the same steps, finite, the
    parameters within UNALIGNED_RTOL of the distance they moved from one process's."""
    ranks = eight_bit
    got = ranks[0][f"{name}-unaligned"]
    whole, placed = got["whole"], got["placed"]
    torch.manual_seed(0)  # (the worker's initial values)
    start = [torch.randn(s) for s in W.UNALIGNED]
    for i, (a, b, p0) in enumerate(zip(placed["params"], whole["params"], start)):
        assert torch.isfinite(a).all(), i
        moved = (b - p0).abs().max()
        assert (a - b).abs().max() <= UNALIGNED_RTOL * moved, (i, (a - b).abs().max(), moved)
    for i, st in whole["state"].items():
        mine = placed["state"][i]
        _tables(ranks, f"{name}-unaligned", i, mine)
        assert torch.equal(mine["step"], st["step"])
        for key, value in mine.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), (i, key)
