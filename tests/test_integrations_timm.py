"""timm: the package's optimizers by name from timm's optimizer factory (its weight-decay
filtering, layer decay, keyword pass-through), timm's scheduler, and a checkpoint
midway resumed bit-identically; docs/examples/timm_factory.py is what runs.

timm imports torchvision, whose registry wheels are built against torch's CUDA build:
with the CPU build of torch that CI pins, ``import timm`` fails. CI therefore also
makes a side environment with torch's CUDA build (it runs on the CPU) and torchvision,
and names its interpreter in ``CM_FUSED_TIMM_PYTHON``; the last test runs this file
there (.ci/run).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import cm_fused
import cm_fused.integrations

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "timm_factory.py"

try:
    import timm  # noqa: F401
    TIMM_ERROR = None
except Exception as e:  # (torchvision without its ops raises RuntimeError, not ImportError)
    TIMM_ERROR = f"{type(e).__name__}: {e}"

needs_timm = pytest.mark.skipif(TIMM_ERROR is not None,
                                reason=f"timm does not import here ({TIMM_ERROR})")
# (in the side environment the C++ kernel would first be compiled for its torch)
BACKENDS = ("reference",) if os.environ.get("CM_FUSED_TIMM_CHILD") else ("reference", "cpu")


def example():
    spec = importlib.util.spec_from_file_location("timm_factory", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_timm
@pytest.mark.parametrize("name", list(cm_fused.integrations.TIMM_OPTIMIZERS))
def test_timm_builds_each_optimizer_by_name_with_its_groups(name):
    from timm.optim import create_optimizer_v2
    cm_fused.integrations.register_timm()
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32)
    extra = {} if name in ("adamam", "sgdam") else {"topC": 3}
    opt = create_optimizer_v2(model, name, lr=1e-3, weight_decay=0.05, backend="reference",
                              **extra)
    cls = cm_fused.integrations.TIMM_OPTIMIZERS[name][0]
    assert type(opt) is cls
    if extra:
        assert all(g["topC"] == 3 for g in opt.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in opt.param_groups}
    assert set(decay) == {0.0, 0.05}
    no_wd = set(decay[0.0])
    assert "pos_embed" in no_wd and "cls_token" in no_wd  # (model.no_weight_decay())
    assert all(n.endswith(".bias") or "norm" in n or n in model.no_weight_decay()
               for n in no_wd)
    assert all(p.ndim > 1 for g in opt.param_groups if g["weight_decay"] for p in g["params"])
    if name in ("sgdcg", "rmspropcg"):  # (timm's momentum default for such optimizers)
        assert opt.param_groups[0]["momentum"] == 0.9


@needs_timm
def test_registering_again_changes_nothing_and_warns_nothing(caplog):
    from timm.optim import get_optimizer_info
    cm_fused.integrations.register_timm()
    with caplog.at_level(logging.WARNING):
        names = cm_fused.integrations.register_timm()
    assert not caplog.records
    assert all(get_optimizer_info(n).opt_class is cm_fused.integrations.TIMM_OPTIMIZERS[n][0]
               for n in names)


@needs_timm
def test_layer_decay_groups_train_and_their_keys_survive_a_checkpoint(tmp_path):
    """timm's layer decay puts lr_scale and param_names into each group; its scheduler
    scales each group's lr by it; both load back."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler
    ex = example()

    def build():
        torch.manual_seed(0)
        model = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32)
        opt = create_optimizer_v2(model, "adamcm", lr=1e-3, weight_decay=0.05,
                                  layer_decay=0.7, backend="reference", topC=3)
        return model, opt, CosineLRScheduler(opt, t_initial=10, t_in_epochs=False)

    model, opt, sched = build()
    scales = {g["lr_scale"] for g in opt.param_groups}
    assert len(scales) > 2
    data = ex.batches(3)
    ex.train(model, opt, sched, data)
    base = [g["lr"] / g["lr_scale"] for g in opt.param_groups if g["lr_scale"] > 0]
    assert base == pytest.approx([base[0]] * len(base)) and base[0] < 1e-3  # (scheduled)
    ex.checkpoint(model, opt, sched, tmp_path / "ckpt.pt")
    model2, opt2, sched2 = build()
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    opt2.load_state_dict(saved["optimizer"])
    for g, g2 in zip(opt.param_groups, opt2.param_groups):
        assert g2["lr_scale"] == g["lr_scale"] and g2["lr"] == g["lr"]


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_example_resumes_bit_identically(backend, tmp_path):
    """docs/examples/timm_factory.py: 6 steps straight, against 3 steps, a checkpoint
    file, a fresh model, optimizer and scheduler loaded from it, and 3 more."""
    ex, name = example(), "adamcm"
    data = ex.batches(6)
    model_a, opt_a, sched_a = ex.build(name, backend)
    losses_a = ex.train(model_a, opt_a, sched_a, data)

    model_b, opt_b, sched_b = ex.build(name, backend)
    losses_b = ex.train(model_b, opt_b, sched_b, data[:3])
    ex.checkpoint(model_b, opt_b, sched_b, tmp_path / "ckpt.pt")
    model_c, opt_c, sched_c = ex.resume(tmp_path / "ckpt.pt", name, backend)
    losses_c = ex.train(model_c, opt_c, sched_c, data[3:], first_step=3)

    assert losses_b + losses_c == losses_a  # (exactly)
    for (n, p_a), p_c in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(p_a, p_c), n
    assert opt_c.backends_in_use == {"cpu": backend}
    assert opt_c.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] != 1e-3  # (scheduled)
    assert any("cm_buffer" in s for s in opt_c.state.values())


def test_timm_in_its_side_environment():
    """Where timm cannot import (CI's CPU torch), this file runs in the interpreter that
    CM_FUSED_TIMM_PYTHON names, and every test of it must pass there."""
    if TIMM_ERROR is None:
        pytest.skip("timm imports here: the tests above ran in this process")
    python = os.environ.get("CM_FUSED_TIMM_PYTHON")
    if not python:
        if os.environ.get("CI"):
            pytest.fail(f"timm does not import ({TIMM_ERROR}) and CM_FUSED_TIMM_PYTHON "
                        f"names no environment where it does (.ci/run makes one)")
        pytest.skip(f"timm does not import here ({TIMM_ERROR}); set CM_FUSED_TIMM_PYTHON "
                    f"to an interpreter where it does")
    out = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pathlib.Path(__file__)),
         "-k", "not side_environment"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
        env={**os.environ, "CM_FUSED_TIMM_CHILD": "1",
             "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])})
    tail = out.stdout[-3000:] + out.stderr[-3000:]
    assert out.returncode == 0, tail
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], tail
