"""Registration with training libraries that build optimizers by name (timm).

Hugging Face Trainer, accelerate and Lightning take an optimizer object and need
nothing from here (docs/trainers.md).
"""
from __future__ import annotations

from .optimizers import SGDAM, AdamAM, AdamCG, AdamCM, RMSpropCG, SGDCG

# timm's name -> (class, what timm's factory may pass it, one line for its listing).
# (timm splits names at '_' for its 'lookahead_' prefix: the names have none)
TIMM_OPTIMIZERS = {
    "adamcm": (AdamCM, dict(has_betas=True), "Adam with Critical Momenta (cm_fused)"),
    "adamcg": (AdamCG, dict(has_betas=True), "Adam with critical gradients (cm_fused)"),
    "sgdcg": (SGDCG, dict(has_eps=False, has_momentum=True),
              "SGD with critical gradients (cm_fused)"),
    "rmspropcg": (RMSpropCG, dict(has_momentum=True),
                  "RMSprop with critical gradients (cm_fused)"),
    "adamam": (AdamAM, dict(has_betas=True), "AdamW with adaptive memory momentum (cm_fused)"),
    "sgdam": (SGDAM, dict(has_eps=False), "SGD with adaptive memory momentum (cm_fused)"),
}


def register_timm() -> list[str]:
    """Register the package's optimizers with timm's optimizer factory, so that
    ``timm.optim.create_optimizer_v2(model, "adamcm", lr=..., weight_decay=..., topC=5)``
    builds them, with timm's parameter groups (no weight decay on biases, norms and the
    model's ``no_weight_decay()`` list; ``layer_decay``) and any further keyword passed
    through. Registering again changes nothing. Returns the names registered.

    Raises ImportError if timm cannot be imported."""
    from timm.optim import OptimInfo, get_optimizer_info
    from timm.optim._optim_factory import default_registry  # what create_optimizer_v2 reads

    for name, (cls, capabilities, description) in TIMM_OPTIMIZERS.items():
        try:
            if get_optimizer_info(name).opt_class is cls:
                continue
        except ValueError:  # (not registered yet)
            pass
        default_registry.register(OptimInfo(name=name, opt_class=cls,
                                            description=description, **capabilities))
    return list(TIMM_OPTIMIZERS)
