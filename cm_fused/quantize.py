"""8-bit critical slots: blockwise absmax quantization (``buffer_dtype=torch.int8``).

A slot shaped like its parameter is stored as int8 values ``q`` (``cm_buffer``, the same
shape) and one fp32 scale per block of :data:`QBLOCK` consecutive elements of the
flattened slot (``cm_scales``, ``[topC, n_blocks(numel)]``; the last block of a tensor
may be short). docs/SPEC.md ("8-bit slots") defines it; every backend computes exactly this, in
this order, so the bytes agree:

- ``a = max |x|`` over the block; a block holding a NaN or an infinity is *non-finite*;
- ``scale = a / 127`` (fp32, rounded to nearest), NaN for a non-finite block;
- ``q = clamp(round_half_even(x / scale), -127, 127)`` where ``scale > 0`` (a finite
  block with a nonzero scale), else ``0``;
- the value a slot holds is ``q * scale`` (fp32): zeros for an all-zero block (and for
  unfilled slots, whose scales are 0), NaN for every element of a non-finite block.

The functions here are plain PyTorch: the reference backend, the diagnostics and the
tests use them; the fused kernels (csrc/step_kernels.h, cm_fused/triton/kernels.py)
compute the same inside their update pass.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Elements per scale. 256 keeps the scales at 4/256 B per slot element (topC 5: 0.08 B per
# parameter) while an outlier flattens at most 255 neighbours; it divides the chunk and
# block sizes of the fused kernels, so a block never straddles two programs.
QBLOCK = 256
QMAX = 127


def n_blocks(numel: int) -> int:
    """Scales per slot of a tensor of ``numel`` elements."""
    return -(-numel // QBLOCK)


def _blocks(x: Tensor) -> Tensor:
    """x flattened, zero-padded to whole blocks, as [n_blocks, QBLOCK] (zeros change
    neither a block's absmax nor its finiteness)."""
    flat = x.reshape(-1)
    pad = n_blocks(flat.numel()) * QBLOCK - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, QBLOCK)


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` (read as fp32) → (int8 values shaped like ``x``, fp32 scales
    ``[n_blocks(x.numel())]``)."""
    blocks = _blocks(x.float())
    finite = torch.isfinite(blocks).all(dim=1)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(finite, absmax / QMAX, float("nan"))
    ok = (scale > 0)[:, None]  # False for NaN too
    # (a block where ok is False divides by 0 or NaN here; torch.where discards it)
    q = torch.where(ok, torch.round(blocks / scale[:, None]).clamp(-QMAX, QMAX), 0.0)
    return q.to(torch.int8).view(-1)[:x.numel()].view(x.shape), scale


def dequantize(q: Tensor, scales: Tensor) -> Tensor:
    """The fp32 values held by int8 slots ``q`` (``[..., *shape]``) with their scales
    (``[..., n_blocks]``): ``q * scale`` of each element's block."""
    lead = scales.shape[:-1]
    numel = q[(0,) * len(lead)].numel() if len(lead) else q.numel()
    per = scales.repeat_interleave(QBLOCK, dim=-1)[..., :numel]
    return (q.reshape(*lead, numel).float() * per).reshape(q.shape)
