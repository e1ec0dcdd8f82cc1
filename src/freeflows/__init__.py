"""freeflows: free-form flows and classic normalizing flows on PyTorch.

The library (this package minus ``freeflows.runner``, ``freeflows.cli`` and the plotting and data
helpers) needs only torch; ``freeflows.continuous`` also needs torchdiffeq.
"""

from .contract import DensityModel, Loss
from .distributions import MeanFreeNormal, StandardNormal
from .freeform import FreeFormFlow
from .hutchinson import hutchinson_vectors
from .jacobian import batch_jacobian, log_abs_det, log_abs_det_jacobian
from .nets import ResNet

__version__ = "0.1.0"

__all__ = [
    "DensityModel",
    "FreeFormFlow",
    "Loss",
    "MeanFreeNormal",
    "ResNet",
    "StandardNormal",
    "batch_jacobian",
    "hutchinson_vectors",
    "log_abs_det",
    "log_abs_det_jacobian",
]
