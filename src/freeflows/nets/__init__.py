"""Networks usable as free-form encoders and decoders, or as velocity fields."""

from .resnet import ResidualBlock, ResNet
from .velocity import TimeMLP

__all__ = ["ResNet", "ResidualBlock", "TimeMLP"]
