"""The 8-bit slots' quantizer on its own (cm_fused/quantize.py, docs/SPEC.md "8-bit slots"): against
an independent element-by-element model, round-trip bounds, ties, zeros, non-finite
blocks and blocks at tensor ends. (The optimizers with int8 slots, every backend byte for
byte against the reference: test_matrix.py.)"""
import numpy as np
import pytest
import torch

import cm_fused
from cm_fused.quantize import QBLOCK, dequantize, n_blocks, quantize
from family import BACKENDS, require


def model(x: torch.Tensor):
    """docs/SPEC.md's 8-bit slots written out per block and element, in numpy float32."""
    flat = x.reshape(-1).numpy().astype(np.float32)
    qs, scales = [], []
    for start in range(0, len(flat), QBLOCK):
        block = flat[start:start + QBLOCK]
        if not np.isfinite(block).all():
            scales.append(np.float32("nan"))
            qs += [0] * len(block)
            continue
        scale = np.float32(np.abs(block).max()) / np.float32(127)
        scales.append(scale)
        for v in block:
            qs.append(int(min(max(np.rint(v / scale), -127), 127)) if scale > 0 else 0)
    return (torch.tensor(qs, dtype=torch.int8).reshape(x.shape),
            torch.tensor(np.array(scales, dtype=np.float32)))


def _values(numel, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=gen) * torch.logspace(-3, 3, numel).roll(seed)
    return x


@pytest.mark.parametrize("numel", [0, 1, 5, QBLOCK - 1, QBLOCK, QBLOCK + 1, 4097])
def test_matches_the_independent_model_and_blocks_end_with_the_tensor(numel):
    x = _values(numel, numel)
    q, s = quantize(x)
    q_model, s_model = model(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s.shape == (n_blocks(numel),) == ((numel + QBLOCK - 1) // QBLOCK,)
    assert torch.equal(q, q_model)
    assert torch.equal(s, s_model)
    if numel:  # the block's largest magnitude is stored as ±127, in every block
        blocks = q.reshape(-1).split(QBLOCK)
        assert all(b.abs().max().item() == 127 for b in blocks)


@pytest.mark.parametrize("shape", [(), (3, 5), (2, 300)])
def test_round_trip_error_is_at_most_half_a_step(shape):
    x = torch.randn(shape) * 10
    q, s = quantize(x)
    assert q.shape == x.shape
    back = dequantize(q, s)
    step = s.repeat_interleave(QBLOCK)[:x.numel()].reshape(shape)
    assert ((back - x).abs() <= 0.5 * step * (1 + 1e-6)).all()
    assert torch.equal(dequantize(*quantize(back)), back)  # quantized values are fixed points


def test_ties_round_to_even_and_zero_blocks_stay_zero():
    x = torch.zeros(3 * QBLOCK)
    x[:6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -0.5])  # scale exactly 1
    # block 1 stays all zero; block 2 holds one tiny value
    x[2 * QBLOCK] = 1e-30
    q, s = quantize(x)
    assert q[:6].tolist() == [127, 0, 2, 2, -2, 0]
    assert s[0].item() == 1.0 and s[1].item() == 0.0 and s[2].item() > 0
    assert (q[QBLOCK:2 * QBLOCK] == 0).all()
    assert (dequantize(q, s)[QBLOCK:2 * QBLOCK] == 0).all()
    assert q[2 * QBLOCK].item() == 127


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_poisons_its_block_only(bad):
    x = torch.randn(2 * QBLOCK + 7)
    x[QBLOCK + 3] = bad
    q, s = quantize(x)
    assert s[1].isnan() and (q[QBLOCK:2 * QBLOCK] == 0).all()
    back = dequantize(q, s)
    assert back[QBLOCK:2 * QBLOCK].isnan().all()
    assert back[:QBLOCK].isfinite().all() and back[2 * QBLOCK:].isfinite().all()
    q_model, s_model = model(x)
    assert torch.equal(q, q_model)
    torch.testing.assert_close(s, s_model, equal_nan=True, rtol=0, atol=0)


def test_dequantize_takes_a_whole_buffer_of_slots():
    C, shape = 3, (4, 100)  # 400 elements: two blocks per slot, the second short
    slots = torch.randn(C, *shape)
    q = torch.empty(C, *shape, dtype=torch.int8)
    s = torch.empty(C, n_blocks(400))
    for j in range(C):
        q[j], s[j] = quantize(slots[j])
    both = dequantize(q, s)
    for j in range(C):
        assert torch.equal(both[j], dequantize(q[j], s[j]))


# A block whose largest magnitude is subnormal: a / 127 rounds to a scale so coarse that
# a / scale is 190, which only the clamp keeps at 127 (in int8, 190 would wrap to -66).
SUBNORMAL_BLOCK = torch.tensor([190 * 2.0 ** -149, -95 * 2.0 ** -149, 2.0 ** -149, 0.0])


def test_a_block_with_a_subnormal_scale_stores_its_max_as_127():
    q, s = quantize(SUBNORMAL_BLOCK)
    q_model, s_model = model(SUBNORMAL_BLOCK)
    assert torch.equal(q, q_model) and torch.equal(s, s_model)
    assert q[0].item() == 127 and s.item() == 2.0 ** -149


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_stores_a_subnormal_block_as_the_quantizer_does(backend):
    """SGDCG at lr 0 inserts the gradient as it is: slot 0 holds the quantizer's bytes,
    and S what the slot holds."""
    require(backend)
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = SUBNORMAL_BLOCK.clone()
    opt = cm_fused.SGDCG([p], lr=0.0, topC=2, buffer_dtype=torch.int8, backend=backend)
    opt.step()
    opt.flush_buffers()
    st = opt.state[p]
    q, s = quantize(SUBNORMAL_BLOCK)
    assert torch.equal(st["cm_buffer"][0], q) and torch.equal(st["cm_scales"][0], s)
    assert torch.equal(st["cm_sum"], dequantize(q, s))
