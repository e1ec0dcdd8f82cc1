"""Networks usable as free-form encoders and decoders, or as velocity fields."""

from .resnet import ResidualBlock, ResNet

__all__ = ["ResNet", "ResidualBlock"]
