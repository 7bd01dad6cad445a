"""8-bit state, blockwise: critical slots (``buffer_dtype=torch.int8``, an absmax int8
code) and moments (``state_dtype=torch.int8``, an e4m3 code; at the end of this file).

A slot shaped like its parameter is stored as int8 values ``q`` (``cm_buffer``, the same
shape) and one fp32 scale per block of :data:`QBLOCK` consecutive elements of the
flattened slot (``cm_scales``, ``[topC, n_blocks(numel)]``; the last block of a tensor
may be short; a sharded parameter's blocks are its local shard's, its scales a per-shard
table: cm_fused/distributed.py). docs/SPEC.md ("8-bit slots") defines it; every backend computes exactly this, in
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


def slot_sum(q: Tensor, scales: Tensor) -> Tensor:
    """The sum of what int8 slots hold, slot 0 first, in fp32: the buffer's sum where no
    running sum is kept (docs/SPEC.md "Slots without a running sum")."""
    held = dequantize(q, scales)
    total = held[0]
    for j in range(1, q.shape[0]):
        total = total + held[j]
    return total

# ---------------------------------------------------------------- 8-bit moments

E4M3_MAX = 448.0  # the largest e4m3 value; a block's largest magnitude maps onto it
_E4M3_MIN_NORMAL = 2.0 ** -6
SIGN = 0x80  # the momentum code's sign bit


def e4m3_code(y: Tensor) -> Tensor:
    """The e4m3 code (int32, 0..126) nearest to each fp32 ``y`` in ``[0, 448]``, ties to
    an even code: ``rint(y·512)`` below 2^-6, else the fp32 bits rounded to 3 mantissa
    bits and rebiased (docs/SPEC.md "8-bit moments")."""
    b = y.view(torch.int32)
    normal = ((b + 0x7FFFF + ((b >> 20) & 1)) >> 20) - 960
    subnormal = torch.round(y * 512.0).to(torch.int32)  # torch.round: half to even
    return torch.where(y < _E4M3_MIN_NORMAL, subnormal, normal)


def e4m3_value(code: Tensor) -> Tensor:
    """The fp32 value of each e4m3 code (int32, 0..126)."""
    subnormal = code.float() * 2.0 ** -9
    normal = ((code + 960) << 20).view(torch.float32)
    return torch.where(code < 8, subnormal, normal)


def quantize_moment(x: Tensor, second: bool) -> tuple[Tensor, Tensor]:
    """A moment's new values ``x`` (fp32) → (uint8 codes shaped like ``x``, fp32 scales
    ``[n_blocks(x.numel())]``). ``second``: the non-negative second moment, coded by its
    square root; else the signed momentum."""
    blocks = _blocks(x.float())
    finite = torch.isfinite(blocks).all(dim=1)
    # (a float64 root rounded to fp32 is the correctly rounded fp32 root)
    mag = blocks.double().sqrt().float() if second else blocks.abs()
    scale = torch.where(finite, mag.amax(dim=1) / E4M3_MAX, float("nan"))
    ok = (scale > 0)[:, None]  # False for NaN too
    code = e4m3_code((mag / scale[:, None]).clamp(max=E4M3_MAX))
    if second:  # a positive second moment never reads as 0 (the update divides by it)
        code = torch.where((code == 0) & (mag > 0), 1, code)
    else:
        code = torch.where((blocks < 0) & (code != 0), code | SIGN, code)
    code = torch.where(ok, code, 0)
    return code.to(torch.uint8).view(-1)[:x.numel()].view(x.shape), scale


def dequantize_moment(codes: Tensor, scales: Tensor, second: bool) -> Tensor:
    """The fp32 values a moment's codes hold, with their block scales."""
    c = codes.reshape(-1).to(torch.int32)
    per = scales.repeat_interleave(QBLOCK)[:c.numel()]
    if second:
        t = e4m3_value(c) * per
        return (t * t).view(codes.shape)
    mag = e4m3_value(c & (SIGN - 1)) * per
    return torch.where((c & SIGN) != 0, -mag, mag).view(codes.shape)


class QuantizedMoment:
    """One tensor's 8-bit moment as the reference step reads and writes it: ``.to(dtype)``
    the values it holds, :meth:`commit` a new value (not where ``keep``, found_inf)."""

    def __init__(self, codes: Tensor, scales: Tensor, second: bool) -> None:
        self.codes, self.scales, self.second = codes, scales, second
        self.dtype = torch.float32  # what it holds

    def to(self, dtype: torch.dtype) -> Tensor:
        return dequantize_moment(self.codes, self.scales, self.second).to(dtype)

    def commit(self, new: Tensor, keep: Tensor | None) -> None:
        codes, scales = quantize_moment(new, self.second)
        if keep is not None:
            codes = torch.where(keep, self.codes, codes)
            scales = torch.where(keep, self.scales, scales)
        self.codes.copy_(codes)
        self.scales.copy_(scales)
