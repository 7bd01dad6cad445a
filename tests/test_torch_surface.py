"""The surface torch's optimizers and the authors' classes have: every keyword of the
torch counterpart and of the authors' class with its meaning, positional arguments, the
implementation flags (fused, foreach, capturable, differentiable), keywords of another
optimizer refused."""
import pytest
import torch

import cm_fused
from cm_fused import AdamCM
from compare import assert_bit_identical, copy_params, make_params, run_lockstep, set_grads
from family import FAMILY, ref, require


# The authors' classes' keyword arguments, all of them (cmoptimizer.optim, as released).
AUTHORS_KEYWORDS = {
    "Adam_CM": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, decay=0.7, kappa=1.0, topC=5,
                    weight_decay=0.0, amsgrad=False, critical_test=0.0, synced=True,
                    buffer_dtype=None),
    "Adam_C": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, decay=0.7, kappa=1.0, topC=10,
                   weight_decay=0.0, amsgrad=False, critical_test=0.0, synced=True,
                   buffer_dtype=None),
    "SGD_C": dict(lr=1e-3, kappa=1.0, dampening=0.0, weight_decay=0.0, momentum=0.0,
                  decay=0.7, topC=10, critical_test=0.0, synced=True, buffer_dtype=None),
    "RMSprop_C": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                      centered=False, decay=0.7, kappa=1.0, topC=10, synced=True,
                      buffer_dtype=None),
}


TORCH_KEYWORDS = {
    "AdamCM": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False),
    "AdamCG": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False),
    "SGDCG": dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0),
    "RMSpropCG": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                      centered=False),
}


@pytest.mark.parametrize("name", list(AUTHORS_KEYWORDS))
def test_the_authors_classes_names_and_keywords(name):
    p = torch.nn.Parameter(torch.ones(2))
    opt = getattr(cm_fused, name)([p], **AUTHORS_KEYWORDS[name])
    assert isinstance(opt, torch.optim.Optimizer)
    assert {k: opt.defaults[k] for k in AUTHORS_KEYWORDS[name]} == AUTHORS_KEYWORDS[name]
    assert opt.defaults["topC"] == AUTHORS_KEYWORDS[name]["topC"]  # the authors' default


@pytest.mark.parametrize("name", list(TORCH_KEYWORDS))
def test_torch_counterparts_keywords(name):
    p = torch.nn.Parameter(torch.ones(2))
    opt = getattr(cm_fused, name)([p], **TORCH_KEYWORDS[name])
    assert {k: opt.defaults[k] for k in TORCH_KEYWORDS[name]} == TORCH_KEYWORDS[name]


@pytest.mark.parametrize("name", list(FAMILY))
def test_every_keyword_of_the_torch_counterpart_is_accepted_with_its_default(name):
    """Drop-in: each keyword torch's class takes (from its signature, in this torch), with
    torch's default value, is accepted; the optimizer then steps."""
    import inspect
    member = FAMILY[name]
    torch_kw = {k: p.default for k, p in inspect.signature(member.torch_cls.__init__)
                .parameters.items() if k not in ("self", "params")}
    params = make_params([(3,)])
    opt = member.cls(params, **torch_kw)
    set_grads(params, 0)
    opt.step()


def test_differentiable_is_refused_clearly():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        AdamCM([p], differentiable=True)


@pytest.mark.parametrize("kw,match", [
    (dict(fused=True, backend="reference"), "backend='reference'"),
    (dict(fused=False, backend="cpu"), "backend='cpu'"),
    (dict(fused=True, foreach=True), "cannot be asked for together"),
    (dict(nesterov=True, momentum=0.9), "Nesterov momentum is not defined"),
    (dict(nesterov=True, kappa=0.0), "requires a momentum and zero dampening"),
], ids=str)
def test_contradictory_implementation_keywords_are_refused(kw, match):
    cls = cm_fused.SGDCG if "nesterov" in kw else AdamCM
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.ones(2))], **kw)


def test_fused_true_requires_a_fused_backend_at_construction():
    """As torch's fused=True: refused when no fused backend can step the parameters (here
    fp64), at construction, with the reason; auto does not fall back."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="fused=True, but no fused backend"):
        AdamCM([p], fused=True)
    opt = AdamCM([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(RuntimeError, match="fused=True"):
        opt.add_param_group({"params": [p], "fused": True})
    assert len(opt.param_groups) == 1  # the group was not added


def test_fused_false_means_the_reference_and_fused_true_a_fused_backend():
    require("cpu")
    for fused, want in ((False, "reference"), (True, "cpu"), (None, "cpu")):
        params = make_params([(3,)])
        opt = AdamCM(params, fused=fused)
        set_grads(params, 0)
        opt.step()
        assert opt.backends_in_use == {"cpu": want}, fused


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", list(FAMILY))
def test_kappa_zero_foreach_flag_runs_torchs_matching_code(name, foreach):
    """kappa=0 with torch's foreach=True/False: bit-identical to the torch optimizer with
    the same flag (on the default backend)."""
    member = FAMILY[name]
    kw = dict(lr=1e-2, weight_decay=0.1, **(dict(momentum=0.9) if name == "sgdcg" else {}))
    params_a = make_params([(5,), (2, 3)])
    params_b = copy_params(params_a)
    opt_a = member.cls(params_a, kappa=0.0, foreach=foreach, **kw)
    opt_b = member.torch_cls(params_b, foreach=foreach, **kw)
    for t in range(5):
        set_grads(params_a, t)
        set_grads(params_b, t)
        opt_a.step()
        opt_b.step()
    assert_bit_identical(opt_a, params_a, opt_b, params_b)


def test_capturable_is_accepted_and_changes_nothing_on_cpu():
    """Every backend's step already keeps its scalars on the device (no host read), so
    capturable=True steps exactly as capturable=False; at kappa=0 on CPU torch's
    non-capturable code runs (torch's own capturable code refuses CPU tensors)."""
    for kappa in (1.0, 0.0):
        run_lockstep(lambda ps: ref(ps, capturable=True, kappa=kappa),
                     lambda ps: ref(ps, kappa=kappa), [(4,), (2, 2)], steps=4)


def test_positional_arguments_stop_where_torch_and_the_authors_disagree():
    """torch.optim.Adam(params, lr, betas, eps, weight_decay) vs the authors' Adam_CM(params,
    lr, betas, eps, decay): a fifth positional argument would mean two different things,
    so it is refused rather than bound to either. SGD: torch's second is momentum, the
    authors' kappa."""
    p = torch.nn.Parameter(torch.ones(2))
    AdamCM([p], 1e-3, (0.9, 0.99), 1e-8)
    cm_fused.AdamCG([p], 1e-3, (0.9, 0.99), 1e-8)
    cm_fused.SGDCG([p], 1e-3)
    cm_fused.RMSpropCG([p], 1e-2, 0.99, 1e-8, 0.0, 0.0, False)
    with pytest.raises(TypeError):
        cm_fused.RMSpropCG([p], 1e-2, 0.99, 1e-8, 0.0, 0.0, False, 0.7)
    with pytest.raises(TypeError):
        AdamCM([p], 1e-3, (0.9, 0.99), 1e-8, 0.01)
    with pytest.raises(TypeError):
        cm_fused.SGDCG([p], 1e-3, 0.9)


def test_keywords_of_another_optimizer_are_refused():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(TypeError, match="betas"):
        cm_fused.SGDCG([p], betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="momentum"):
        cm_fused.AdamCG([p], momentum=0.9)
