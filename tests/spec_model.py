"""Independent transcriptions of docs/SPEC.md, for testing the reference backend.

Written the other way round from cm_fused/reference.py on purpose: float64, host-side
Python branches, per-slot Python lists, no torch.where, one class per optimizer. If the
reference agrees with these over long runs, it computes what the SPEC says (and not
merely what its author meant).

``step(rand=None)``: ``rand`` holds the critical_test coin draws of this step, one per
tensor with a gradient (the tests draw them as the optimizer does).
"""
from __future__ import annotations

import math

import torch


class Buffer:
    """Up to C slots with priority keys: fill, then replace the smallest key (first on
    ties) when the new key is strictly larger or the coin says so."""

    def __init__(self, C):
        self.C, self.slots, self.keys = C, [], []
        self.total = None  # S, the running sum, updated as SPEC says (not re-summed)
        self.inserts = 0  # fills and replacements

    def mean(self):
        return self.total / len(self.slots)

    def insert(self, key, value, lucky=False):
        value = value.clone()
        if len(self.slots) < self.C:
            self.slots.append(value)
            self.keys.append(key)
            self.total = value.clone() if self.total is None else self.total + value
            self.inserts += 1
            return
        j = min(range(self.C), key=lambda s: (self.keys[s], s))
        if lucky or key > self.keys[j]:
            self.total = self.total - self.slots[j]
            self.slots[j], self.keys[j] = value, key
            self.total = self.total + value
            self.inserts += 1

    def decay(self, lam):
        self.keys = [k * lam for k in self.keys]


class _Model:
    def __init__(self, params, topC, decay, synced, critical_test=0.0):
        self.params = params
        self.C, self.lam, self.synced, self.critical = topC, decay, synced, critical_test
        self.x = [p.detach().double().clone() for p in params]  # float64 shadow params
        self.state = [None] * len(params)
        self.steps = [0] * len(params)  # steps each tensor has taken

    def step(self, rand=None):
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        for i in live:
            self.steps[i] += 1
        grads = {i: self.params[i].grad.double() for i in live}
        norms = {i: math.sqrt(float((grads[i] ** 2).sum())) for i in live}
        for r, i in enumerate(live):
            key = sum(norms.values()) if self.synced else norms[i]
            lucky = rand is not None and float(rand[r]) < self.critical
            self._one(i, grads[i], key, lucky)
        return self.x


class SpecAdamCM(_Model):
    """docs/SPEC.md §2, AdamCM."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, topC=5, decay=0.7, synced=True, critical_test=0.0):
        super().__init__(params, topC, decay, synced, critical_test)
        self.h = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=weight_decay,
                      amsgrad=amsgrad)

    def _one(self, i, g, n, lucky):
        h = self.h
        x = self.x[i]
        if h["wd"] != 0:
            x.mul_(1 - h["lr"] * h["wd"])
        st = self.state[i]
        if st is None:  # first step: buffer seeded with the raw gradient, p does not move
            z = torch.zeros_like(x)
            st = self.state[i] = dict(step=1, m=z.clone(), v=z.clone(), vmax=z.clone(),
                                      buf=Buffer(self.C))
            st["buf"].insert(n, g)
            st["buf"].decay(self.lam)
            return
        st["m"] = h["b1"] * st["m"] + (1 - h["b1"]) * g
        a = st["m"] + st["buf"].mean()
        st["buf"].insert(n, st["m"], lucky)
        st["v"] = h["b2"] * st["v"] + (1 - h["b2"]) * a * a
        denom_v = st["v"]
        if h["amsgrad"]:
            st["vmax"] = torch.maximum(st["vmax"], st["v"])
            denom_v = st["vmax"]
        st["step"] += 1
        bc1 = 1 - h["b1"] ** st["step"]
        bc2 = 1 - h["b2"] ** st["step"]
        st["buf"].decay(self.lam)
        x.sub_((h["lr"] / bc1) * a / (denom_v.sqrt() / math.sqrt(bc2) + h["eps"]))


class SpecAdamCG(_Model):
    """docs/SPEC.md §3, AdamCG."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, topC=10, decay=0.7, synced=True, critical_test=0.0):
        super().__init__(params, topC, decay, synced, critical_test)
        self.h = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=weight_decay,
                      amsgrad=amsgrad)

    def _one(self, i, g, n, lucky):
        h = self.h
        x = self.x[i]
        st = self.state[i]
        if st is None:
            z = torch.zeros_like(x)
            st = self.state[i] = dict(step=0, m=z.clone(), v=z.clone(), vmax=z.clone(),
                                      buf=Buffer(self.C))
            u = g
            st["buf"].insert(n, g)
        else:
            u = g + st["buf"].mean()
            st["buf"].insert(n, g, lucky)
        st["step"] += 1
        bc1 = 1 - h["b1"] ** st["step"]
        bc2 = 1 - h["b2"] ** st["step"]
        if h["wd"] != 0:
            u = u + h["wd"] * x
        st["m"] = h["b1"] * st["m"] + (1 - h["b1"]) * u
        st["v"] = h["b2"] * st["v"] + (1 - h["b2"]) * u * u
        denom_v = st["v"]
        if h["amsgrad"]:
            st["vmax"] = torch.maximum(st["vmax"], st["v"])
            denom_v = st["vmax"]
        st["buf"].decay(self.lam)
        x.sub_((h["lr"] / bc1) * st["m"] / (denom_v.sqrt() / math.sqrt(bc2) + h["eps"]))


class SpecRMSpropCG(_Model):
    """docs/SPEC.md §3, RMSpropCG (no critical_test: replacement by priority only)."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, topC=10, decay=0.7, synced=True):
        super().__init__(params, topC, decay, synced)
        self.h = dict(lr=lr, alpha=alpha, eps=eps, wd=weight_decay, mu=momentum,
                      centered=centered)

    def _one(self, i, g, n, lucky):
        h = self.h
        x = self.x[i]
        st = self.state[i]
        if st is None:
            z = torch.zeros_like(x)
            st = self.state[i] = dict(sq=z.clone(), ga=z.clone(), mom=z.clone(),
                                      buf=Buffer(self.C))
            u = g
        else:
            u = st["buf"].mean()  # the buffer mean alone, before the insert
        st["buf"].insert(n, g)
        if h["wd"] != 0:
            u = u + h["wd"] * x
        st["sq"] = h["alpha"] * st["sq"] + (1 - h["alpha"]) * u * u
        if h["centered"]:
            st["ga"] = h["alpha"] * st["ga"] + (1 - h["alpha"]) * u
            avg = (st["sq"] - st["ga"] ** 2).sqrt() + h["eps"]
        else:
            avg = st["sq"].sqrt() + h["eps"]
        st["buf"].decay(self.lam)
        if h["mu"] > 0:
            st["mom"] = h["mu"] * st["mom"] + u / avg
            x.sub_(h["lr"] * st["mom"])
        else:
            x.sub_(h["lr"] * u / avg)


class SpecSGDCG(_Model):
    """docs/SPEC.md §3, SGDCG."""

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 topC=10, decay=0.7, synced=True, critical_test=0.0):
        super().__init__(params, topC, decay, synced, critical_test)
        self.h = dict(lr=lr, mu=momentum, damp=dampening, wd=weight_decay)

    def _one(self, i, g, n, lucky):
        h = self.h
        x = self.x[i]
        d = g + h["wd"] * x
        st = self.state[i]
        if st is None:
            st = self.state[i] = dict(buf=Buffer(self.C), mom=None)
            st["buf"].insert(n, d)
        else:
            a = d + st["buf"].mean()
            st["buf"].insert(n, d, lucky)
            d = a
        if self.lam != 0:  # quirk: decay 0 means no decay here
            st["buf"].decay(self.lam)
        if h["mu"] != 0:
            if st["mom"] is None:
                st["mom"] = d.clone()
            else:
                st["mom"] = h["mu"] * st["mom"] + (1 - h["damp"]) * d
            d = st["mom"]
        x.sub_(h["lr"] * d)


# ---------------------------------------------------------------- adaptive memory

def _dot(a, b):
    return float((a * b).sum())


class SpecSGDAM:
    """docs/SPEC.md §4, SGDAM: one beta for the whole optimizer, from the two planes."""

    def __init__(self, params, lr=0.1, beta_max=0.9, lam=0.1, weight_decay=0.0):
        self.params = params
        self.h = dict(lr=lr, bmax=beta_max, lam=lam, wd=weight_decay)
        self.x = [p.detach().double().clone() for p in params]
        self.d = [None] * len(params)
        self.beta = None

    def step(self, rand=None):
        h, lam = self.h, self.h["lam"]
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        g = {i: self.params[i].grad.double() + h["wd"] * self.x[i] for i in live}
        old = [i for i in live if self.d[i] is not None]
        D = sum(_dot(self.d[i] - g[i], self.d[i] - g[i]) for i in old)
        N = sum((1 + lam) * _dot(g[i], self.d[i]) - _dot(self.d[i] - g[i], g[i] + lam * self.d[i])
                for i in old)
        beta = min(max(N / D, 0.0), h["bmax"]) if D > 0 else 0.0
        self.beta = beta
        for i in live:
            if self.d[i] is None:
                self.d[i] = g[i].clone()
            else:
                self.d[i] = (beta + lam) / (1 + lam) * self.d[i] + (1 - beta) / (1 + lam) * g[i]
            self.x[i] = self.x[i] - h["lr"] * self.d[i]
        return self.x


class SpecAdamAM:
    """docs/SPEC.md §4, AdamAM: one beta per tensor, from the two planes."""

    def __init__(self, params, lr=1e-3, betas=(0.89, 0.999), eps=1e-8, weight_decay=0.0,
                 lam=0.1):
        self.params = params
        self.h = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=weight_decay, lam=lam)
        self.x = [p.detach().double().clone() for p in params]
        self.state = [None] * len(params)

    def step(self, rand=None):
        h, lam, mu, eta = self.h, self.h["lam"], self.h["wd"], self.h["lr"]
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g, x = p.grad.double(), self.x[i]
            st = self.state[i]
            if st is None:
                st = self.state[i] = dict(step=0, d=torch.zeros_like(x), v=torch.zeros_like(x),
                                          prod=1.0, prev_lr=0.0)
            st["step"] += 1
            st["v"] = h["b2"] * st["v"] + (1 - h["b2"]) * g * g
            vhat = st["v"] / (1 - h["b2"] ** st["step"])
            P = max(1 - h["b1"] * st["prod"], 1.1754943508222875e-38) * (vhat.sqrt() + h["eps"])
            d = st["d"]
            if st["step"] == 1:
                beta = h["b1"]
            else:
                delta, R = d - g, 1 + lam * P
                W = 1 / (P * R)
                D = _dot(delta * delta, W)
                M = _dot(delta * (g + lam * P * d), W)
                Z = mu * _dot(x, delta)
                G = (1 + mu * eta) * st["prev_lr"] * _dot(g, d / P + mu * x) / eta if eta > 0 else 0
                beta = min(max((G - M - Z) / D, 0.0), h["b1"]) if D > 0 else 0.0
            st["d"] = ((1 - beta) * g + (lam * P + beta) * d) / (1 + lam * P)
            if mu != 0:
                x = x * (1 - eta * mu)
            self.x[i] = x - eta * st["d"] / P
            st["prod"] *= beta
            st["prev_lr"] = eta
            st["beta"] = beta
        return self.x
