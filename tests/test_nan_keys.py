"""A NaN priority key in a full buffer, in a slot other than 0: with synced keys, a NaN
gradient element in one tensor while the buffers fill puts a NaN key into every
sibling's buffer. The insert rule (docs/SPEC.md) picks the smallest key, which is the
NaN, and replaces it only when the new key is strictly greater, which no comparison with
NaN is: the buffer keeps its slots and takes no further insert (without coins). Every
backend in lock step with the reference; a decide rule that does not take the NaN as
the minimum compares against a finite key and keeps replacing."""
import pytest
import torch

from compare import assert_same_state, copy_params, make_params, set_grads
from family import FAMILY, FUSED_BACKENDS, make, require

SHAPES = [(5,), (3, 4), (7,)]
NAN_STEP = 1  # while the buffers fill: the NaN key lands in slot 1


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_a_nan_key_in_a_later_slot_freezes_the_buffer(name, backend, request):
    require(backend)
    if backend == "triton":
        request.getfixturevalue("small_chunks")
    params = make_params(SHAPES)
    twins = copy_params(params)
    kw = dict(topC=3, decay=0.9, synced=True)
    opts = [make(name, b, **kw)(ps) for b, ps in ((backend, params), ("reference", twins))]
    for t in range(10):
        for opt, ps in zip(opts, (params, twins)):
            set_grads(ps, t)
            if t == NAN_STEP:
                ps[0].grad[2] = float("nan")
            opt.step()
        assert_same_state(opts[0], params, opts[1], twins, torch.float32, f"step {t}")
        keys = opts[1].state[twins[1]]["cm_keys"]
        if t == NAN_STEP:
            assert keys[NAN_STEP].isnan()  # (not vacuous: the sibling got the NaN key)
    for opt, ps in zip(opts, (params, twins)):
        for p in ps[1:]:  # the siblings: the NaN key stays, and only the fills inserted
            st = opt.state[p]
            assert st["cm_keys"][NAN_STEP].isnan() and st["cm_keys"].isnan().sum() == 1
            assert st["cm_inserts"].item() == 3
