"""cm_fused: critical-momenta and critical-gradients optimizers for PyTorch, fused.

``AdamCM`` (Adam with Critical Momenta) and the critical-gradients family ``AdamCG``,
``SGDCG``, ``RMSpropCG``, also importable under the authors' names (``Adam_CM``,
``Adam_C``, ``SGD_C``, ``RMSprop_C``); and the adaptive-memory momentum optimizers
``AdamAM`` and ``SGDAM``; ``SAM`` (sharpness-aware minimisation) around any of them.
Importing never fails for lack of the C++ extension or of Triton: those backends report
why they are unavailable through :func:`backends`, and ``backend="auto"`` falls back.
"""
from .registry import backends
from .optimizers import (AdamAM, AdamCG, AdamCM, Adam_C, Adam_CM, RMSprop_C, RMSpropCG,
                         SGD_C, SGDAM, SGDCG)
from .sam import SAM

__all__ = ["AdamCM", "AdamCG", "SGDCG", "RMSpropCG", "AdamAM", "SGDAM", "Adam_CM", "Adam_C",
           "SGD_C", "RMSprop_C", "SAM", "backends"]
__version__ = "0.3.0"
