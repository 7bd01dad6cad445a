"""The paper suite (bench/paper/) end to end: a --smoke run of every experiment with the
public optimizer classes, and the measures it reports checked on known cases."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PAPER = Path(__file__).resolve().parent.parent / "bench" / "paper"
pytest.importorskip("sklearn", reason="the digits task needs scikit-learn (pip install .[test])")
pytest.importorskip("matplotlib", reason="the figures need matplotlib (pip install .[test])")


@pytest.fixture
def paper(monkeypatch):
    monkeypatch.syspath_prepend(str(PAPER))
    import common
    import surfaces
    return common, surfaces


def test_smoke_run_writes_every_result_and_figure(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(PAPER / "run.py"), "--smoke", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert set(r) == {"meta", "trajectories", "table5", "escape", "buffer_over_training",
                      "real_tasks"}
    names = set(r["meta"]["optimizers"])
    assert set(r["trajectories"]["levy"]) == names and set(r["table5"]["levy"]) == names
    assert set(r["escape"]["by_sharpness"]) == names
    for png in ("trajectories_goldstein_price", "trajectories_ackley", "trajectories_levy",
                "trajectories_ackley_rosenbrock", "escape_ratio", "buffer_over_training"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000
    summary = (tmp_path / "summary.md").read_text()
    assert "Escape ratio" in summary
    # --smoke has one start and one seed: no spread to print (no "± 0.000").
    assert r["meta"]["settings"]["seeds"] == 1 and r["real_tasks"]["settings"]["seeds"] == 1
    assert "±" not in summary and "| Adam | " in summary


def test_default_output_is_untracked(monkeypatch):
    """A run without --out never overwrites the committed bench/paper/results/: it goes
    to a folder .gitignore ignores."""
    monkeypatch.syspath_prepend(str(PAPER))
    import run
    root = PAPER.parent.parent
    out = run.DEFAULT_OUT.resolve()
    assert out != (PAPER / "results").resolve() and root.resolve() in out.parents
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "-q",
                              str(out / "results.json")], capture_output=True)
    assert ignored.returncode == 0, f"{out} is not ignored by git"


def test_sharpness_is_the_top_hessian_eigenvalue(paper):
    common, surfaces = paper
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    p = torch.nn.Parameter(torch.tensor([0.3, -0.2]))
    got = common.top_eigenvalue(lambda: 0.5 * p @ A @ p, [p], iters=50)
    assert abs(got - torch.linalg.eigvalsh(A).max().item()) < 1e-4
    # The escape family: eigenvalue s² at the sharp well's bottom (plus ~0.01 from the
    # flat well's tail).
    for s in (4.0, 8.0):
        f = surfaces.two_wells(s)
        q = torch.nn.Parameter(torch.tensor([3.0, 0.0]))
        assert abs(common.top_eigenvalue(lambda: f(q), [q], iters=50) - s * s) < 1e-2 * s * s


def test_surfaces_have_their_minima(paper):
    _, surfaces = paper
    for name, (f, box, best, value) in surfaces.SURFACES.items():
        at = f(torch.tensor(best)).item()
        assert abs(at - value) < 1e-4, name
        grid = torch.stack(torch.meshgrid(torch.linspace(box[0], box[1], 101),
                                          torch.linspace(box[2], box[3], 101),
                                          indexing="xy"), -1)
        assert f(grid).min().item() >= value - 1e-4, name
