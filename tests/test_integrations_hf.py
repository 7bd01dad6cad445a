"""The optimizers under Hugging Face's training libraries, through the runnable examples in
docs/examples/ (imported from there, so the docs cannot rot):

* transformers.Trainer, handed the optimizer either as ``optimizers=(opt, scheduler)`` or as
  ``optimizer_cls_and_kwargs``: a run stopped after a checkpoint and resumed with
  ``resume_from_checkpoint`` in a new Trainer, model and optimizer continues bit for bit
  (losses, gradient norms, final parameters and optimizer state all ``==`` the
  uninterrupted run's); the Trainer steps our optimizer, and clips before it.
* accelerate: ``save_state`` / ``load_state`` mid-epoch, with a OneCycle scheduler that
  also cycles the momentum, resumes bit for bit.

Tiny models, a few steps: the module costs about half a minute, most of it importing
transformers. Half of the optimizer x backend x Trainer-route product is marked slow.
"""
from __future__ import annotations

import gc
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import cm_fused
from family import require

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"

# name -> (class, keyword arguments, lr). Small buffers, so that inserts both fill and
# replace slots before and after the checkpoint; critical_test draws coins from torch's
# RNG, which the checkpoints must restore along with dropout's.
OPTIMIZERS = {
    "adamcm": (cm_fused.AdamCM, dict(topC=3), 3e-3),
    "adamcg": (cm_fused.AdamCG, dict(topC=3, critical_test=0.3), 3e-3),
    "sgdcg": (cm_fused.SGDCG, dict(topC=3, momentum=0.9, critical_test=0.3), 1e-2),
    "rmspropcg": (cm_fused.RMSpropCG, dict(topC=3, momentum=0.5), 1e-3),
    "adamam": (cm_fused.AdamAM, dict(), 3e-3),
    "sgdam": (cm_fused.SGDAM, dict(), 1e-2),
}
STEPS, CHECKPOINT = 8, 4  # 6 batches an epoch: the checkpoint is mid-epoch, the end in the next


def _load(name):
    spec = importlib.util.spec_from_file_location(f"cm_fused_docs_example_{name}",
                                                  EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gc.freeze()  # what the import built too (see _quick)
    return module


@pytest.fixture(scope="module")
def hf_trainer():
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="accelerate (needed by Trainer) is not installed")
    return _load("hf_trainer")


@pytest.fixture(scope="module")
def accelerate_loop():
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    return _load("accelerate_loop")


@pytest.fixture(scope="module", autouse=True)
def _quick():
    """One intra-op thread (see conftest's ``one_thread``), and the objects alive before
    the tests (the session's, transformers' import) frozen out of the collector: every
    ``Trainer.train`` starts with a full ``gc.collect()`` (accelerate's ``free_memory``),
    which otherwise costs half a second a run here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _keep_rng():
    """The examples seed torch's global RNG; give it back as it was."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


# ---------------------------------------------------------------------------------------
# exact comparison


def _max_diff(a, b):
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return math.inf
        return 0.0 if torch.equal(a, b) else (a.double() - b.double()).abs().max().item()
    if isinstance(a, dict):
        return max([_max_diff(a[k], b[k]) for k in a] or [0.0]) if a.keys() == b.keys() \
            else math.inf
    if isinstance(a, (list, tuple)):
        return max([_max_diff(x, y) for x, y in zip(a, b)] or [0.0]) if len(a) == len(b) \
            else math.inf
    if isinstance(a, float) and isinstance(b, float):
        return 0.0 if a == b or (a != a and b != b) else abs(a - b)
    return 0.0 if a == b else math.inf


def assert_identical(a, b, what):
    """``a`` and ``b`` (tensors, floats, nested dicts/lists of them) are bit-identical."""
    diff = _max_diff(a, b)
    assert diff == 0.0, f"{what}: resumed run differs from the uninterrupted one, " \
                        f"max |difference| {diff}"


def assert_resume_exact(full_losses, full_params, full_opt_state,
                        resumed_losses, resumed_params, resumed_opt_state, steps=STEPS,
                        checkpoint=CHECKPOINT):
    assert sorted(resumed_losses) == list(range(checkpoint + 1, steps + 1)), \
        f"resumed run logged steps {sorted(resumed_losses)}"
    assert_identical({s: full_losses[s] for s in resumed_losses}, resumed_losses, "losses")
    assert_identical(full_params, resumed_params, "final parameters")
    assert_identical(full_opt_state, resumed_opt_state, "final optimizer state_dict()")


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------
# transformers.Trainer


def _trainer_kwargs(name, backend):
    require(backend)
    cls, kwargs, lr = OPTIMIZERS[name]
    return dict(optimizer_cls=cls, optimizer_kwargs=kwargs, lr=lr, backend=backend)


_TRAINER_RUNS = {}


def _trainer_run(hf_trainer, tmp_path_factory, name, backend, route, **extra):
    """One Trainer run, cached for the module (several tests read the same run)."""
    key = (name, backend, route, tuple(sorted(extra.items())))
    if key not in _TRAINER_RUNS:
        out = tmp_path_factory.mktemp(f"trainer-{name}-{backend}-{route}")
        run = hf_trainer.train(str(out), STEPS, route=route, **_trainer_kwargs(name, backend),
                               **extra)
        _TRAINER_RUNS[key] = (run, out)
    return _TRAINER_RUNS[key]


def _check_trainer_resume(hf_trainer, tmp_path_factory, name, backend, route):
    """The uninterrupted run (no checkpoint) against a run stopped after its checkpoint
    and resumed in a new Trainer, model and optimizer."""
    kw = _trainer_kwargs(name, backend)
    full, _ = _trainer_run(hf_trainer, tmp_path_factory, name, backend, route)
    part = tmp_path_factory.mktemp(f"part-{name}-{backend}-{route}")
    stopped = hf_trainer.train(str(part), STEPS, route=route, save_steps=CHECKPOINT,
                               stop_at=CHECKPOINT, **kw)
    assert sorted(stopped.losses) == list(range(1, CHECKPOINT + 1))
    assert_identical({s: full.losses[s] for s in stopped.losses}, stopped.losses,
                     "losses before the checkpoint")
    checkpoint = part / f"checkpoint-{CHECKPOINT}"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "scheduler.pt").is_file()
    resumed = hf_trainer.train(str(part), STEPS, route=route,
                               resume_from_checkpoint=str(checkpoint), **kw)
    assert resumed.trainer is not full.trainer and resumed.trainer.model is not full.trainer.model
    assert_resume_exact(full.losses, _params(full.trainer.model),
                        full.trainer.optimizer.state_dict(),
                        resumed.losses, _params(resumed.trainer.model),
                        resumed.trainer.optimizer.state_dict())
    assert_identical({s: full.grad_norms[s] for s in resumed.grad_norms}, resumed.grad_norms,
                     "gradient norms")


ROUTES = ("optimizers", "cls_and_kwargs")
BACKENDS = ("cpu", "reference")


def _trainer_cases():
    """Every optimizer on both backends. AdamCM takes both routes on each; the others one
    route per backend by default (each route on one), the other one marked slow."""
    for i, name in enumerate(OPTIMIZERS):
        for j, backend in enumerate(BACKENDS):
            for k, route in enumerate(ROUTES):
                fast = name == "adamcm" or (i + j) % 2 == k
                yield pytest.param(name, backend, route, id=f"{name}-{backend}-{route}",
                                   marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("name, backend, route", _trainer_cases())
def test_trainer_resume_is_exact(hf_trainer, tmp_path_factory, name, backend, route):
    _check_trainer_resume(hf_trainer, tmp_path_factory, name, backend, route)


def test_trainer_steps_our_optimizer(hf_trainer, tmp_path_factory):
    for route in ("optimizers", "cls_and_kwargs"):
        run, _ = _trainer_run(hf_trainer, tmp_path_factory, "adamcm", "cpu", route)
        opt = run.trainer.optimizer
        inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps it
        assert type(inner) is cm_fused.AdamCM, type(inner)
        assert inner.backend == "cpu" and "cpu" in str(inner.backends_in_use)
        state = [inner.state[p] for g in inner.param_groups for p in g["params"]]
        assert state and all("cm_buffer" in s for s in state)
        assert all(float(s["step"]) == STEPS for s in state)
        assert all(int(s["cm_inserts"]) > 0 for s in state)
        trained = {id(p) for g in inner.param_groups for p in g["params"]}
        assert {id(p) for p in run.trainer.model.parameters()} <= trained
        if route == "cls_and_kwargs":  # the Trainer's groups: no decay on biases/LayerNorm
            assert sorted(g["weight_decay"] for g in inner.param_groups) == [0.0, 0.01]


def test_trainer_clips_before_our_step(hf_trainer, tmp_path_factory):
    """With ``max_grad_norm`` the gradients our optimizer steps with have that norm (the
    logged norm is the one before clipping), and the trajectory differs from the
    unclipped run's (``max_grad_norm=0``) from the third step on (the warmup's first lr
    is 0, and Adam's first step does not see the gradient's scale)."""
    from transformers import TrainerCallback

    class SeenNorms(TrainerCallback):
        def __init__(self):
            self.norms = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    runs = {}
    for max_norm in (0.05, 0.0):
        seen = SeenNorms()
        out = tmp_path_factory.mktemp(f"clip-{max_norm}")
        runs[max_norm] = hf_trainer.train(str(out), 4, max_grad_norm=max_norm, callbacks=[seen],
                                          **_trainer_kwargs("adamcm", "cpu")), seen.norms
    (clipped, seen_clipped), (free, seen_free) = runs[0.05], runs[0.0]
    logged = [clipped.grad_norms[s] for s in (1, 2, 3, 4)]
    assert all(n > 0.5 for n in logged), logged
    assert all(n == pytest.approx(0.05, rel=1e-4) for n in seen_clipped), seen_clipped
    assert seen_free == pytest.approx([free.grad_norms[s] for s in (1, 2, 3, 4)], rel=1e-4)
    assert clipped.losses[1] == free.losses[1]
    assert all(clipped.losses[s] != free.losses[s] for s in (3, 4)), (clipped.losses, free.losses)


@pytest.mark.parametrize("route", ROUTES)
def test_the_fused_clip_is_the_trainers_clip(hf_trainer, tmp_path_factory, route):
    """The Trainer's clip (``max_grad_norm`` in TrainingArguments) against our optimizer's
    (``max_grad_norm=0`` for the Trainer, ``max_grad_norm`` to the optimizer): the same
    losses and parameters to rounding, every step clipped, and the optimizer's
    ``grad_norm`` is the norm the Trainer logged."""
    kw = _trainer_kwargs("adamcm", "cpu")
    runs = {}
    for where in ("trainer", "optimizer"):
        out = tmp_path_factory.mktemp(f"fused-clip-{where}-{route}")
        fused = where == "optimizer"
        runs[where] = hf_trainer.train(
            str(out), 4, route=route, max_grad_norm=0.0 if fused else 0.05,
            **{**kw, "optimizer_kwargs": {**kw["optimizer_kwargs"],
                                          **({"max_grad_norm": 0.05} if fused else {})}})
    trainer, ours = runs["trainer"], runs["optimizer"]
    assert all(trainer.grad_norms[s] > 0.5 for s in (1, 2, 3, 4))  # every step clipped
    assert ours.losses == pytest.approx(trainer.losses, rel=1e-5)
    for a, b in zip(trainer.trainer.model.parameters(), ours.trainer.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    opt = getattr(ours.trainer.optimizer, "optimizer", ours.trainer.optimizer)
    assert opt.grad_norm.item() == pytest.approx(trainer.grad_norms[4], rel=1e-5)


# ---------------------------------------------------------------------------------------
# accelerate


def _check_accelerate_resume(accelerate_loop, tmp_path, name, backend, steps=10, checkpoint=7):
    require(backend)
    cls, kwargs, lr = OPTIMIZERS[name]
    kw = dict(optimizer_cls=cls, optimizer_kwargs=kwargs, lr=lr, backend=backend)
    ckpt = str(tmp_path / "state")
    full = accelerate_loop.train(None, steps, **kw)
    stopped = accelerate_loop.train(ckpt, steps, save_at=checkpoint, stop_after=checkpoint, **kw)
    assert_identical({s: full.losses[s] for s in stopped.losses}, stopped.losses,
                     "losses before the checkpoint")
    resumed = accelerate_loop.train(ckpt, steps, resume=True, **kw)
    assert type(resumed.optimizer) is cls
    assert_resume_exact(full.losses, _params(full.model), full.optimizer.state_dict(),
                        resumed.losses, _params(resumed.model), resumed.optimizer.state_dict(),
                        steps, checkpoint)
    assert_identical(full.scheduler.state_dict(), resumed.scheduler.state_dict(),
                     "scheduler state")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_accelerate_resume_is_exact(accelerate_loop, tmp_path, name, backend):
    """OneCycleLR cycles beta1 (or the momentum) through the param groups. The checkpoint
    after step 7 is mid-epoch 2 (6 batches an epoch)."""
    _check_accelerate_resume(accelerate_loop, tmp_path, name, backend)
