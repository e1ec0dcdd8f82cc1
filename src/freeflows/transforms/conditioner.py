r"""Small networks that compute the parameters of coupling transforms.

Both start with a zero last layer, so every coupling they drive starts as the identity (or as a
pure shift of zero): a deep stack of couplings is then well-conditioned at initialisation.
A condition vector :math:`c` is concatenated to the input (for images, broadcast over the pixels
as extra channels).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    r"""Conditioner of vector couplings, ``in_features (+ condition_dim) -> hidden -> ... ->
    out_features``:

    .. math:: h_0 = [x, c], \qquad h_{k+1} = \mathrm{SiLU}(W_k h_k + b_k), \qquad
       y = W_{\text{out}} h_L + b_{\text{out}},

    with :math:`W_{\text{out}}, b_{\text{out}}` initialised to zero, so that :math:`y = 0` at
    initialisation.

    Args:
        in_features: size of the input ``x``.
        out_features: size of the output.
        hidden: width of the hidden layers.
        layers: number ``L >= 1`` of hidden layers.
        condition_dim: features of the condition ``c``, or ``None``.

    Example:
        >>> import torch
        >>> from freeflows.transforms.conditioner import MLP
        >>> net = MLP(2, 6, hidden=16, condition_dim=3)
        >>> y = net(torch.randn(5, 2), torch.randn(5, 3))
        >>> y.shape, bool((y == 0).all())
        (torch.Size([5, 6]), True)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 64,
        layers: int = 2,
        condition_dim: int | None = None,
    ) -> None:
        super().__init__()
        if hidden < 1 or layers < 1:
            raise ValueError(f"hidden and layers must be >= 1, got hidden={hidden}, layers={layers}")
        self.condition_dim = condition_dim
        width = in_features + (condition_dim or 0)
        modules: list[nn.Module] = []
        for _ in range(layers):
            modules += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        modules.append(last)
        self.net = nn.Sequential(*modules)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Evaluate the network.

        Args:
            x: inputs ``[B, in_features]``.
            c: conditions ``[B, condition_dim]``, or ``None``.

        Returns:
            ``[B, out_features]``.
        """
        if c is not None:
            x = torch.cat([x, c], dim=-1)
        return self.net(x)


class ConvNet(nn.Module):
    r"""Image conditioner ``[B, C_in, H, W] -> [B, C_out, H, W]``, Glow's shape: a 3×3
    convolution, a 1×1 convolution and a zero-initialised 3×3 convolution, with SiLU
    activations. A condition ``c`` of ``condition_dim`` features is broadcast over the pixels as
    extra input channels.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        hidden: channels of the hidden layers.
        condition_dim: features of the condition ``c``, or ``None``.

    References:
        Kingma and Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions" (2018),
        arXiv:1807.03039.

    Example:
        >>> import torch
        >>> from freeflows.transforms.conditioner import ConvNet
        >>> net = ConvNet(2, 4, hidden=8, condition_dim=1)
        >>> net(torch.randn(3, 2, 4, 4), torch.randn(3, 1)).shape
        torch.Size([3, 4, 4, 4])
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int = 64, condition_dim: int | None = None
    ) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.condition_dim = condition_dim
        last = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels + (condition_dim or 0), hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.SiLU(),
            last,
        )

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Evaluate the network.

        Args:
            x: images ``[B, C_in, H, W]``.
            c: conditions ``[B, condition_dim]``, or ``None``.

        Returns:
            ``[B, C_out, H, W]``.
        """
        if c is not None:
            x = torch.cat([x, c[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        return self.net(x)
