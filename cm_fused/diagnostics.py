"""What the critical buffers hold, as device tensors (no host sync), on request.

Nothing here runs during a step: the one number a step keeps for it is each tensor's
insert count (``cm_inserts``, a 0-dim int64 the decide writes anyway), and everything
else is computed from the state when :meth:`BufferDiagnostics.buffer_diagnostics` is
called (it reads every filled slot once).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import distributed
from .quantize import dequantize


class BufferDiagnostics:
    """The critical-buffer optimizers' :meth:`buffer_diagnostics`."""

    def buffer_diagnostics(self) -> list[dict[str, Tensor]]:
        """Per param group, 0-dim fp32 device tensors (NaN where nothing qualifies):

        - ``insert_rate``: inserts (fills and replacements) per tensor step since the
          previous call (the first call: since the first step);
        - ``fill``: filled slots / topC, averaged over the tensors;
        - ``mean_key``: the mean priority key of the filled slots, averaged over tensors;
        - ``variance``: mean over the filled slots of ``‖B_i − mean‖²`` (mean: of the
          filled slots), averaged over the tensors with a slot;
        - ``agreement``: mean cosine similarity between the highest-key slot and each
          other filled slot, averaged over the tensors with two or more
          (Malviya et al. 2024, Fig. 10).

        Tensors that have not stepped with a buffer yet are left out.
        """
        self.flush_buffers()
        marks = self.__dict__.setdefault("_diagnostic_marks", {})
        out = []
        for i, group in enumerate(self.param_groups):
            states = [self.state[p] for p in group["params"]
                      if "cm_buffer" in self.state.get(p, {})]
            if not states:
                nan = torch.tensor(float("nan"))
                out.append(dict(insert_rate=nan, fill=nan, mean_key=nan, variance=nan,
                                agreement=nan))
                continue
            if any(distributed.is_sharded_type(s["cm_buffer"]) for s in states):
                raise NotImplementedError("buffer_diagnostics: sharded (DTensor) buffers are "
                                          "not supported")
            inserts = torch.stack([s["cm_inserts"] for s in states]).sum().double()
            steps = torch.stack([s["step"] for s in states]).double().sum()
            last = marks.get(i)
            if last is not None and last[0].device == inserts.device:
                # (state replaced since, by a load or a reset: counted from zero again)
                fresh = (inserts < last[0]) | (steps < last[1])
                rate = torch.where(fresh, inserts / steps,
                                   (inserts - last[0]) / (steps - last[1]))
            else:
                rate = inserts / steps
            marks[i] = (inserts, steps)
            per = [_one(s, group["topC"]) for s in states]
            stats = {k: torch.stack([p[k] for p in per]) for k in per[0]}
            out.append(dict(insert_rate=rate.float(), fill=stats["fill"].mean(),
                            mean_key=_mean_where(stats["mean_key"], stats["has1"]),
                            variance=_mean_where(stats["variance"], stats["has1"]),
                            agreement=_mean_where(stats["agreement"], stats["has2"])))
        return out


def _mean_where(values: Tensor, ok: Tensor) -> Tensor:
    """Mean of values where ok; NaN where none is."""
    return torch.where(ok, values, 0.0).sum() / ok.sum()


def _one(st: dict, C: int) -> dict[str, Tensor]:
    B = st["cm_buffer"]
    B = dequantize(B, st["cm_scales"]) if B.dtype == torch.int8 else B.float()
    B = B.reshape(C, B[0].numel())  # [C, n]
    K = st["cm_keys"]
    k = st["cm_count"]
    filled = torch.arange(C, device=B.device) < k
    kf = k.clamp(min=1).float()
    mean = (B * filled[:, None]).sum(0) / kf
    spread = ((B - mean) ** 2).sum(1)
    top = torch.where(filled, K, float("-inf")).argmax()
    norms = B.norm(dim=1)
    cos = (B @ B[top]) / (norms * norms[top]).clamp(min=torch.finfo(torch.float32).tiny)
    others = filled & (torch.arange(C, device=B.device) != top)
    return dict(fill=k.float() / C,
                mean_key=torch.where(filled, K, 0.0).sum() / kf,
                variance=(spread * filled).sum() / kf,
                agreement=(cos * others).sum() / (k - 1).clamp(min=1).float(),
                has1=k >= 1, has2=k >= 2)
