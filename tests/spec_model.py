"""An independent transcription of shared/SPEC.md, for testing the reference backend.

Written the other way round from cm_fused/reference.py on purpose: float64, host-side
Python branches, per-slot Python lists, no torch.where. If both agree over long runs, the
reference computes what SPEC.md says (and not merely what its author meant).
"""
from __future__ import annotations

import math

import torch


class SpecAdamCM:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, topC=5, decay=0.7, synced=True):
        self.params = params
        self.h = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=weight_decay,
                      amsgrad=amsgrad, C=topC, lam=decay, synced=synced)
        self.x = [p.detach().double().clone() for p in params]  # float64 shadow params
        self.state = [None] * len(params)

    def step(self):
        h = self.h
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = {i: self.params[i].grad.double() for i in live}
        norms = {i: math.sqrt(float((grads[i] ** 2).sum())) for i in live}
        for i in live:
            key = sum(norms.values()) if h["synced"] else norms[i]
            self._one(i, grads[i], key)
        return self.x

    def _one(self, i, g, n):
        h = self.h
        x = self.x[i]
        if h["wd"] != 0:
            x.mul_(1 - h["lr"] * h["wd"])
        st = self.state[i]
        if st is None:  # first step: buffer seeded with the raw gradient, p does not move
            z = torch.zeros_like(x)
            self.state[i] = dict(step=1, m=z.clone(), v=z.clone(), vmax=z.clone(),
                                 B=[g.clone()], K=[n * h["lam"]], S=g.clone())
            return
        st["m"] = h["b1"] * st["m"] + (1 - h["b1"]) * g
        a = st["m"] + st["S"] / len(st["B"])
        if len(st["B"]) < h["C"]:
            st["B"].append(st["m"].clone())
            st["K"].append(n)
            st["S"] = st["S"] + st["B"][-1]
        else:
            j = min(range(len(st["K"])), key=lambda s: (st["K"][s], s))
            if n > st["K"][j]:
                st["S"] = st["S"] - st["B"][j]
                st["B"][j] = st["m"].clone()
                st["K"][j] = n
                st["S"] = st["S"] + st["B"][j]
        st["v"] = h["b2"] * st["v"] + (1 - h["b2"]) * a * a
        denom_v = st["v"]
        if h["amsgrad"]:
            st["vmax"] = torch.maximum(st["vmax"], st["v"])
            denom_v = st["vmax"]
        st["step"] += 1
        bc1 = 1 - h["b1"] ** st["step"]
        bc2 = 1 - h["b2"] ** st["step"]
        st["K"] = [k * h["lam"] for k in st["K"]]
        x.sub_((h["lr"] / bc1) * a / (denom_v.sqrt() / math.sqrt(bc2) + h["eps"]))
