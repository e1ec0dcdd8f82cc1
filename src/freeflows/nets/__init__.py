"""Networks usable as free-form encoders and decoders, or as velocity fields."""

from .egnn import EGNN, EGNNVelocity
from .resnet import ResidualBlock, ResNet
from .velocity import TimeMLP

__all__ = ["EGNN", "EGNNVelocity", "ResNet", "ResidualBlock", "TimeMLP"]
