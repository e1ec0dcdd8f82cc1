r"""Padded point clouds of varying size, and molecules as point clouds with atom features.

A batch of molecules with different numbers of atoms shares one padded event of ``N`` nodes,
``[B, N, d + k]``: per node :math:`d` coordinates, then :math:`k` invariant feature channels.
The first :math:`n` nodes of a row are its real atoms and the rest are padding; :math:`n` is
given to every model as the **last column of the condition** ``c`` (a float holding an
integer, :math:`1 \le n \le N`). :func:`node_mask` turns it into the node mask.

The support of a row with :math:`n` atoms is the subspace

.. math:: S_n = \Big\{ (x, h) : \textstyle\sum_{i \le n} x_i = 0,\ x_i = 0 \text{ and }
   h_i = 0 \text{ for } i > n \Big\}

of dimension :math:`(n-1)d + nk`: coordinates mean-free over the real atoms, padding zero.
:func:`project` maps any event onto it.

:class:`AtomEncoding` turns atom types into feature channels and back: a one-hot of the type
(scaled), optionally the atomic number (scaled), each dequantised by uniform noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .geometry import center


def atom_counts(c: Tensor, max_points: int) -> Tensor:
    """The number of real atoms of each row, read from the last column of ``c``.

    Args:
        c: conditions ``[B, C]`` whose last column is the atom count.
        max_points: :math:`N`, the padded size.

    Returns:
        ``[B]`` int64 counts.

    Raises:
        ValueError: if ``c`` is missing, or a count is not an integer in ``[1, N]``.

    Example:
        >>> import torch
        >>> from freeflows.point_clouds import atom_counts
        >>> atom_counts(torch.tensor([[0.5, 3.0]]), 5)
        tensor([3])
        >>> atom_counts(torch.tensor([[6.0]]), 5)
        Traceback (most recent call last):
            ...
        ValueError: atom counts (the last column of c) must be integers in [1, 5], got 6.0
    """
    if c is None or c.dim() != 2 or c.shape[1] < 1:
        shape = None if c is None else tuple(c.shape)
        raise ValueError(f"padded point clouds need c of shape [B, C] with the atom count last, got {shape}")
    n = c[:, -1]
    bad = (n != n.round()) | (n < 1) | (n > max_points)
    if bool(bad.any()):
        value = float(n[bad][0])
        raise ValueError(
            f"atom counts (the last column of c) must be integers in [1, {max_points}], got {value}"
        )
    return n.round().long()


def node_mask(c: Tensor, max_points: int, check: bool = True) -> Tensor:
    """Which nodes are real atoms: the first ``n`` of each row, ``n`` the last column of ``c``.

    Args:
        c: conditions ``[B, C]``, the atom count last.
        max_points: :math:`N`.
        check: validate the counts (:func:`atom_counts`); networks, which may run under
            ``torch.func.vmap`` where a data-dependent check cannot, pass ``False`` and rely on the
            model's latent to have checked them.

    Returns:
        ``[B, N]`` bool.

    Example:
        >>> import torch
        >>> from freeflows.point_clouds import node_mask
        >>> node_mask(torch.tensor([[2.0], [3.0]]), 4)
        tensor([[ True,  True, False, False],
                [ True,  True,  True, False]])
    """
    if check:
        atom_counts(c, max_points)
    return torch.arange(max_points, device=c.device) < c[:, -1:].round()


def project(x: Tensor, c: Tensor, n_dims: int) -> Tensor:
    r"""The orthogonal projection onto :math:`S_n` (module docstring): padding set to zero and
    the first ``n_dims`` channels centred over the real atoms.

    Args:
        x: events ``[B, N, d + k]``.
        c: conditions ``[B, C]``, the atom count last.
        n_dims: :math:`d`, the number of coordinate channels.

    Returns:
        The projected events, shaped like ``x``.

    Example:
        >>> import torch
        >>> from freeflows.point_clouds import project
        >>> x = torch.tensor([[[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [9.0, 9.0]]])
        >>> project(x, torch.tensor([[3.0]]), n_dims=1)[0].tolist()  # centred over 3 atoms
        [[-1.0, 5.0], [0.0, 5.0], [1.0, 5.0], [0.0, 0.0]]
    """
    if x.dim() != 3:
        raise ValueError(f"padded point clouds are [B, N, d + k] events, got shape {tuple(x.shape)}")
    n_max = x.shape[1]
    rows = x
    mask = node_mask(c, n_max).unsqueeze(-1).to(x.dtype)
    pos, feat = rows[..., :n_dims] * mask, rows[..., n_dims:] * mask
    pos = center(pos.flatten(1), n_max, n_dims, mask=mask[..., 0] > 0).view_as(pos)
    pos = pos * mask + 0.0  # no -0.0 on the padding
    return torch.cat([pos, feat], dim=-1)


def degrees_of_freedom(c: Tensor, max_points: int, n_dims: int, features: int) -> Tensor:
    r"""Dimension :math:`(n-1)d + nk` of each row's subspace :math:`S_n`.

    Args:
        c: conditions ``[B, C]``, the atom count last.
        max_points: :math:`N`.
        n_dims: :math:`d`.
        features: :math:`k`.

    Returns:
        ``[B]`` int64.

    Example:
        >>> import torch
        >>> from freeflows.point_clouds import degrees_of_freedom
        >>> degrees_of_freedom(torch.tensor([[9.0]]), 29, 3, 6)  # 8*3 + 9*6
        tensor([78])
    """
    n = atom_counts(c, max_points)
    return (n - 1) * n_dims + n * features


class AtomEncoding:
    r"""Atom types as invariant feature channels, and back.

    A type :math:`t \in \{0, \dots, T-1\}` becomes :math:`k = T` channels
    :math:`s_1(e_t + u)` (the one-hot scaled by :math:`s_1`), plus, with ``atomic_numbers``, one
    channel :math:`s_2(Z_t + u')`, with :math:`u \sim U[0,1)^T`, :math:`u' \sim U[0,1)` when
    ``dequantize`` (else :math:`u = u' = 0`). Uniform dequantisation gives a bound on the
    probability of the discrete types: the types of a molecule own the box of side :math:`s_1`
    (and :math:`s_2`) around their channels, so by Jensen's inequality

    .. math:: \log P(t_{1:n} \mid x) \ge \mathbb E_u\big[\log p(x, h)\big] + n\,\big(T \log s_1
       + \log s_2\big),

    where :meth:`log_volume` is the last term. Decoding reads the type by the argmax of the one-hot
    channels (the atomic number is ignored), which recovers it exactly from a dequantised encoding.

    Args:
        n_types: :math:`T`.
        type_scale: :math:`s_1`.
        atomic_numbers: :math:`Z_t` of each type, or ``None`` for no atomic-number channel.
        number_scale: :math:`s_2`.

    References:
        Hoogeboom, Satorras, Vignac and Welling, "Equivariant Diffusion for Molecule Generation
        in 3D" (2022), arXiv:2203.17003 (one-hot and atomic-number channels, scaled).

    Example:
        >>> import torch
        >>> from freeflows.point_clouds import AtomEncoding
        >>> enc = AtomEncoding(5, atomic_numbers=(1, 6, 7, 8, 9))
        >>> types = torch.tensor([[1, 0, 0, -1]])  # C, H, H and one padding node
        >>> h = enc.encode(types)
        >>> h.shape, enc.channels, enc.decode(h).tolist()
        (torch.Size([1, 4, 6]), 6, [[1, 0, 0, -1]])
        >>> noisy = enc.encode(types, dequantize=True, generator=torch.Generator().manual_seed(0))
        >>> enc.decode(noisy).tolist()
        [[1, 0, 0, -1]]
    """

    def __init__(
        self,
        n_types: int,
        type_scale: float = 0.25,
        atomic_numbers: Sequence[int] | None = None,
        number_scale: float = 0.1,
    ) -> None:
        if isinstance(n_types, bool) or not isinstance(n_types, int) or n_types < 1:
            raise ValueError(f"n_types must be a positive integer, got {n_types!r}")
        if not type_scale > 0 or not number_scale > 0:
            raise ValueError(f"scales must be > 0, got {type_scale!r} and {number_scale!r}")
        if atomic_numbers is not None and len(atomic_numbers) != n_types:
            raise ValueError(f"atomic_numbers has {len(atomic_numbers)} entries for {n_types} types")
        self.n_types = n_types
        self.type_scale = float(type_scale)
        self.atomic_numbers = None if atomic_numbers is None else tuple(int(z) for z in atomic_numbers)
        self.number_scale = float(number_scale)

    @property
    def channels(self) -> int:
        """The number of feature channels :math:`k`."""
        return self.n_types + (self.atomic_numbers is not None)

    def encode(
        self, types: Tensor, *, dequantize: bool = False, generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Feature channels of atom types.

        Args:
            types: ``[B, N]`` integer types, ``-1`` on padding nodes.
            dequantize: add uniform noise (see the class docstring).
            generator: random number generator for the noise.
            dtype: floating dtype of the result.

        Returns:
            ``[B, N, k]``, zero on padding nodes.
        """
        if bool(((types < -1) | (types >= self.n_types)).any()):
            raise ValueError(f"atom types must be in [0, {self.n_types}) or -1 for padding")
        real = (types >= 0).unsqueeze(-1).to(dtype)
        onehot = torch.nn.functional.one_hot(types.clamp(min=0), self.n_types).to(dtype)
        parts = [onehot]
        if self.atomic_numbers is not None:
            z = torch.tensor(self.atomic_numbers, dtype=dtype, device=types.device)[types.clamp(min=0)]
            parts.append(z.unsqueeze(-1))
        h = torch.cat(parts, dim=-1)
        if dequantize:
            h = h + torch.rand(h.shape, generator=generator, dtype=dtype, device=types.device)
        scale = torch.full((self.channels,), self.type_scale, dtype=dtype, device=types.device)
        if self.atomic_numbers is not None:
            scale[-1] = self.number_scale
        return h * scale * real

    def decode(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """Atom types of feature channels: the argmax of the one-hot channels.

        Args:
            h: ``[B, N, k]``.
            mask: ``[B, N]`` bool, the real atoms, or ``None`` to read it from ``h`` (nodes whose
                channels are all zero are padding).

        Returns:
            ``[B, N]`` int64, ``-1`` on padding nodes.
        """
        if mask is None:
            mask = (h != 0).any(dim=-1)
        types = h[..., : self.n_types].argmax(dim=-1)
        return torch.where(mask, types, torch.full_like(types, -1))

    def log_volume(self, counts: Tensor) -> Tensor:
        r"""Log-volume :math:`n (T \log s_1 + \log s_2)` of each molecule's dequantisation box.

        Args:
            counts: ``[B]`` atom counts.

        Returns:
            ``[B]``, in the dtype of ``counts`` if floating, else float32.
        """
        per_atom = self.n_types * math.log(self.type_scale)
        if self.atomic_numbers is not None:
            per_atom += math.log(self.number_scale)
        dtype = counts.dtype if counts.is_floating_point() else torch.float32
        return counts.to(dtype) * per_atom
