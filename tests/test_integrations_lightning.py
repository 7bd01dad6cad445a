"""cm_fused under the real Lightning Trainer, through docs/examples/lightning_module.py.

An uninterrupted run that saves no checkpoint is compared with the same run saving one
every 4 steps with ModelCheckpoint (saving, which flushes AdamCM's pending inserts, must
not change the trajectory), and with a run resumed from its step-4 checkpoint by
``trainer.fit(model, ckpt_path=...)`` in a fresh module and Trainer: losses, parameters,
optimizer state and the scheduler's lr must be exactly equal. (Lightning saves
``opt.state_dict()`` and ``scheduler.state_dict()`` and loads them into the ones
``configure_optimizers`` builds on resume.)
"""
from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="Lightning integration tests need the lightning "
                                        "package (pip install lightning)")
import lightning.pytorch as pl  # noqa: E402

import cm_fused  # noqa: E402
from family import require  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "lightning_module.py"
_spec = importlib.util.spec_from_file_location("lightning_module_example", EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

STEPS, CUT = 8, 4  # CUT: a multiple of example.BATCHES_PER_EPOCH (see example.train)

pytestmark = [
    # Expected Lightning chatter: resuming in another directory than the one that saved,
    # manual optimization's post-step checkpoint (what an exact resume needs), and this
    # Lightning's use of a torch.utils._pytree name that torch has deprecated.
    pytest.mark.filterwarnings("ignore:The dirpath has changed from:UserWarning"),
    pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization"
                               ":UserWarning"),
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
]


@pytest.fixture(scope="module", autouse=True)
def _restore_globals():
    """Trainer(deterministic=True) and seed_everything change process-wide settings (torch's
    deterministic-algorithms flag, the RNGs, environment variables): put them back for the
    other test modules."""
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng, py_rng = torch.get_rng_state(), random.getstate()
    np_rng = None
    try:
        import numpy as np
        np_rng = np.random.get_state()
    except ImportError:
        pass
    env = dict(os.environ)
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    torch.set_rng_state(rng)
    random.setstate(py_rng)
    if np_rng is not None:
        np.random.set_state(np_rng)
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)


def run_and_resume(root: Path, **kwargs):
    """(an uninterrupted run that saves no checkpoint, the same run with ModelCheckpoint
    saving every CUT steps, a run resumed from the latter's step-CUT checkpoint)."""
    full = example.train(str(root / "full"), STEPS, every_n_train_steps=None, **kwargs)
    saving = example.train(str(root / "saving"), STEPS, every_n_train_steps=CUT, **kwargs)
    ckpt = root / "saving" / "checkpoints" / f"step={CUT}.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (root / "saving" / "checkpoints").iterdir())
    resumed = example.train(str(root / "resumed"), STEPS, ckpt_path=str(ckpt),
                            every_n_train_steps=CUT, **kwargs)
    return full, saving, resumed


def max_diff(a: dict, b: dict) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a.values(), b.values()))


def assert_equal_tensors(a, b, what: str):
    """Exactly equal, key by key (nested dicts and lists of tensors or plain values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), (
            f"{what}: {a} != {b}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{what}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_equal_tensors(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tensors(x, y, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def assert_same_run(a, b, what: str):
    """Equal losses, parameters, scheduler lr and optimizer state, bit for bit."""
    assert torch.equal(a.losses, b.losses), (
        f"{what}: losses {a.losses.tolist()} != {b.losses.tolist()}")
    assert max_diff(a.state_dict, b.state_dict) == 0.0, what
    assert_equal_tensors(a.state_dict, b.state_dict, f"{what}: parameters")
    assert a.lr == b.lr, f"{what}: lr {a.lr} != {b.lr}"
    assert_equal_tensors(a.optimizer.state_dict(), b.optimizer.state_dict(),
                         f"{what}: optimizer.state_dict()")


def assert_exact_resume(full, saving, resumed):
    assert len(full.losses) == len(saving.losses) == STEPS
    assert len(resumed.losses) == STEPS - CUT
    assert torch.isfinite(full.losses).all()
    assert_same_run(saving, full, "saving checkpoints changed the run")
    assert_same_run(resumed, full._replace(losses=full.losses[CUT:]), "resumed run")


def assert_ours(opt, cls, backend: str):
    """The optimizer Lightning stepped is a cm_fused one that really ran."""
    assert type(opt) is cls, type(opt)
    base = opt.base_optimizer if isinstance(opt, cm_fused.SAM) else opt
    assert base.backends_in_use == {"cpu": backend}  # the kernels that stepped
    states = list(base.state.values())
    assert len(states) == 4  # two Linear layers: every parameter stepped
    for st in states:
        assert float(st["step"]) == STEPS
        if base.variant.buffered:
            assert int(st["cm_count"]) > 0 and int(st["cm_inserts"]) > 0
            assert st["cm_buffer"].shape[0] == base.param_groups[0]["topC"]


# optimizer name -> keyword arguments (lr: the example's 1e-2 suits every one)
OPTIMIZERS = {
    "AdamCM": {},
    "AdamCG": {},
    "SGDCG": dict(momentum=0.9),  # the schedule cycles the momentum too
    "RMSpropCG": {},
    "AdamAM": {},
    "SGDAM": {},
}
# every optimizer on the C++ kernel, and the two with a buffer of each kind (Adam's
# momenta, SGD's gradients) on the plain-PyTorch reference too (each case: ~0.2 s)
CASES = [(name, "cpu") for name in OPTIMIZERS] + [("AdamCM", "reference"),
                                                  ("SGDCG", "reference")]


@pytest.mark.parametrize("name, backend", CASES, ids=[f"{n}-{b}" for n, b in CASES])
def test_checkpoint_resume_is_exact(tmp_path, name, backend):
    """Automatic optimization, optimizer + per-step scheduler, ModelCheckpoint at step 4,
    fit(ckpt_path=...) in a fresh module and Trainer: bit-identical to the full run."""
    require(backend)
    full, saving, resumed = run_and_resume(tmp_path, optimizer=name, backend=backend,
                                           **OPTIMIZERS[name])
    assert_exact_resume(full, saving, resumed)
    for run in (full, resumed):
        assert_ours(run.optimizer, getattr(cm_fused, name), backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_sam_manual_optimization(tmp_path, backend):
    """SAM around AdamCM under manual optimization trains, and resumes exactly (its
    state_dict is AdamCM's)."""
    require(backend)
    full, saving, resumed = run_and_resume(tmp_path, sam=True, backend=backend)
    assert full.losses[-CUT:].mean() < 0.5 * full.losses[:CUT].mean(), full.losses.tolist()
    assert_exact_resume(full, saving, resumed)
    assert "cm_buffer" in next(iter(resumed.optimizer.state_dict()["state"].values()))
    for run in (full, resumed):
        assert_ours(run.optimizer, cm_fused.SAM, backend)
        assert type(run.optimizer.base_optimizer) is cm_fused.AdamCM


# torch's scheduler counts calls of SAM.step, which first_step/second_step bypass: it warns
# once that the scheduler stepped first (only a warning: the schedule is not shifted).
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_sam_under_lightning_is_first_step_second_step(tmp_path):
    """The example's Lightning step (opt.step(closure) through Lightning's wrapper) is
    exactly the two-pass loop written with SAM's first_step/second_step in plain PyTorch."""
    require("cpu")  # the example's backend
    lightning_run = example.train(str(tmp_path), STEPS, sam=True, every_n_train_steps=None)

    pl.seed_everything(0, verbose=False)
    model = example.SAMMLP()
    opt = model.make_optimizer()
    scheduler = example.make_scheduler(opt, model.lr, total_steps=STEPS)
    batches = torch.utils.data.DataLoader(example.make_data(), batch_size=example.BATCH)
    losses = []
    while len(losses) < STEPS:
        for batch in batches:
            loss = model.loss(batch)
            loss.backward()
            opt.first_step(zero_grad=True)
            model.loss(batch).backward()
            opt.second_step(zero_grad=True)
            scheduler.step()
            losses.append(loss.detach())
            if len(losses) == STEPS:
                break
    assert torch.equal(torch.stack(losses), lightning_run.losses)
    assert_equal_tensors(model.state_dict(), lightning_run.state_dict, "parameters")
    assert_equal_tensors(opt.state_dict(), lightning_run.optimizer.state_dict(),
                         "optimizer.state_dict()")
