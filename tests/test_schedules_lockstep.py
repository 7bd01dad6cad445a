"""Lock step with the reference while hyperparameters change between steps, as a
scheduler changes them: lr drops and rises (float and tensor lr), weight decay changes
midway, on every optimizer and fused backend. A rule that reads this step's value where
the SPEC says the previous one (AdamAM's and SGDAM's prev_lr) is invisible at constant
hyperparameters."""
import pytest
import torch

from compare import assert_same_state, copy_params, make_params, set_grads
from family import EVERY, FUSED_BACKENDS, make, require

SHAPES = [(5,), (3, 4), (), (33,)]
LRS = [0.05, 0.05, 0.02, 0.02, 0.005, 0.03, 0.01, 0.01]


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", sorted(EVERY))
def test_a_schedule_stays_in_lock_step_with_the_reference(name, backend, tensor_lr, request):
    require(backend)
    if backend == "triton":
        request.getfixturevalue("small_chunks")
    params = make_params(SHAPES)
    twins = copy_params(params)
    kw = {"decay": 0.9, "topC": 3} if EVERY[name].buffered else {}
    lr = (lambda v: torch.tensor(v)) if tensor_lr else (lambda v: v)
    opts = [make(name, b, lr=lr(LRS[0]), **kw)(ps)
            for b, ps in ((backend, params), ("reference", twins))]
    for t, value in enumerate(LRS):
        for opt, ps in zip(opts, (params, twins)):
            group = opt.param_groups[0]
            if tensor_lr:
                group["lr"].fill_(value)
            else:
                group["lr"] = value
            group["weight_decay"] = 0.0 if t < 5 else 0.05
            set_grads(ps, t)
            torch.manual_seed(t)
            opt.step()
        assert_same_state(opts[0], params, opts[1], twins, torch.float32, f"step {t}")
