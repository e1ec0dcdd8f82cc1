r"""A convolutional residual network on images that starts as the identity.

.. math:: h_{k+1} = h_k + r_k([h_k, c]), \qquad r_k = K_{\text{out}} * \sigma(K_{d} * \dots
   \sigma(K_{\text{in}} * [h_k, c])),

where :math:`h_k` are images ``[B, C, H, W]``, each :math:`K` a convolution with zero padding (the
spatial size is kept), :math:`\sigma` = SiLU (smooth, because free-form encoders are
differentiated twice), and a condition :math:`c` is broadcast over the pixels as extra input
channels. The last convolution :math:`K_{\text{out}}` of every residual branch is initialised to
zero, so at initialisation every :math:`r_k \equiv 0` and the network is exactly the identity;
its gradient is not zero, so it trains.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _image_condition(x: Tensor, c: Tensor | None) -> Tensor:
    """``x`` with the condition's features appended as constant channels."""
    if c is None:
        return x
    return torch.cat([x, c[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)


class ConvResidualBlock(nn.Module):
    r"""One convolutional residual block whose branch starts at zero:

    .. math:: h \mapsto h + r([h, c]), \qquad r = K_{\text{out}} * \sigma(\dots
       \sigma(K_{\text{in}} * [h, c])),

    with ``depth`` hidden convolutions of ``hidden`` channels and ``kernel_size`` × ``kernel_size``
    kernels (zero padding, so the spatial size is kept), :math:`\sigma` = SiLU, and
    :math:`K_{\text{out}}` initialised to zero.

    Args:
        channels: channels ``C`` of ``h``.
        hidden: channels of the hidden layers.
        depth: number of hidden convolutions (``>= 1``).
        kernel_size: odd kernel size.
        condition_dim: size of the condition ``c``; ``0`` for none.

    References:
        He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition" (2015),
        arXiv:1512.03385.

    Example:
        >>> import torch
        >>> from freeflows.nets import ConvResidualBlock
        >>> block = ConvResidualBlock(2, hidden=8)
        >>> h = torch.randn(4, 2, 6, 6)
        >>> torch.equal(block(h), h)  # the identity at initialisation
        True
    """

    def __init__(
        self, channels: int, hidden: int, depth: int = 2, kernel_size: int = 3, condition_dim: int = 0
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        pad = kernel_size // 2
        first = nn.Conv2d(channels + condition_dim, hidden, kernel_size, padding=pad)
        layers: list[nn.Module] = [first, nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(hidden, hidden, kernel_size, padding=pad), nn.SiLU()]
        out = nn.Conv2d(hidden, channels, kernel_size, padding=pad)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        layers.append(out)
        self.branch = nn.Sequential(*layers)

    def forward(self, h: Tensor, c: Tensor | None = None) -> Tensor:
        """:math:`h + r([h, c])`.

        Args:
            h: images ``[B, channels, H, W]``.
            c: conditions ``[B, condition_dim]``, or ``None``.

        Returns:
            ``[B, channels, H, W]``.
        """
        return h + self.branch(_image_condition(h, c))


class ConvResNet(nn.Module):
    r"""Convolutional residual network ``[B, C, H, W] -> [B, C, H, W]`` that starts as the
    identity: ``blocks`` residual blocks (:class:`ConvResidualBlock`), each a branch of ``depth``
    hidden convolutions of ``hidden`` channels (see the module docstring). With
    ``condition_dim > 0`` it takes a condition ``c`` of that many features, broadcast over the
    pixels of every block's input. Usable as the encoder and the decoder of a
    :class:`~freeflows.FreeFormFlow` on images.

    The receptive field of one output pixel spans :math:`1 + \text{blocks}\,(\text{depth} + 1)
    (\text{kernel\_size} - 1)` pixels in each direction; choose ``blocks`` so that it covers the
    image if every pixel should depend on every other.

    Args:
        channels: ``C``.
        hidden: channels of the hidden layers.
        blocks: number of residual blocks.
        depth: hidden convolutions per residual branch.
        kernel_size: odd kernel size of every convolution.
        condition_dim: size of the condition ``c``; ``0`` for an unconditional network.

    References:
        He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition" (2015),
        arXiv:1512.03385.

    Example:
        >>> import torch, freeflows as ff
        >>> from freeflows.nets import ConvResNet
        >>> net = ConvResNet(1, hidden=16, blocks=2, condition_dim=3)
        >>> x, c = torch.randn(5, 1, 8, 8), torch.randn(5, 3)
        >>> torch.equal(net(x, c), x)  # the identity at initialisation
        True
        >>> flow = ff.FreeFormFlow(ConvResNet(1, 8), ConvResNet(1, 8), ff.StandardNormal(1, 8, 8))
        >>> flow.sample(2).shape
        torch.Size([2, 1, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        blocks: int = 4,
        depth: int = 2,
        kernel_size: int = 3,
        condition_dim: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("hidden", hidden), ("blocks", blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(condition_dim, bool) or not isinstance(condition_dim, int) or condition_dim < 0:
            raise ValueError(f"condition_dim must be an integer >= 0, got {condition_dim!r}")
        self.channels = channels
        self.condition_dim = condition_dim
        self.blocks = nn.ModuleList(
            ConvResidualBlock(channels, hidden, depth, kernel_size, condition_dim) for _ in range(blocks)
        )

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Apply the blocks in turn.

        Args:
            x: images ``[B, channels, H, W]``.
            c: conditions ``[B, condition_dim]``; required exactly when ``condition_dim > 0``.

        Returns:
            ``[B, channels, H, W]``.
        """
        if (c is None) != (self.condition_dim == 0):
            raise ValueError(
                "ConvResNet built with condition_dim="
                f"{self.condition_dim} but c is {'missing' if c is None else 'given'}"
            )
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"ConvResNet expects images [batch, {self.channels}, height, width], got {tuple(x.shape)}"
            )
        if c is not None and (c.dim() != 2 or c.shape != (x.shape[0], self.condition_dim)):
            raise ValueError(
                f"ConvResNet expects conditions [{x.shape[0]}, {self.condition_dim}], got {tuple(c.shape)}"
            )
        h = x
        for block in self.blocks:
            h = block(h, c)
        return h
