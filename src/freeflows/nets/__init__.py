"""Networks usable as free-form encoders and decoders, or as velocity fields.

:class:`ResNet`, :class:`ConvResNet` (images) and :class:`EGNN` map an event to an event of the
same shape and start as the identity, as a free-form flow's encoder and decoder should; :class:`TimeMLP` and
:class:`EGNNVelocity` are velocity fields ``f(t, x)`` for :class:`~freeflows.CNF`, zero at
initialisation.

Example:
    >>> import torch, freeflows as ff
    >>> from freeflows.nets import ResNet
    >>> flow = ff.FreeFormFlow(ResNet(3, hidden=16), ResNet(3, hidden=16), ff.StandardNormal(3))
    >>> flow.sample(4).shape
    torch.Size([4, 3])
"""

from .conv import ConvResidualBlock, ConvResNet
from .egnn import EGNN, EGNNVelocity
from .resnet import ResidualBlock, ResNet
from .velocity import TimeMLP

__all__ = ["ConvResNet", "ConvResidualBlock", "EGNN", "EGNNVelocity", "ResNet", "ResidualBlock", "TimeMLP"]
