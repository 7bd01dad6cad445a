"""cm_fused in timm: the optimizer by name from timm's factory, timm's scheduler, a
checkpoint midway and a resume.

    python docs/examples/timm_factory.py
"""
from __future__ import annotations

import torch
import timm
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler

import cm_fused.integrations

cm_fused.integrations.register_timm()  # 'adamcm', 'adamcg', 'sgdcg', 'rmspropcg', 'adamam', 'sgdam'


def batches(steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 4, (4,), generator=gen))
            for _ in range(steps)]


def build(opt_name: str = "adamcm", backend: str = "auto", **opt_kwargs):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=4, img_size=32)
    # timm's groups: no weight decay on biases, norms and model.no_weight_decay()
    opt = create_optimizer_v2(model, opt_name, lr=1e-3, weight_decay=0.05, backend=backend,
                              **opt_kwargs)
    sched = CosineLRScheduler(opt, t_initial=10, warmup_t=2, warmup_lr_init=1e-4,
                              t_in_epochs=False)  # (stepped per update)
    return model, opt, sched


def train(model, opt, sched, data, first_step: int = 0) -> list[float]:
    losses = []
    for i, (x, y) in enumerate(data, start=first_step):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step_update(i + 1)
        losses.append(loss.item())
    return losses


def checkpoint(model, opt, sched, path) -> None:
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict()}, path)


def resume(path, opt_name: str = "adamcm", backend: str = "auto", **opt_kwargs):
    model, opt, sched = build(opt_name, backend, **opt_kwargs)
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    return model, opt, sched


if __name__ == "__main__":
    import os
    import tempfile

    data = batches(8)
    model, opt, sched = build(topC=5)
    print("first half ", train(model, opt, sched, data[:4]))
    path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    checkpoint(model, opt, sched, path)
    model, opt, sched = resume(path, topC=5)
    print("second half", train(model, opt, sched, data[4:], first_step=4))
