"""cm_fused: Adam with Critical Momenta (Adam+CM) for PyTorch, fused.

Importing never fails for lack of the C++ extension or of Triton: those backends report
why they are unavailable through :func:`backends`, and ``backend="auto"`` falls back.
"""
from .registry import backends
from .optimizer import AdamCM

Adam_CM = AdamCM  # the authors' class name, so switching is a one-line change

__all__ = ["AdamCM", "Adam_CM", "backends"]
__version__ = "0.1.0"
