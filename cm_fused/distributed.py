"""Sharded parameters (FSDP2, DTensor): what the step engine needs to step them exactly.

The kernels step local shards (``to_local()``), which is exact for every elementwise part
of a step. The one part that is not elementwise is the reduce pass: a tensor's priority
key (the norm of its whole gradient) and the adaptive-memory sums are sums over all of
its elements. For a tensor sharded over processes each process only sums its shard, so
the optimizer splits such a step (:class:`~cm_fused.contract.Phase`): REDUCE writes each
tensor's sums, :func:`sum_over_shards` all-reduces them over the mesh dimensions on which
the tensor is sharded (one collective per param group and dimension, all tensors in it),
and UPDATE decides from the complete sums, so every process makes the decisions one
process holding the whole tensors would make.

State follows torch's optimizers under FSDP2: a state tensor shaped like the parameter is
a DTensor with the parameter's mesh and placements; the critical buffer (one slot per
leading index) is a DTensor sharded the same way one dimension further in; scalars (step,
keys, counts, adaptive-memory scalars) are plain tensors, the same on every process.
``torch.distributed.checkpoint`` saves and reshards all of it, but for 8-bit state's
scales (:func:`scale_table`), which belong to one sharding.

Nothing here runs unless a parameter is a DTensor (only the DTensor class is imported, to
recognise one; the collectives' module is imported when one is needed).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor

from .quantize import n_blocks

try:  # torch built without distributed support has no DTensor: nothing is sharded then
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - every supported torch build has it
    DTensor = None  # type: ignore[assignment,misc]

# One entry per group of rows of `reduced` that are sharded alike: the mesh, the mesh
# dimensions to sum over, and the rows (None: all of them).
Exchange = list[tuple[Any, tuple[int, ...], "list[int] | None"]]


def is_sharded_type(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors: list[Tensor]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def refuse_flattened(name: str, params: list[Tensor]) -> None:
    """Refuse FSDP1's flattened parameters, on which a per-tensor norm (a priority key,
    the adaptive-memory sums) would silently become a per-shard one: the
    ``FlatParameter`` (``use_orig_params=False``) and the original parameters viewing it
    (``use_orig_params=True``: each process holds a flat piece of each), both of which
    torch marks ``_fsdp_flattened``. DeepSpeed ZeRO hands the optimizer flat partitions
    too, unmarked: not detectable here (docs/trainers.md says so)."""
    for p in params:
        if getattr(p, "_fsdp_flattened", False):
            raise TypeError(
                f"{name} cannot step FSDP1 (FullyShardedDataParallel) parameters: they are "
                f"flattened shards of several tensors, so each tensor's gradient norm would "
                f"silently be a shard's. Use FSDP2 (torch.distributed.fsdp.fully_shard), "
                f"whose DTensor parameters {name} steps exactly")


_LOCAL = operator.attrgetter("_local_tensor")


def local(tensors: list[Tensor]) -> list[Tensor]:
    """The local shards of DTensors; plain tensors as they are. (A list of DTensors only,
    the usual case, at C speed: what ``to_local()`` returns without autograd, read
    directly; per tensor per step this is host time a GPU step waits on.)"""
    if not torch.compiler.is_compiling():
        try:
            return list(map(_LOCAL, tensors))
        except AttributeError:  # a plain tensor among them
            pass
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def check_gradients(name: str, params: list[Tensor], grads: list[Tensor]) -> None:
    """Each gradient placed as its parameter (the grads are new every step: checked every
    step, before anything changes)."""
    for p, g in zip(params, grads):
        if not isinstance(p, DTensor):
            if isinstance(g, DTensor):
                raise RuntimeError(f"{name}: a plain parameter has a DTensor gradient")
        elif not isinstance(g, DTensor) or g.device_mesh != p.device_mesh \
                or tuple(g.placements) != tuple(p.placements):
            got = (f"{g.device_mesh} {tuple(g.placements)}" if isinstance(g, DTensor)
                   else "a plain tensor")
            raise RuntimeError(f"{name}: a DTensor parameter's gradient must be placed as the "
                               f"parameter ({p.device_mesh} {tuple(p.placements)}), got "
                               f"{got}; redistribute it first")


def exchange_for(name: str, params: list[Tensor], grads: list[Tensor]) -> Exchange | None:
    """Which rows of a group's reduce sums must be summed over which processes (None:
    nothing sharded). Raises, before anything changes, for placements a step cannot
    take."""
    if not any_dtensor(params) and not any_dtensor(grads):
        return None
    check_gradients(name, params, grads)
    rows: dict = {}
    for i, p in enumerate(params):
        if not isinstance(p, DTensor):
            continue
        dims = []
        for d, pl in enumerate(p.placements):
            if pl.is_partial():
                raise NotImplementedError(
                    f"{name}: a parameter with a Partial placement ({tuple(p.placements)}) "
                    f"is not a part of its value; the step takes Shard and Replicate "
                    f"placements only")
            if pl.is_shard():
                dims.append(d)
        if dims:
            rows.setdefault((p.device_mesh, tuple(dims)), []).append(i)
    if not rows:
        return []
    everything = len(rows) == 1 and len(next(iter(rows.values()))) == len(params)
    return [(mesh, dims, None if everything else idx) for (mesh, dims), idx in rows.items()]


def sum_over_shards(reduced: Tensor, exchange: Exchange) -> None:
    """All-reduce (sum) the rows of ``reduced`` over the mesh dimensions on which their
    tensors are sharded, in place: one collective per entry and dimension. (A sum over
    each dimension in turn is the sum over all of them.) No host sync."""
    import torch.distributed as dist

    for mesh, dims, rows in exchange:
        part = reduced if rows is None else reduced[rows]
        for d in dims:
            dist.all_reduce(part, group=mesh.get_group(d))
        if rows is not None:
            reduced[rows] = part


def refuse_rounding(name: str, params: list[Tensor]) -> None:
    """Stochastic rounding draws by element index in the whole tensor, which a shard of a
    dimension other than 0 does not hold contiguously (element_offset): refused."""
    for p in params:
        if isinstance(p, DTensor) and any(pl.is_shard() and pl.dim != 0
                                          for pl in p.placements):
            raise NotImplementedError(
                f"{name}: stochastic_rounding=True with a parameter placed as "
                f"{tuple(p.placements)}: only Shard(0) and Replicate placements (FSDP2's) "
                f"are supported")


def element_offset(p: Tensor) -> int:
    """Where p's local shard starts in the whole tensor, in elements of its row-major
    order (0 for a plain tensor): for a shard of dimension 0 (FSDP2's), element e of the
    shard is element offset + e of the whole."""
    if not isinstance(p, DTensor):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, start = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    stride = torch.empty(p.shape, device="meta").stride()
    return sum(o * s for o, s in zip(start, stride))


def same_coins(rand: Tensor, params: list[Tensor]) -> None:
    """critical_test's coin draws, made the same on every process of the parameters'
    meshes (broadcast from coordinate 0 of each dimension in turn): ranks whose random
    generators differ must still make the same insert decisions."""
    import torch.distributed as dist

    # (in parameter order: every rank must issue the same collectives in the same order)
    meshes = dict.fromkeys(p.device_mesh for p in params if isinstance(p, DTensor))
    for mesh in meshes:
        for d in range(mesh.ndim):
            group = mesh.get_group(d)
            dist.broadcast(rand, group=group, group_src=0)


def slots_like(p: Tensor, C: int, dtype: torch.dtype) -> Tensor:
    """Zeros of shape (C, *p.shape): the critical buffer. For a DTensor p, a DTensor whose
    local tensor holds C slots of p's local shard (each Shard placement one dimension
    further in)."""
    if not isinstance(p, DTensor):
        return torch.zeros((C, *p.shape), dtype=dtype, device=p.device)
    from torch.distributed.tensor import Shard

    placements = []
    for pl in p.placements:
        if pl.is_shard():
            dim = pl.dim if pl.dim >= 0 else pl.dim + p.ndim
            if type(pl) is not Shard:  # e.g. _StridedShard (FSDP2 over tensor parallel)
                raise NotImplementedError(
                    f"the critical buffer of a parameter placed as {tuple(p.placements)} is "
                    f"not supported (only Shard and Replicate placements)")
            placements.append(Shard(dim + 1))
        else:
            placements.append(pl)
    shard = p.to_local()
    shape = torch.Size((C, *p.shape))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(torch.zeros((C, *shard.shape), dtype=dtype, device=shard.device),
                              p.device_mesh, placements, run_check=False, shape=shape,
                              stride=stride)


# ---------------------------------------------------------------- 8-bit state's scales

EIGHT_BIT_LAYOUTS = "(Shard(0),) (FSDP2) or (Replicate(), Shard(0)) (HSDP)"


def check_8bit_placements(what: str, p: Tensor) -> None:
    """8-bit state quantizes the local shard in blocks of 256 elements, which is only the
    whole tensor's flat order for a shard of dim 0 over one mesh dimension: refuse any
    other placement (``what`` names the parameter and the state)."""
    shards = [pl for pl in p.placements if not pl.is_replicate()]
    if len(shards) != 1 or not _is_shard0(shards[0]):
        raise NotImplementedError(
            f"{what}: the parameter is placed as {tuple(p.placements)}; 8-bit state "
            f"(state_dtype=torch.int8, buffer_dtype=torch.int8) steps DTensor parameters "
            f"placed as {EIGHT_BIT_LAYOUTS} only")


def _is_shard0(pl) -> bool:
    from torch.distributed.tensor import Shard

    return type(pl) is Shard and pl.dim == 0  # (not _StridedShard: FSDP2 over TP)


def table_shape(p: Tensor, rows: int) -> tuple[int, int]:
    """The shape of the scales of ``rows`` 8-bit tensors shaped like ``p``: ``[rows,
    n_blocks]`` for a plain tensor; for a DTensor ``[shards, rows * most]``, a piece per
    shard of the sharded mesh dimension, ``most`` the most blocks a shard can hold under
    torch.chunk's rule (FSDP2's: ``ceil(d0 / shards)`` rows each, the last ones fewer or
    none). The world size in the shape makes DCP refuse to load it into another."""
    if not is_sharded_type(p):
        return rows, n_blocks(p.numel())
    d = next(d for d, pl in enumerate(p.placements) if pl.is_shard())
    shards, d0 = p.device_mesh.size(d), p.shape[0]
    most = n_blocks(-(-d0 // shards) * (p.numel() // d0)) if d0 else 0
    return shards, rows * most


def scale_table(p: Tensor, rows: int) -> Tensor:
    """Zeros: the fp32 scales of ``rows`` 8-bit tensors shaped like ``p`` (8-bit moments'
    ``moment_scales``, rows 2; int8 slots' ``cm_scales``, rows topC). For a DTensor (see
    :func:`table_shape`) each shard's scales differ, so they are a DTensor too, sharded on
    dim 0 over the parameter's sharded mesh dimension (replicated over the others): a
    plain tensor would be saved by DCP as one replicated value. Each process's piece is
    one row of ``rows * most`` values, of which the kernels step the first ``rows *
    n_blocks(local numel)`` as ``[rows, n_blocks]`` (:func:`scale_views`: contiguous, no
    copy), the rest staying 0."""
    shape = table_shape(p, rows)
    if not is_sharded_type(p):
        return torch.zeros(shape, dtype=torch.float32, device=p.device)
    from torch.distributed.tensor import Replicate, Shard

    shard = p.to_local()
    if rows * n_blocks(shard.numel()) > shape[1]:  # (a chunk rule other than torch's)
        raise NotImplementedError(
            f"a local shard of {shard.numel()} elements of a parameter of shape "
            f"{tuple(p.shape)} holds more blocks than the most expected "
            f"({shape[1] // rows}) under torch.chunk's rule")
    placements = [pl if pl.is_replicate() else Shard(0) for pl in p.placements]
    return DTensor.from_local(
        torch.zeros((1, shape[1]), dtype=torch.float32, device=shard.device),
        p.device_mesh, placements, run_check=False, shape=torch.Size(shape),
        stride=(shape[1], 1))


def scale_views(tables: list, rows: int, shards: list[Tensor]) -> list:
    """What the kernels step of each table (``shards``: the local shards stepped): a
    DTensor table's ``[rows, n_blocks(shard)]`` view of its local piece; plain tables
    (and None) as they are."""
    out = []
    for t, s in zip(tables, shards):
        if isinstance(t, DTensor):
            nb = n_blocks(s.numel())
            t = t._local_tensor.view(-1)[:rows * nb].view(rows, nb)
        out.append(t)
    return out

