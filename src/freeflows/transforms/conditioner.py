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
    """``in_features (+ condition_dim) -> hidden -> ... -> out_features``, with ``layers`` hidden
    layers of width ``hidden`` and SiLU activations; the last layer starts at zero."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: int = 64,
        layers: int = 2,
        condition_dim: int | None = None,
    ):
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
        if c is not None:
            x = torch.cat([x, c], dim=-1)
        return self.net(x)


class ConvNet(nn.Module):
    r"""Image conditioner ``[B, C_in, H, W] -> [B, C_out, H, W]``: a 3×3 convolution, a 1×1
    convolution and a zero-initialised 3×3 convolution, with SiLU activations (Glow's shape).
    A condition ``c`` of ``condition_dim`` features is broadcast over the pixels as extra input
    channels."""

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int = 64, condition_dim: int | None = None
    ):
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
        if c is not None:
            x = torch.cat([x, c[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)
        return self.net(x)
