"""Mixed precision and torch.compile as training code uses them, through the runnable
examples in docs/examples/ (each test drives the example's own functions).

* AMP: float16 autocast with torch.amp.GradScaler in the frameworks' order
  (scale → backward → unscale_ → clip_grad_norm_ → step → update), the scale large
  enough that the first steps and some later ones overflow (skipped steps), growth and
  backoff factors that are not powers of two; and a bfloat16 autocast forward (no
  scaler). With ``kappa=0`` every FAMILY optimizer is its torch counterpart bit for bit
  on both the reference and the C++ backend; with the buffer on, the C++ backend is the
  reference within tests/compare.py's float32 tolerance.
* torch.compile of a whole training step (forward, loss, backward, optimizer.step(),
  optimizer.zero_grad()): the graphs and graph breaks counted, no recompilation after
  the first step, and the eager run's trajectory.
"""
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch

from compare import assert_bit_identical, assert_close, assert_same_state
from family import EVERY, FAMILY, make, require

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"cm_fused_example_{name}",
                                                  EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


mp = _load("mixed_precision")
cts = _load("compiled_train_step")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


# ------------------------------------------------------------ mixed precision

STEPS = 20
# kappa=0 configurations: defaults, and the hyperparameters torch's code branches on
# (weight decay, amsgrad, maximize, momentum created after skipped first steps, centered).
KAPPA0 = {
    "adamcm": [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1, amsgrad=True)],
    "adamcg": [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True)],
    "sgdcg": [dict(lr=1e-2), dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.05)],
    "rmspropcg": [dict(lr=1e-3), dict(lr=1e-3, momentum=0.9, centered=True,
                                      weight_decay=0.05)],
}


class FusedSGDSkippingFirst(torch.optim.SGD):
    """torch's fused SGD, less its bug with a skipped first step: it creates the momentum
    buffers uninitialised (torch.empty_like) and marks the step the first, so a first
    step that found_inf skips leaves garbage in them (NaN params from the next step;
    LibreYOLO/libreyolo#771 met it). SGDCG takes every step before the buffers exist
    with torch's for-loop code, whose first step is fused's (cm_fused/optimizers.py,
    _torch_fused_ok); so does this twin: while the buffers are still to be created, a
    step with found_inf set is not taken at all."""

    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item() != 0 and any(
                "momentum_buffer" not in self.state[p]
                for g in self.param_groups for p in g["params"] if p.grad is not None):
            return None
        return super().step(closure)


def torch_twin(name, backend, kw):
    """torch's optimizer as kappa=0 runs it on ``backend``: the for-loop code for the
    reference, fused (foreach where torch has none: RMSprop) for the C++ backend, with
    our defaults where torch's differ (AdamW's weight_decay)."""
    member = FAMILY[name]
    known = inspect.signature(member.torch_cls.__init__).parameters
    kw = {**{k: v for k, v in member.cls.HYPERPARAMETERS.items()
             if k in known and k not in ("foreach", "fused")}, **kw}
    cls = member.torch_cls
    if backend == "reference":
        impl = dict(foreach=False)
    elif member.torch_fused:
        impl = dict(fused=True)
        if name == "sgdcg" and kw["momentum"] != 0:
            cls = FusedSGDSkippingFirst
    else:
        impl = dict(foreach=True)
    return lambda params: cls(params, **impl, **kw)


def assert_same_trajectory(a, b, exact, what=""):
    """Two mp.Run's: the same scales, skipped steps, losses and params after every step
    (exactly, or within the float32 tolerance)."""
    assert a.scales == b.scales and a.skipped == b.skipped, what
    for t, (pa, pb) in enumerate(zip(a.params, b.params)):
        for i, (x, y) in enumerate(zip(pa, pb)):
            if exact:
                assert torch.equal(x, y), f"{what} step {t} param {i}: " \
                    f"max diff {(x - y).abs().max().item():.3g}"
            else:
                assert_close(x, y, torch.float32, f"{what} step {t} param {i}")
    if exact:
        assert a.losses == b.losses, what


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name,i", [(n, i) for n, cs in KAPPA0.items() for i in range(len(cs))])
def test_amp_loop_at_kappa0_is_torch_bit_for_bit(name, i, backend):
    """float16 autocast + GradScaler, unscale_ and clip_grad_norm_ before the step: the
    same trajectory as torch's optimizer, bit for bit, skipped steps included (the first
    two, before any state exists, and two later ones). torch's for-loop (reference) and
    foreach (RMSprop) optimizers are skipped by the scaler itself; ours and torch's fused
    ones take the step with found_inf set and change nothing."""
    require(backend)
    kw = KAPPA0[name][i]
    ours = mp.train(make(name, backend, kappa=0.0, **kw), STEPS)
    theirs = mp.train(torch_twin(name, backend, kw), STEPS)
    # overflows at the start (before any state exists) and later; most steps taken
    assert ours.skipped[:2] == [True, True] and 2 <= sum(ours.skipped[2:]) <= 6, ours.skipped
    assert len(set(ours.scales)) > 3 and ours.scales[-1] < ours.scales[0]
    assert_same_trajectory(ours, theirs, exact=True, what=f"{name} {kw}")
    assert_bit_identical(ours.optimizer, list(ours.model.parameters()),
                         theirs.optimizer, list(theirs.model.parameters()))
    # skipped steps do not count
    steps = STEPS - sum(ours.skipped)
    assert all(s["step"].item() == steps for s in ours.optimizer.state.values()
               if "step" in s)  # (torch's SGD keeps no step count)


BUFFERED = {n: [dict(), dict(m.configs["all"])] for n, m in EVERY.items()}


@pytest.mark.parametrize("name,i", [(n, i) for n in EVERY for i in range(2)])
def test_amp_loop_cpu_backend_matches_reference(name, i):
    """The same loop with the buffer on (AdamAM/SGDAM: adaptive memory): the C++ backend
    follows the reference within the float32 tolerance, params every step and the whole
    state at the end (fill and step counts exactly)."""
    require("cpu")
    kw = BUFFERED[name][i]
    cpu = mp.train(make(name, "cpu", **kw), STEPS)
    ref = mp.train(make(name, "reference", **kw), STEPS)
    assert sum(cpu.skipped) >= 4
    assert_same_trajectory(cpu, ref, exact=False, what=f"{name} {kw}")
    assert_same_state(cpu.optimizer, list(cpu.model.parameters()),
                      ref.optimizer, list(ref.model.parameters()), torch.float32)
    if EVERY[name].buffered:
        counts = [s["cm_inserts"].item() for s in cpu.optimizer.state.values()]
        assert max(counts) > 0  # the buffer was used


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(EVERY))
def test_bf16_autocast_forward(name, backend):
    """A bfloat16 autocast forward with float32 params and gradients (no scaler, as the
    frameworks' bf16-mixed): at kappa=0 torch's optimizer bit for bit; with the buffer,
    the C++ backend within the float32 tolerance of the reference."""
    require(backend)
    bf16 = torch.bfloat16
    if name in KAPPA0:
        kw = KAPPA0[name][1]
        ours = mp.train(make(name, backend, kappa=0.0, **kw), STEPS, dtype=bf16)
        theirs = mp.train(torch_twin(name, backend, kw), STEPS, dtype=bf16)
        assert not any(ours.skipped) and ours.scales == [1.0] * STEPS
        assert ours.model[0].weight.grad.dtype == torch.float32
        assert_same_trajectory(ours, theirs, exact=True, what=f"{name} kappa=0")
        assert_bit_identical(ours.optimizer, list(ours.model.parameters()),
                             theirs.optimizer, list(theirs.model.parameters()))
    if backend == "cpu":
        kw = BUFFERED[name][1]
        cpu = mp.train(make(name, "cpu", **kw), STEPS, dtype=bf16)
        ref = mp.train(make(name, "reference", **kw), STEPS, dtype=bf16)
        assert_same_trajectory(cpu, ref, exact=False, what=f"{name} {kw}")
        assert_same_state(cpu.optimizer, list(cpu.model.parameters()),
                          ref.optimizer, list(ref.model.parameters()), torch.float32)


# ------------------------------------------------------------ torch.compile of a whole step

COMPILE_STEPS = 6
# The graphs of a compiled whole training step (docs/examples/compiled_train_step.py):
# 1. forward + loss (AOTAutograd compiles the backward with it); ``loss.backward()`` is a
#    graph break (dynamo does not trace Tensor.backward without compiled autograd);
# 2. ``optimizer.step()``, resumed after the break: the whole step in one graph;
#    ``optimizer.zero_grad()`` is a graph break (dynamo skips Optimizer.zero_grad on
#    purpose), and the frame resumed after it only returns the loss: no graph.
GRAPHS, GRAPH_BREAKS = 2, 2


def check_compiled_run(name, backend, compiler, kappa=None):
    """Compile cts.train_step, run COMPILE_STEPS steps with recompilation an error,
    count graphs and breaks, compare with the eager run of the same optimizer; returns
    the largest parameter difference."""
    from torch._dynamo.utils import counters
    require(backend)
    kw = {} if kappa is None else dict(kappa=kappa)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = cts.train(make(name, backend, **kw), COMPILE_STEPS, compiler=compiler)
    # the same graphs after the first step as after the last: nothing recompiled
    assert compiled.graphs == [GRAPHS] * COMPILE_STEPS, compiled.stats
    assert compiled.stats["graph_breaks"] == GRAPH_BREAKS, compiled.stats
    reasons = " ".join(counters["graph_break"])
    assert "Tensor.backward()" in reasons and "Optimizer.zero_grad" in reasons, reasons
    eager = cts.train(make(name, backend, **kw), COMPILE_STEPS, compile=False)
    assert compiled.losses[-1] < compiled.losses[0]  # it trains
    params_c, params_e = list(compiled.model.parameters()), list(eager.model.parameters())
    # Exact where the compiled graphs run the eager kernels: aot_eager's forward, and the
    # optimizer's own step (the C++ op, or the reference's ops, which aot_eager runs
    # unfused). Inductor's generated forward/backward code rounds differently, and
    # kappa=0 traces torch's for-loop Adam/RMSprop, decomposed: within tolerance.
    exact = compiler == "aot_eager" and kappa != 0.0
    if exact:
        assert_bit_identical(compiled.optimizer, params_c, eager.optimizer, params_e)
    else:
        assert_same_state(compiled.optimizer, params_c, eager.optimizer, params_e,
                          torch.float32, f"{name} {backend} {compiler}")
    return max((a - b).abs().max().item() for a, b in zip(compiled.params, eager.params))


def test_compiled_whole_train_step_adamcm_cpu():
    """torch.compile (inductor) of forward + loss + backward + AdamCM's C++ step +
    zero_grad: two graphs, two graph breaks, no recompilation over six steps, and the
    eager run's params and state within the float32 tolerance (3e-8 apart here)."""
    check_compiled_run("adamcm", "cpu", "inductor")


COMPILE_SLOW = [pytest.param(n, b, c, k, id=f"{n}-{b}-{c}-kappa{k}")
                for c in ("inductor", "aot_eager") for n in EVERY
                for b in ("cpu", "reference")
                for k in ((1.0, 0.0) if EVERY[n].buffered else (None,))
                if (n, b, c, k) != ("adamcm", "cpu", "inductor", 1.0)
                and not (c == "inductor" and k == 0.0)]


@pytest.mark.slow
@pytest.mark.parametrize("name,backend,compiler,kappa", COMPILE_SLOW)
def test_compiled_whole_train_step(name, backend, compiler, kappa):
    """Every optimizer on both backends (kappa=0 too, under aot_eager): the same two
    graphs and two breaks, no recompilation, the eager trajectory (exactly under
    aot_eager with the buffer on)."""
    check_compiled_run(name, backend, compiler, kappa)
