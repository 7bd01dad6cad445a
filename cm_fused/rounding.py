"""Stochastic rounding of the stepped parameters to bf16 or fp16, with random bits every
backend draws alike (docs/SPEC.md, "Stochastic rounding").

The bits come from a counter-based hash, not a generator: each element's bits are a
function of (seed, tensor, step, element), so the reference, the C++ and the Triton
kernels write the same bits, a run repeats itself, and a resumed run draws what the run
that went on drew. ``StepArgs.rounding`` carries, per tensor, the part of the hash that
does not change between steps (:func:`tensor_keys`) and the tensor's element offset;
the kernels hash in the step count and the element index.

The hash is written with int64 tensors holding uint32 values: every multiplier is below
2^31, so no product of a uint32 by it leaves int64.
"""
from __future__ import annotations

import torch
from torch import Tensor

MASK = 0xFFFFFFFF
MUL1, MUL2 = 0x21F0AAAD, 0x735A2D97  # both < 2^31 (see the module's docstring)
DTYPES = (torch.bfloat16, torch.float16)


def mix(x):
    """The 32-bit mixer (a bijection of uint32): int or int64 tensor in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK
    return x ^ (x >> 15)


def tensor_key(seed: int, index: int) -> int:
    """The part of a tensor's bits fixed for a run: ``mix(mix(seed) ^ index)``, with
    ``index`` the tensor's position among the optimizer's parameters."""
    return mix(mix(seed & MASK) ^ (index & MASK))


def element_bits(key: Tensor, step: Tensor, offset: Tensor, numel: int) -> Tensor:
    """uint32 bits (as int64) of every element of a tensor for one step: with
    ``k = mix(key ^ step)``, element ``e`` draws ``mix(k ^ ((offset + e) mod 2^32))``.
    ``step`` is the tensor's step count after this step (1 on its first)."""
    k = mix(key ^ (step.to(torch.int64) & MASK))
    e = (torch.arange(numel, dtype=torch.int64, device=key.device) + offset) & MASK
    return mix(k ^ e)


def uniform(bits: Tensor) -> Tensor:
    """fp32 in [0, 1): the top 24 bits, exactly."""
    return (bits >> 8).to(torch.float32) * 2.0 ** -24


def stochastic_round(x: Tensor, dtype: torch.dtype, u: Tensor) -> Tensor:
    """fp32 ``x`` rounded to ``dtype`` (bf16 or fp16): to its round-to-nearest value y,
    or to y's neighbour on x's side when ``u < |x − y| / |neighbour − y|``. Both
    differences are exact in fp32, so the choice is too. NaN, ±inf, x == y and x rounding
    to ±inf (past the largest finite value) keep y."""
    y = x.to(dtype)
    yf = y.float()
    bits = y.view(torch.int16).to(torch.int32)
    toward = torch.where(x > yf, 1, -1).to(torch.int32)
    # The next value away from y toward x: the magnitude steps up or down by one ulp
    # (bits of a negative value, as int16, are negative: their magnitude grows with -1).
    n_bits = torch.where(bits >= 0, bits + toward, bits - toward)
    n = n_bits.to(torch.int16).view(dtype)
    p = (x - yf).abs() / (n.float() - yf).abs()
    take = (u < p) & (x != yf) & yf.isfinite() & ~x.isnan()
    return torch.where(take, n, y)


def round_param(x: Tensor, dtype: torch.dtype, rounding: Tensor | None, step: Tensor) -> Tensor:
    """The stepped fp32 value ``x`` as a parameter of ``dtype`` stores it: stochastically
    rounded with the tensor's ``rounding`` row (key, offset), else as given (the store
    rounds to nearest)."""
    if rounding is None or dtype not in DTYPES:
        return x
    u = uniform(element_bits(rounding[0], step, rounding[1], x.numel())).view(x.shape)
    return stochastic_round(x.float(), dtype, u)
