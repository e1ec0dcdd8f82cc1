"""freeflows: free-form flows and classic normalizing flows on PyTorch.

The library (this package minus ``freeflows.runner``, ``freeflows.cli`` and the plotting and data
helpers) needs only torch; solving a :class:`CNF` also needs torchdiffeq, which is imported only
when an ODE is solved.

Direction convention: *forward* maps data to latent, *inverse* maps latent to data.

Every model follows one contract (:mod:`freeflows.contract`), is built from ``features`` (and
``condition_dim``) with options as keywords, and is saved and restored with :func:`save` and
:func:`load` (:mod:`freeflows.serialization`).

References:
    Draxler, Sorrenson, Zimmermann, Rousselot and Köthe, "Free-form flows: Make Any Architecture
    a Normalizing Flow" (AISTATS 2024), arXiv:2310.16624.

Example:
    >>> import torch, freeflows as ff
    >>> x = torch.randn(256, 2) * torch.tensor([1.0, 0.3])  # data
    >>> flow = ff.FreeFormFlow.resnet(2, hidden=32, beta=10.0)  # or ff.RealNVP(2), ff.CNF(2), ...
    >>> optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    >>> for _ in range(10):
    ...     optimizer.zero_grad()
    ...     flow.loss(x).value.backward()
    ...     optimizer.step()
    >>> flow.sample(4).shape, flow.log_prob(x[:4]).shape
    (torch.Size([4, 2]), torch.Size([4]))
"""

from .continuous import CNF
from .contract import DensityModel, DensityModule, Loss
from .distributions import MeanFreeNormal, StandardNormal
from .flows import IAF, MAF, NICE, Flow, Glow, PlanarFlow, RealNVP
from .freeform import FreeFormFlow
from .hutchinson import hutchinson_vectors
from .jacobian import batch_jacobian, log_abs_det, log_abs_det_jacobian
from .nets import ResNet
from .serialization import load, save

__version__ = "0.1.0"

__all__ = [
    "CNF",
    "Flow",
    "Glow",
    "IAF",
    "MAF",
    "NICE",
    "PlanarFlow",
    "RealNVP",
    "DensityModel",
    "DensityModule",
    "FreeFormFlow",
    "Loss",
    "MeanFreeNormal",
    "ResNet",
    "StandardNormal",
    "batch_jacobian",
    "hutchinson_vectors",
    "log_abs_det",
    "log_abs_det_jacobian",
    "load",
    "save",
]
