r"""Free-form flows: any dimension-preserving encoder/decoder pair as a normalizing flow.

Given an encoder :math:`f`, a decoder :math:`g \approx f^{-1}`, a latent :math:`p_Z` and
:math:`\beta \ge 0`, a free-form flow models

.. math:: \log q(x) = \log p_Z(f(x)) + \log\lvert\det J_f(x)\rvert .

**The surrogate.** The gradient of the log-determinant is
:math:`\partial_\theta \log\lvert\det J_f\rvert = \operatorname{tr}(J_f^{-1}\,\partial_\theta J_f)`.
Replace :math:`J_f^{-1}` by :math:`J_g(z)`, :math:`z = f(x)`, which equals it when :math:`g` inverts
:math:`f`, and estimate the trace with a probe :math:`v`, :math:`\mathbb E[vv^\top] = I`:

.. math:: \mathcal S(x) = v^\top J_f(x)\; \mathrm{sg}\!\left(J_g(z)\, v\right),
   \qquad \partial_\theta \mathbb E_v[\mathcal S]
   = \operatorname{tr}\!\left(\partial_\theta J_f\; J_g\right)
   = \partial_\theta \log\lvert\det J_f\rvert \quad \text{if } J_g = J_f^{-1},

where sg stops gradients. The value of :math:`\mathcal S` is *not* a log-determinant and is never
reported as a likelihood. When :math:`J_g \neq J_f^{-1}` the gradient is biased by
:math:`\operatorname{tr}(\partial_\theta J_f\,(J_g - J_f^{-1}))`, which the reconstruction term
keeps small.

**Two ways to compute it** (``FreeFormFlow(surrogate=...)``); both are unbiased estimators of the
same gradient, since for any matrices :math:`A, B` and :math:`\mathbb E[vv^\top] = I`,
:math:`\mathbb E[v^\top A\, B v] = \operatorname{tr}(AB)`:

* ``"vjp"`` (default, measured faster on CPU; ``benchmarks/surrogate_modes.py``): the transposed
  estimator :math:`\mathcal S = \mathrm{sg}(v^\top J_g(z))\; J_f(x)\, v`, with
  :math:`\partial_\theta \mathbb E_v[\mathcal S] = \mathbb E_v[v^\top J_g\, \partial_\theta J_f\, v]
  = \operatorname{tr}(J_g\, \partial_\theta J_f) = \operatorname{tr}(\partial_\theta J_f\, J_g)`,
  the same as above. :math:`J_f v` comes out of the encoder's forward pass as a forward-mode tangent
  (one dual pass gives :math:`z` and :math:`J_f v`), and that tangent is an ordinary
  differentiable function of the encoder's parameters, so the loss needs only a *first-order*
  backward pass. :math:`v^\top J_g` is one reverse-mode product through the decoder's graph, which
  the reconstruction term needs anyway. The tangents come from :func:`freeflows.tangents.dual_forward`,
  which writes them out with plain operators for the blocks of :mod:`freeflows.nets` (much cheaper
  on CPU than generic forward AD, which it falls back to for any other network); with ``K > 1``
  probes such an encoder carries all ``K`` tangents in one pass.
* ``"jvp"``: :math:`\mathcal S = v^\top J_f(x)\; \mathrm{sg}(J_g(z) v)` as written first.
  :math:`J_g v` is one forward-mode product through the decoder (the same pass gives
  :math:`g(z)`), and :math:`v^\top J_f` one reverse-mode product through the encoder whose graph is
  kept (``create_graph``), so the loss's backward pass is a double backward through the encoder.

**The loss** per sample, minimised in expectation over the data:

.. math:: \mathcal L(x) = -\log p_Z(f(x)) - \mathcal S(x) + \beta \lVert x - g(f(x)) \rVert^2 .

The decoder learns only through the reconstruction term.

**The density.** Sampling draws :math:`x = g(z)`, :math:`z \sim p_Z`, so the density of the
model is that of :math:`g`'s pushforward: :math:`\log q(x) = \log p_Z(z^*) -
\log\lvert\det J_g(z^*)\rvert` where :math:`g(z^*) = x`. :meth:`FreeFormFlow.log_prob` solves
for :math:`z^*` from :math:`f(x)` (:func:`freeflows.inversion.invert_decoder`), so its value
integrates to one wherever :math:`g` is injective. Two other values are available by name:

* ``variant="encoder"``: :math:`\log p_Z(f(x)) + \log\lvert\det J_f(x)\rvert`, the density of
  :math:`f^{-1}(z)`, which maximum likelihood trains; it is what refined samples follow;
* ``variant="paper"``: :math:`\log p_Z(f(x)) - \log\lvert\det J_g(f(x))\rvert`, the value that
  the free-form flow papers report. It is **not normalised** where :math:`g` does not invert
  :math:`f`: on a trained two-moons model it integrates to about 1.08, and far more on particle
  systems, where the excess mass lies off the data. Use it only to compare with published tables.

**Sampling** is one decoder pass, :math:`g(z)`. With ``sample_refine_steps = K > 0`` each draw is
then moved towards :math:`f^{-1}(z)` by :math:`K` steps of :func:`freeflows.inversion.invert_encoder`
(one encoder and one decoder pass each), so the draws follow the encoder's density, the one that
maximum likelihood trains.

References:
    Draxler, Sorrenson, Zimmermann, Rousselot and Köthe, "Free-form flows: Make Any Architecture
    a Normalizing Flow" (AISTATS 2024), arXiv:2310.16624.

    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian
    smoothing splines", Communications in Statistics - Simulation and Computation 18(3) (1989).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from .checks import check_condition_dim, numel
from .conditioning import accepts_condition, call_with_condition, resolve_condition_dim
from .contract import DensityModule, Loss
from .hutchinson import HutchinsonMode, check_hutchinson, hutchinson_vectors
from .inversion import DecoderInverse, decoder_tolerance, invert_decoder, invert_encoder
from .jacobian import JacobianMode, log_abs_det, log_abs_det_jacobian, value_and_jacobian
from .serialization import named_constructor
from .tangents import Unsupported, dual_forward

SurrogateMode = Literal["jvp", "vjp"]
DensityVariant = Literal["decoder", "encoder", "paper"]
DENSITY_VARIANTS: tuple[str, ...] = ("decoder", "encoder", "paper")
SURROGATE_MODES: tuple[str, ...] = ("jvp", "vjp")

#: Upper bound on Jacobian elements held at once by ``log_prob`` (``chunk * D * D``).
JACOBIAN_ELEMENTS = 2**24


def _nan_where(failed: Tensor, values: Tensor, what: str, stacklevel: int) -> Tensor:
    """``values`` with the ``failed`` rows set to NaN, and a :class:`RuntimeWarning`
    "``k`` of ``n`` <what>" if there are any: the one way this module reports rows whose
    solve did not converge, never with a guessed value."""
    if not bool(failed.any()):
        return values
    warnings.warn(f"{int(failed.sum())} of {failed.numel()} {what}", RuntimeWarning, stacklevel=stacklevel)
    return torch.where(failed, torch.full_like(values, float("nan")), values)


class FreeFormFlow(DensityModule):
    r"""A normalizing flow from an encoder ``f`` and a decoder ``g`` of any architecture.

    :meth:`resnet` builds one from ``features`` alone (residual MLPs), :meth:`egnn` one for
    particle systems (equivariant graph networks and a mean-free latent).

    Args:
        encoder: network ``[B, *event] -> [B, *event]`` (data to latent).
        decoder: network ``[B, *event] -> [B, *event]`` (latent to data).
        latent: latent distribution with ``event_shape``, ``log_prob``, ``sample`` and ``basis``.
        condition_dim: number of condition features, or ``None``. Conditions go to both networks
            (see :mod:`freeflows.conditioning`). A network that declares its condition size (a
            ``condition_dim`` attribute, as :class:`~freeflows.nets.ResNet`
            does) must declare this one, else construction fails; with ``None`` the size the
            networks declare is used (none: unconditional).
        beta: weight :math:`\beta \ge 0` of the reconstruction loss.
        hutchinson: distribution of the probe vectors, ``"gaussian"``, ``"rademacher"`` or
            ``"sphere"`` (see :mod:`freeflows.hutchinson`).
        hutchinson_samples: probes per sample ``K``; the surrogate is their average.
        jacobian_mode: ``"auto"``, ``"forward"`` or ``"reverse"`` products for ``log_prob``.
        surrogate: how the surrogate is estimated (see the module docstring): ``"vjp"``
            (default, faster) takes :math:`v^\top J_g` by reverse mode through the decoder and
            :math:`J_f v` by forward mode through the encoder; ``"jvp"`` takes :math:`J_g v` by
            forward mode through the decoder and :math:`v^\top J_f` by reverse mode through the
            encoder, with a double backward pass.
        sample_refine_steps: iterations of :func:`freeflows.inversion.invert_encoder` applied to
            each decoder draw by :meth:`sample` (``0``, the default: the plain decoder draw).

    The loss of a batch is the mean over its rows of

    .. math:: \mathcal L(x) = -\log p_Z(f(x)) - v^\top J_f(x)\, \mathrm{sg}(J_g(f(x))\, v)
       + \beta \lVert x - g(f(x)) \rVert^2 ,

    whose gradient in the encoder's parameters is that of the negative log-likelihood where
    :math:`g` inverts :math:`f` (see the module docstring).

    References:
        Draxler, Sorrenson, Zimmermann, Rousselot and Köthe, "Free-form flows: Make Any
        Architecture a Normalizing Flow" (AISTATS 2024), arXiv:2310.16624.

    Example:
        >>> import torch, freeflows as ff
        >>> encoder, decoder = ff.ResNet(2, hidden=32), ff.ResNet(2, hidden=32)
        >>> flow = ff.FreeFormFlow(encoder, decoder, ff.StandardNormal(2), beta=20.0)
        >>> optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
        >>> x = 0.5 * torch.randn(64, 2) + 1.0
        >>> for _ in range(3):
        ...     optimizer.zero_grad()
        ...     loss = flow.loss(x)
        ...     loss.value.backward()
        ...     optimizer.step()
        >>> sorted(loss.parts)
        ['latent_nll', 'reconstruction']
        >>> flow.sample(5).shape, flow.log_prob(x[:4]).shape
        (torch.Size([5, 2]), torch.Size([4]))
    """

    _settings = (
        "beta",
        "hutchinson",
        "hutchinson_samples",
        "jacobian_mode",
        "surrogate",
        "sample_refine_steps",
        "solve_rtol",
        "solve_max_jacobians",
        "solve_restarts",
    )

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent: nn.Module,
        *,
        condition_dim: int | None = None,
        beta: float = 10.0,
        hutchinson: HutchinsonMode = "gaussian",
        hutchinson_samples: int = 1,
        jacobian_mode: JacobianMode = "auto",
        surrogate: SurrogateMode = "vjp",
        sample_refine_steps: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"beta must be a number >= 0, got {beta!r}")
        check_condition_dim(condition_dim)
        condition_dim = resolve_condition_dim(
            condition_dim, {"encoder": encoder, "decoder": decoder, "latent": latent}
        )
        if jacobian_mode not in ("auto", "forward", "reverse"):
            raise ValueError(f"unknown jacobian_mode {jacobian_mode!r}; choose auto, forward or reverse")
        if surrogate not in SURROGATE_MODES:
            raise ValueError(f"unknown surrogate {surrogate!r}; choose one of {', '.join(SURROGATE_MODES)}")
        if not isinstance(sample_refine_steps, int) or sample_refine_steps < 0:
            raise ValueError(f"sample_refine_steps must be an integer >= 0, got {sample_refine_steps!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.latent = latent
        self.event_shape: tuple[int, ...] = tuple(latent.event_shape)
        self.dim = int(getattr(latent, "dim", numel(self.event_shape)))
        check_hutchinson(hutchinson, hutchinson_samples, self.dim)
        self.beta = float(beta)
        self.hutchinson: HutchinsonMode = hutchinson
        self.hutchinson_samples = hutchinson_samples
        self.condition_dim = condition_dim
        self.jacobian_mode: JacobianMode = jacobian_mode
        self.surrogate: SurrogateMode = surrogate
        self.sample_refine_steps = sample_refine_steps
        #: Tolerance and budget of :meth:`invert_decoder` (see :func:`freeflows.inversion.invert_decoder`).
        self.solve_rtol: float | None = None
        self.solve_max_jacobians = 8
        self.solve_restarts = 1024
        self._encoder_takes_c = accepts_condition(encoder)
        self._decoder_takes_c = accepts_condition(decoder)
        # A latent whose log_prob takes c (MaskedMeanFreeNormal: a support that depends on c).
        self._latent_takes_c = "c" in inspect.signature(latent.log_prob).parameters

    @classmethod
    @named_constructor
    def resnet(
        cls,
        features: int,
        condition_dim: int | None = None,
        *,
        hidden: int = 128,
        depth: int = 2,
        blocks: int = 3,
        beta: float = 10.0,
        hutchinson: HutchinsonMode = "gaussian",
        hutchinson_samples: int = 1,
        jacobian_mode: JacobianMode = "auto",
        surrogate: SurrogateMode = "vjp",
        sample_refine_steps: int = 0,
    ) -> FreeFormFlow:
        r"""A free-form flow on vectors of ``features`` numbers: encoder and decoder are
        :class:`~freeflows.nets.ResNet` residual MLPs of the same size (``blocks`` residual
        blocks, each ``depth`` hidden layers of width ``hidden``, starting as the identity), and
        the latent is a standard normal.

        Args:
            features: ``D``, the size of the data vectors.
            condition_dim: features of the condition ``c``, or ``None``.
            hidden: width of the hidden layers of both networks.
            depth: hidden layers per residual block.
            blocks: residual blocks per network.
            beta: weight of the reconstruction loss.
            hutchinson: probe distribution (see :class:`FreeFormFlow`).
            hutchinson_samples: probes per sample.
            jacobian_mode: Jacobian products for ``log_prob``.
            surrogate: ``"vjp"`` or ``"jvp"`` (see :class:`FreeFormFlow`).
            sample_refine_steps: refinement steps of each draw (see :class:`FreeFormFlow`).

        Returns:
            The free-form flow; :func:`freeflows.save` can store it.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow.resnet(2, condition_dim=3, hidden=32)
            >>> flow.sample(5, torch.randn(4, 3)).shape
            torch.Size([5, 4, 2])
        """
        from .distributions import StandardNormal
        from .nets.resnet import ResNet

        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be a positive integer, got {features!r}")
        check_condition_dim(condition_dim)

        def net() -> ResNet:
            return ResNet(features, hidden, depth, blocks, condition_dim=condition_dim or 0)

        return cls(
            net(),
            net(),
            StandardNormal(features),
            condition_dim=condition_dim,
            beta=beta,
            hutchinson=hutchinson,
            hutchinson_samples=hutchinson_samples,
            jacobian_mode=jacobian_mode,
            surrogate=surrogate,
            sample_refine_steps=sample_refine_steps,
        )

    @classmethod
    @named_constructor
    def conv(
        cls,
        event_shape: tuple[int, int, int],
        condition_dim: int | None = None,
        *,
        hidden: int = 32,
        blocks: int = 3,
        depth: int = 2,
        kernel_size: int = 3,
        beta: float = 10.0,
        hutchinson: HutchinsonMode = "gaussian",
        hutchinson_samples: int = 1,
        jacobian_mode: JacobianMode = "auto",
        surrogate: SurrogateMode = "vjp",
        sample_refine_steps: int = 0,
    ) -> FreeFormFlow:
        r"""A free-form flow on images of shape ``event_shape = (C, H, W)``: encoder and decoder
        are :class:`~freeflows.nets.ConvResNet` convolutional residual networks of the same size
        (``blocks`` residual blocks, each ``depth`` hidden convolutions of ``hidden`` channels,
        starting as the identity), and the latent is a standard normal on ``(C, H, W)``.

        Args:
            event_shape: ``(C, H, W)``.
            condition_dim: features of the condition ``c``, or ``None``.
            hidden: channels of the hidden convolutions of both networks.
            blocks: residual blocks per network.
            depth: hidden convolutions per residual block.
            kernel_size: odd kernel size of every convolution.
            beta: weight of the reconstruction loss.
            hutchinson: probe distribution (see :class:`FreeFormFlow`).
            hutchinson_samples: probes per sample.
            jacobian_mode: Jacobian products for ``log_prob``.
            surrogate: ``"vjp"`` or ``"jvp"`` (see :class:`FreeFormFlow`).
            sample_refine_steps: refinement steps of each draw (see :class:`FreeFormFlow`).

        Returns:
            The free-form flow; :func:`freeflows.save` can store it.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow.conv((1, 8, 8), hidden=8, blocks=2)
            >>> x = torch.rand(3, 1, 8, 8)
            >>> flow.sample(2).shape, torch.allclose(flow.log_prob(x), flow.latent.log_prob(x))
            (torch.Size([2, 1, 8, 8]), True)
        """
        from .distributions import StandardNormal
        from .nets.conv import ConvResNet

        shape = tuple(event_shape) if isinstance(event_shape, (tuple, list)) else (event_shape,)
        if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"FreeFormFlow.conv needs an image event shape (C, H, W), got {event_shape!r}")
        check_condition_dim(condition_dim)

        def net() -> ConvResNet:
            return ConvResNet(shape[0], hidden, blocks, depth, kernel_size, condition_dim=condition_dim or 0)

        return cls(
            net(),
            net(),
            StandardNormal(*shape),
            condition_dim=condition_dim,
            beta=beta,
            hutchinson=hutchinson,
            hutchinson_samples=hutchinson_samples,
            jacobian_mode=jacobian_mode,
            surrogate=surrogate,
            sample_refine_steps=sample_refine_steps,
        )

    @classmethod
    @named_constructor
    def egnn(
        cls,
        n_particles: int,
        n_dims: int,
        condition_dim: int | None = None,
        *,
        hidden: int = 32,
        layers: int = 3,
        attention: bool = True,
        beta: float = 10.0,
        hutchinson: HutchinsonMode = "gaussian",
        hutchinson_samples: int = 1,
        jacobian_mode: JacobianMode = "auto",
        surrogate: SurrogateMode = "vjp",
        sample_refine_steps: int = 0,
    ) -> FreeFormFlow:
        r"""A free-form flow on ``n_particles`` points in ``n_dims`` dimensions (events of
        ``n_particles * n_dims`` numbers, particle-major): encoder and decoder are
        :class:`~freeflows.nets.EGNN` flow maps (``layers`` layers of width ``hidden``, message
        gates if ``attention``; a condition is added to every node's features), and the latent is
        :class:`~freeflows.distributions.MeanFreeNormal`, so densities are with respect to the
        :math:`(N-1)d`-dimensional zero-centre-of-mass subspace. The density is invariant to
        rotations, reflections and permutations of the particles wherever the root of the
        decoder's solve is unique.

        Args:
            n_particles: :math:`N \ge 2`.
            n_dims: :math:`d`.
            condition_dim: features of an invariant condition ``c``, or ``None``.
            hidden: width of the EGNNs.
            layers: EGNN layers per network.
            attention: gate the messages.
            beta: weight of the reconstruction loss.
            hutchinson: probe distribution (see :class:`FreeFormFlow`).
            hutchinson_samples: probes per sample.
            jacobian_mode: Jacobian products for ``log_prob``.
            surrogate: ``"vjp"`` or ``"jvp"`` (see :class:`FreeFormFlow`).
            sample_refine_steps: refinement steps of each draw (see :class:`FreeFormFlow`).

        Returns:
            The free-form flow; :func:`freeflows.save` can store it.

        References:
            Draxler, Sorrenson, Zimmermann, Rousselot and Köthe, "Free-form flows: Make Any
            Architecture a Normalizing Flow" (AISTATS 2024), arXiv:2310.16624.
            Satorras, Hoogeboom and Welling, "E(n) Equivariant Graph Neural Networks" (2021),
            arXiv:2102.09844.
            Satorras, Hoogeboom, Fuchs, Posner and Welling, "E(n) Equivariant Normalizing Flows"
            (2021), arXiv:2105.09016.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow.egnn(4, 2, hidden=8, layers=1)
            >>> x = flow.sample(3)
            >>> x.shape, torch.allclose(x.reshape(3, 4, 2).mean(1), torch.zeros(3, 2), atol=1e-6)
            (torch.Size([3, 8]), True)
            >>> flow.latent.dim  # (N - 1) d degrees of freedom
            6
        """
        from .distributions import MeanFreeNormal
        from .nets.egnn import EGNN

        check_condition_dim(condition_dim)

        def net() -> EGNN:
            return EGNN(n_particles, n_dims, hidden, layers, attention, condition_dim=condition_dim or 0)

        return cls(
            net(),
            net(),
            MeanFreeNormal(n_particles, n_dims),
            condition_dim=condition_dim,
            beta=beta,
            hutchinson=hutchinson,
            hutchinson_samples=hutchinson_samples,
            jacobian_mode=jacobian_mode,
            surrogate=surrogate,
            sample_refine_steps=sample_refine_steps,
        )

    @classmethod
    @named_constructor
    def molecules(
        cls,
        max_atoms: int,
        atom_features: int,
        n_dims: int = 3,
        condition_dim: int = 1,
        *,
        hidden: int = 64,
        layers: int = 4,
        attention: bool = True,
        beta: float = 100.0,
        hutchinson: HutchinsonMode = "gaussian",
        hutchinson_samples: int = 1,
        jacobian_mode: JacobianMode = "auto",
        surrogate: SurrogateMode = "vjp",
        sample_refine_steps: int = 0,
    ) -> FreeFormFlow:
        r"""An E(n)-equivariant free-form flow on molecules of up to ``max_atoms`` atoms, all
        sizes in one padded batch (:mod:`freeflows.point_clouds`).

        An event is ``[max_atoms, n_dims + atom_features]``: per atom its coordinates and
        ``atom_features`` invariant channels (for example
        :class:`~freeflows.point_clouds.AtomEncoding` of the atom types); the first :math:`n`
        rows are the real atoms and the rest is padding. The condition ``c`` (``[1]`` or
        ``[B, 1]``) is the atom count :math:`n`, so the model is the conditional density
        :math:`q(x, h \mid n)`; to generate molecules draw :math:`n` from the data's histogram
        and then ``sample(1, c)``. Encoder and decoder are masked
        :class:`~freeflows.nets.EGNN` flow maps on coordinates and features jointly, and the
        latent is :class:`~freeflows.distributions.MaskedMeanFreeNormal`. Densities are with
        respect to the :math:`(n-1)d + nk`-dimensional subspace of each row (coordinates
        mean-free over the real atoms, padding zero): the networks are the identity on its
        complement, so log-determinants on all coordinates are those on the subspace, and the
        default ``log_prob`` (the decoder's density, solved by :meth:`invert_decoder`) is
        normalised on it. It is invariant to rotations, reflections, translations and
        permutations of the real atoms (where the decoder's root is unique), and to the content
        of the padding. Restarts of the decoder solve default to 64 draws (``solve_restarts``).

        Args:
            max_atoms: :math:`N`, the padded size.
            atom_features: :math:`k`, invariant channels per atom.
            n_dims: :math:`d`, coordinates per atom.
            condition_dim: condition features, the atom count last (1: the count alone; more
                columns are invariant conditions fed to every atom).
            hidden: width of the EGNNs.
            layers: EGNN layers per network.
            attention: gate the messages.
            beta: weight of the reconstruction loss.
            hutchinson: probe distribution (see :class:`FreeFormFlow`).
            hutchinson_samples: probes per sample.
            jacobian_mode: Jacobian products for ``log_prob``.
            surrogate: ``"vjp"`` or ``"jvp"`` (see :class:`FreeFormFlow`).
            sample_refine_steps: refinement steps of each draw (see :class:`FreeFormFlow`).

        Returns:
            The free-form flow; :func:`freeflows.save` can store it.

        References:
            Draxler, Sorrenson, Zimmermann, Rousselot and Köthe, "Free-form flows: Make Any
            Architecture a Normalizing Flow" (AISTATS 2024), arXiv:2310.16624.
            Satorras, Hoogeboom, Fuchs, Posner and Welling, "E(n) Equivariant Normalizing Flows"
            (2021), arXiv:2105.09016.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow.molecules(6, atom_features=2, hidden=8, layers=1)
            >>> x = flow.sample(4, torch.tensor([3.0]))  # four molecules of 3 atoms
            >>> x.shape, bool((x[:, 3:] == 0).all())
            (torch.Size([4, 6, 5]), True)
            >>> flow.loss(x, torch.tensor([3.0])).value.shape
            torch.Size([])
        """
        from .distributions import MaskedMeanFreeNormal
        from .nets.egnn import EGNN

        sizes = (
            ("max_atoms", max_atoms, 2), ("atom_features", atom_features, 0), ("n_dims", n_dims, 1),
            ("condition_dim", condition_dim, 1),
        )
        for name, value, least in sizes:
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")

        def net() -> EGNN:
            return EGNN(
                max_atoms, n_dims, hidden, layers, attention, condition_dim=condition_dim,
                features=atom_features, masked=True,
            )

        flow = cls(
            net(),
            net(),
            MaskedMeanFreeNormal(max_atoms, n_dims, atom_features),
            condition_dim=condition_dim,
            beta=beta,
            hutchinson=hutchinson,
            hutchinson_samples=hutchinson_samples,
            jacobian_mode=jacobian_mode,
            surrogate=surrogate,
            sample_refine_steps=sample_refine_steps,
        )
        flow.solve_restarts = 64
        return flow

    # -- the two networks ---------------------------------------------------------------------
    def encode(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """The encoder, :math:`z = f(x)` (data to latent).

        Args:
            x: data ``[B, *event]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``[B, *event]``.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow.resnet(2, hidden=8)
            >>> x = torch.randn(4, 2)
            >>> torch.equal(flow.encode(x), x), torch.equal(flow.decode(x), x)  # identities at first
            (True, True)
        """
        z = call_with_condition(self.encoder, x, c, self._encoder_takes_c)
        self._check_shape("encoder", x, z)
        return z

    def decode(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """The decoder, :math:`x = g(z)` (latent to data).

        Args:
            z: latent points ``[B, *event]``.
            c: conditions ``[B, C]``, or ``None``.

        Returns:
            ``[B, *event]``.
        """
        x = call_with_condition(self.decoder, z, c, self._decoder_takes_c)
        self._check_shape("decoder", z, x)
        return x

    def _latent_log_prob(self, z: Tensor, c: Tensor | None) -> Tensor:
        return self.latent.log_prob(z, c) if self._latent_takes_c else self.latent.log_prob(z)

    def _latent_sample(self, n: int, c: Tensor | None, generator: torch.Generator | None) -> Tensor:
        if self._latent_takes_c:
            return self.latent.sample(n, c, generator=generator)
        return self.latent.sample(n, generator=generator)

    @staticmethod
    def _check_shape(name: str, inp: Tensor, out: Tensor) -> None:
        if out.shape != inp.shape:
            raise ValueError(
                f"the {name} maps {tuple(inp.shape)} to {tuple(out.shape)}; it must keep the shape"
            )

    # -- the model contract -------------------------------------------------------------------
    def loss(self, x: Tensor, c: Tensor | None = None) -> Loss:
        r"""The free-form objective of a batch, the mean over its rows of
        :math:`-\log p_Z(f(x)) - \mathcal S(x) + \beta \lVert x - g(f(x)) \rVert^2` (see the
        module docstring).

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``, or ``None``.

        Returns:
            :class:`~freeflows.contract.Loss`. Its ``parts``: ``latent_nll`` is
            :math:`-\log p_Z(f(x))`, the latent term only (the surrogate is not a
            log-determinant, so this is not a likelihood); ``reconstruction`` is
            :math:`\lVert x - g(f(x))\rVert^2`; both are batch means, detached.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow.resnet(3, hidden=16, beta=10.0)
            >>> loss = flow.loss(torch.randn(32, 3))
            >>> loss.value.backward()
            >>> float(loss.parts["reconstruction"])  # g inverts f at initialisation
            0.0
        """
        return super().loss(x, c)

    def _loss(self, x: Tensor, c: Tensor | None) -> Loss:
        batch, k = x.shape[0], self.hutchinson_samples
        v = hutchinson_vectors(
            k,
            batch,
            self.dim,
            self.hutchinson,
            basis=getattr(self.latent, "basis", None),
            device=x.device,
            dtype=x.dtype,
        ).reshape(k * batch, *x.shape[1:])
        with torch.enable_grad():
            if self.surrogate == "vjp":
                z, x_hat, surrogate = self._surrogate_vjp(x.detach(), c, v, k)
            else:
                z, x_hat, surrogate = self._surrogate_jvp(x.detach(), c, v, k)
            nll = -self._latent_log_prob(z, c)
            reconstruction = (x - x_hat).reshape(batch, -1).square().sum(dim=1)
            value = (nll - surrogate + self.beta * reconstruction).mean()
        parts = {"latent_nll": nll.mean().detach(), "reconstruction": reconstruction.mean().detach()}
        return Loss(value, parts)

    @staticmethod
    def _repeat(t: Tensor | None, k: int) -> Tensor | None:
        return t if (t is None or k == 1) else t.repeat(k, *([1] * (t.dim() - 1)))

    def _surrogate_jvp(self, x: Tensor, c: Tensor | None, v: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        r""":math:`v^\top J_f\,\mathrm{sg}(J_g v)`: forward mode through g, reverse with graph through f."""
        batch = x.shape[0]
        x = x.requires_grad_(True)
        z = self.encode(x, c)
        # One decoder pass gives g(z) (graph kept, for the reconstruction) and J_g(z) v (tangent).
        z_in = self._repeat(z, k)
        x_hat, jgv = dual_forward(self.decoder, z_in, v, self._repeat(c, k), self._decoder_takes_c)
        self._check_shape("decoder", z_in, x_hat)
        x_hat = x_hat[:batch]
        jgv = jgv.detach()
        surrogate = torch.zeros(batch, device=x.device, dtype=x.dtype)
        vs, ws = v.reshape(k, *x.shape), jgv.reshape(k, *x.shape)
        for i in range(k):
            (vjf,) = torch.autograd.grad(z, x, vs[i], create_graph=True)
            surrogate = surrogate + (vjf * ws[i]).reshape(batch, -1).sum(dim=1)
        return z, x_hat, surrogate / k

    def _surrogate_vjp(self, x: Tensor, c: Tensor | None, v: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        r""":math:`\mathrm{sg}(v^\top J_g)\, J_f v`: reverse mode through g, forward mode through f.

        One dual encoder pass gives z = f(x) and the tangent J_f(x) v; that tangent is an ordinary
        differentiable function of the encoder's parameters (reverse-over-forward), so the loss
        needs only a first-order backward pass, no double backward."""
        batch = x.shape[0]
        if k > 1:
            # K tangents per row in one structured pass (z computed once), when the encoder is
            # built from blocks that freeflows.tangents knows; else the rows are repeated K times.
            try:
                probes = v.reshape(k, *x.shape).transpose(0, 1)  # [B, K, *event]
                z, jfv = dual_forward(self.encoder, x, probes, c, self._encoder_takes_c)
            except Unsupported:
                pass
            else:
                self._check_shape("encoder", x, z)
                x_hat = self.decode(z, c)
                surrogate = torch.zeros(batch, device=x.device, dtype=x.dtype)
                for i in range(k):
                    (vjg,) = torch.autograd.grad(x_hat, z, probes[:, i], retain_graph=True)
                    surrogate = surrogate + (vjg.detach() * jfv[:, i]).reshape(batch, -1).sum(dim=1)
                return z, x_hat, surrogate / k
        z_all, jfv = dual_forward(
            self.encoder, self._repeat(x, k), v, self._repeat(c, k), self._encoder_takes_c
        )
        self._check_shape("encoder", v, z_all)
        x_hat_all = self.decode(z_all, self._repeat(c, k))
        # v^T J_g(z): the decoder's graph is kept for the reconstruction's backward pass.
        (vjg,) = torch.autograd.grad(x_hat_all, z_all, v, retain_graph=True)
        surrogate = (vjg.detach() * jfv).reshape(k, batch, -1).sum(dim=(0, 2)) / k
        return z_all[:batch], x_hat_all[:batch], surrogate

    @property
    def density(self) -> DensityVariant:
        """The variant that :meth:`log_prob` returns by default: the density of what
        :meth:`sample` draws, ``"decoder"`` for plain decoder draws and ``"encoder"`` with
        ``sample_refine_steps > 0``.

        Example:
            >>> import freeflows as ff
            >>> flow = ff.FreeFormFlow.resnet(2, hidden=8)
            >>> flow.density
            'decoder'
            >>> flow.sample_refine_steps = 5
            >>> flow.density
            'encoder'
        """
        return "decoder" if self.sample_refine_steps == 0 else "encoder"

    def _chunk(self, chunk_size: int | None) -> int:
        if chunk_size is None:
            return max(1, JACOBIAN_ELEMENTS // numel(self.event_shape) ** 2)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        return chunk_size

    def _decoder_value_and_jacobian(
        self, chunk: int
    ) -> Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]:
        def fn(z: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor]:
            return value_and_jacobian(
                self.decode, z, c, mode=self.jacobian_mode, chunk_size=chunk,
                module=self.decoder, takes_c=self._decoder_takes_c,
            )

        return fn

    def invert_decoder(
        self, x: Tensor, c: Tensor | None = None, *, chunk_size: int | None = None
    ) -> DecoderInverse:
        r"""Solve :math:`g(z) = x` for each row (:func:`freeflows.inversion.invert_decoder` with
        ``solve_rtol`` and ``solve_max_jacobians``). The solve starts at :math:`f(x)`; rows that
        do not converge from there start again from the best of ``solve_restarts`` latent draws
        :math:`z_j \sim p_Z` (the one whose :math:`g(z_j)` is nearest to :math:`x`; the draws
        come from a fixed seed, so the result is deterministic). ``converged`` says which rows
        are within the tolerance.

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``, or ``None``.
            chunk_size: rows per Jacobian chunk (as in :meth:`log_prob`).

        Returns:
            :class:`~freeflows.inversion.DecoderInverse`, for the rows of the flattened batch,
            ``[B, *event]``.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow.resnet(2, hidden=8)
            >>> x = torch.randn(5, 2)
            >>> out = flow.invert_decoder(x)
            >>> bool(out.converged.all()), torch.allclose(flow.decode(out.z), x, atol=1e-4)
            (True, True)
        """
        x, c, _ = self._check(x, c)
        return self._invert_decoder(x, c, chunk_size)

    def _invert_decoder(self, x: Tensor, c: Tensor | None, chunk_size: int | None) -> DecoderInverse:
        vj = self._decoder_value_and_jacobian(self._chunk(chunk_size))
        basis = getattr(self.latent, "basis", None)
        x = x.detach()

        def solve(x_: Tensor, z0: Tensor, c_: Tensor | None) -> DecoderInverse:
            return invert_decoder(
                vj, self.decode, x_, z0, c_, basis=basis, rtol=self.solve_rtol,
                max_jacobians=self.solve_max_jacobians,
            )

        with torch.no_grad():
            out = solve(x, self.encode(x, c), c)
            failed = (~out.converged).nonzero().flatten()
            if failed.numel() == 0 or self.solve_restarts == 0:
                return out
            xf, cf = x[failed], None if c is None else c[failed]
            retry = solve(xf, self._nearest_draws(xf, cf), cf)
            better = retry.converged | (~out.converged[failed] & (retry.residual < out.residual[failed]))
            rows = failed[better]
            for mine, theirs in zip(out, retry, strict=True):
                mine[rows] = theirs[better]
            return out

    def _nearest_draws(self, x: Tensor, c: Tensor | None) -> Tensor:
        """For each row, the latent draw (of ``solve_restarts``, fixed seed) whose decoding is
        nearest to ``x`` (under each row's own condition when conditional)."""
        m = self.solve_restarts
        gen = torch.Generator(device=x.device).manual_seed(0)
        flat = x.reshape(x.shape[0], -1)
        if self._latent_takes_c:  # draws of each row's own support, a bounded number at once
            starts = []
            for i in range(x.shape[0]):
                ci = c[i : i + 1].expand(m, -1)
                draws = self._latent_sample(m, ci, gen).to(x)
                parts = zip(draws.split(256), ci.split(256), strict=True)
                images = torch.cat([self.decode(d, cc) for d, cc in parts])
                starts.append(draws[(images.reshape(m, -1) - flat[i]).norm(dim=1).argmin()])
            return torch.stack(starts)
        draws = self.latent.sample(m, generator=gen).to(x)
        if c is None:
            images = self.decode(draws).reshape(m, -1)
            best = torch.cat([torch.cdist(part, images).argmin(dim=1) for part in flat.split(4096)])
            return draws[best]
        starts = []
        per = max(1, 2**20 // m)
        for i in range(0, x.shape[0], per):
            xi, ci = flat[i : i + per], c[i : i + per]
            tiled = draws.repeat(xi.shape[0], *([1] * (draws.dim() - 1)))
            images = self.decode(tiled, ci.repeat_interleave(m, 0))
            dist = (images.reshape(xi.shape[0], m, -1) - xi.unsqueeze(1)).norm(dim=2)
            starts.append(draws[dist.argmin(dim=1)])
        return torch.cat(starts)

    def log_prob(
        self,
        x: Tensor,
        c: Tensor | None = None,
        *,
        variant: DensityVariant | None = None,
        chunk_size: int | None = None,
    ) -> Tensor:
        r"""Log-density ``[*batch]`` (nats) of ``x`` (``[*batch, *event]``) given ``c``
        (``[C]`` or broadcastable to ``[*batch, C]``).

        ``variant`` (default :attr:`density`, the distribution that :meth:`sample` draws from):

        * ``"decoder"``: the exact density of :math:`g(z)`, :math:`z \sim p_Z`:
          :math:`\log p_Z(z^*) - \log\lvert\det J_g(z^*)\rvert` with :math:`g(z^*) = x`,
          solved from :math:`f(x)` by :meth:`invert_decoder`. Rows where the solve does not
          converge get **NaN** and a :class:`RuntimeWarning`; no value is guessed. Where
          :math:`g` is not injective, the pushforward density at :math:`x` is the sum over all
          preimages, and this returns the term of the one found: a lower bound, so the density
          then integrates to less than one (``density_mass`` in the tool shows it), and which
          root is found depends on the start, so the model's symmetries hold exactly only where
          the root is unique. With
          gradients enabled, :math:`z^*` is differentiated implicitly (one Newton step with
          autograd at the root), so the value is differentiable in ``x`` and the parameters.
        * ``"encoder"``: :math:`\log p_Z(f(x)) + \log\lvert\det J_f(x)\rvert`, the density of
          :math:`f^{-1}(z)` and of refined draws; normalised only where :math:`f` is injective,
          which training does not enforce away from the data (a briefly trained two-moons
          model's encoder density integrated to 2.2).
        * ``"paper"``: :math:`\log p_Z(f(x)) - \log\lvert\det J_g(f(x))\rvert`, the free-form
          flow papers' value. **Not normalised**: it equals the ``"decoder"`` value only where
          :math:`g(f(x)) = x`. For comparison with published tables only.

        Jacobians are built by :func:`freeflows.jacobian.batch_jacobian` with ``jacobian_mode``,
        in chunks of ``chunk_size`` rows (by default as many as keep ``chunk * D * D`` below
        ``2**24``); the result does not depend on it.

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``, or ``None``.
            variant: ``"decoder"``, ``"encoder"`` or ``"paper"``; ``None`` for :attr:`density`.
            chunk_size: rows per Jacobian chunk, or ``None``.

        Returns:
            ``[*batch]``.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow(ff.ResNet(2), ff.ResNet(2), ff.StandardNormal(2))
            >>> x = torch.randn(5, 2)
            >>> flow.log_prob(x).shape
            torch.Size([5])
            >>> variants = [flow.log_prob(x, variant=v) for v in ("decoder", "encoder", "paper")]
            >>> all(torch.allclose(v, variants[0], atol=1e-5) for v in variants)  # g inverts f here
            True
        """
        return self._per_row(self._log_prob, x, c, variant=variant, chunk_size=chunk_size)

    def _log_prob(
        self,
        x: Tensor,
        c: Tensor | None,
        variant: DensityVariant | None = None,
        chunk_size: int | None = None,
    ) -> Tensor:
        variant = self.density if variant is None else variant
        if variant not in DENSITY_VARIANTS:
            choices = ", ".join(DENSITY_VARIANTS)
            raise ValueError(f"unknown log_prob variant {variant!r}; choose one of {choices}")
        chunk = self._chunk(chunk_size)
        basis = getattr(self.latent, "basis", None)
        if variant == "decoder":
            return self._decoder_log_prob(x, c, chunk)
        z = self.encode(x, c)
        if variant == "paper":
            fn, net, inp, takes_c, sign = self.decode, self.decoder, z, self._decoder_takes_c, -1.0
        else:
            fn, net, inp, takes_c, sign = self.encode, self.encoder, x, self._encoder_takes_c, 1.0
        log_det = sign * log_abs_det_jacobian(
            fn,
            inp,
            c,
            basis=basis,
            mode=self.jacobian_mode,
            chunk_size=chunk,
            module=net,
            takes_c=takes_c,
        )
        return self._latent_log_prob(z, c) + log_det

    def _decoder_log_prob(self, x: Tensor, c: Tensor | None, chunk: int) -> Tensor:
        basis = getattr(self.latent, "basis", None)
        solve = self._invert_decoder(x, c, chunk)
        grads = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.decoder.parameters())
        )
        if not grads:
            log_prob = self._latent_log_prob(solve.z, c) - log_abs_det(solve.jacobian)
        else:
            # Implicit differentiation: z* - J^{-1}(g(z*) - x) has the value z* and, at the root,
            # the derivative dz*/d(x, theta) = J^{-1}(dx - dg/dtheta).
            z_star = solve.z.detach()
            r = (self.decode(z_star, c) - x).reshape(x.shape[0], -1)
            jac = torch.nan_to_num(solve.jacobian.detach())
            ok = torch.linalg.lu_factor_ex(jac).info == 0
            eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
            jac = torch.where(ok[:, None, None], jac, eye)
            if basis is None:
                step = torch.linalg.solve(jac, r)
            else:
                q = basis.to(r)
                step = torch.linalg.solve(jac, r @ q) @ q.T
            z = z_star - step.reshape(x.shape)
            log_det = log_abs_det_jacobian(
                self.decode, z, c, basis=basis, mode=self.jacobian_mode, chunk_size=chunk,
                module=self.decoder, takes_c=self._decoder_takes_c,
            )
            log_prob = self._latent_log_prob(z, c) - log_det
        return _nan_where(
            ~solve.converged,
            log_prob,
            "rows: the solve g(z) = x did not converge (the point may lie outside the decoder's "
            "range); their log_prob is NaN",
            stacklevel=6,
        )

    def diagnostics(
        self, x: Tensor, c: Tensor | None = None, log_prob: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Batch means of the reconstruction error and of the gap between the encoder-based
        log-density and ``log_prob`` (the model's own density, ``log_prob_gap``; rows whose solve
        failed are left out). A growing gap means ``beta`` is too small.

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``, or ``None``.
            log_prob: :meth:`log_prob` of ``x`` if it is already computed (for the flattened
                batch, ``[B]``), or ``None``.

        Returns:
            ``{"reconstruction": ..., "log_prob_gap": ...}``, detached scalars.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow.resnet(2, hidden=8)
            >>> {k: round(float(v), 6) for k, v in flow.diagnostics(torch.randn(6, 2)).items()}
            {'reconstruction': 0.0, 'log_prob_gap': 0.0}
        """
        x, c, _ = self._check(x, c)
        reconstruction = (x - self.decode(self.encode(x, c), c)).reshape(x.shape[0], -1).square().sum(1)
        log_prob = self._log_prob(x, c) if log_prob is None else log_prob.reshape(-1)
        gap = (self._log_prob(x, c, variant="encoder") - log_prob).abs()
        return {"reconstruction": reconstruction.mean().detach(), "log_prob_gap": gap.nanmean().detach()}

    def inverse_defect(
        self,
        x: Tensor,
        c: Tensor | None = None,
        *,
        probes: int = 1,
        mode: HutchinsonMode = "gaussian",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Unbiased estimate per row of the squared inverse defect
        :math:`\lVert J_g(f(x))\,J_f(x) - I\rVert_F^2`, which bounds the error of the
        surrogate's gradient (:func:`freeflows.inverse_defect.inverse_defect`; on the latent's
        subspace when it has a ``basis``). Costs ``probes`` forward-mode products through each
        network; no Jacobian is formed.

        Args:
            x: data ``[*batch, *event]``.
            c: conditions ``[C]`` or broadcastable to ``[*batch, C]``, or ``None``.
            probes: probes per row.
            mode: probe distribution, ``"gaussian"``, ``"rademacher"`` or ``"sphere"`` (at most
                ``D`` probes).
            generator: random number generator of the probes.

        Returns:
            ``[*batch]``.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow.resnet(2, hidden=8)
            >>> defect = flow.inverse_defect(torch.randn(3, 2), probes=4)
            >>> defect.shape, float(defect.abs().max())  # g inverts f at initialisation
            (torch.Size([3]), 0.0)
        """
        from .inverse_defect import inverse_defect

        return self._per_row(
            lambda x_, c_: inverse_defect(
                self.encoder, self.decoder, x_, c_, probes=probes,
                mode=mode, basis=getattr(self.latent, "basis", None),
                encoder_takes_c=self._encoder_takes_c, decoder_takes_c=self._decoder_takes_c,
                generator=generator,
            ),
            x,
            c,
        )

    @property
    def divergence_hint(self) -> str:
        """What to try when training diverges, for the runner's message.

        Example:
            >>> import freeflows as ff
            >>> ff.FreeFormFlow.resnet(2, beta=5.0).divergence_hint.split(":")[0]
            'raise beta (now 5), e.g. to 10'
        """
        return (
            f"raise beta (now {self.beta:g}), e.g. to {max(2 * self.beta, 10):g}: a larger "
            "reconstruction weight keeps the decoder close to the encoder's inverse, which the "
            "surrogate gradient needs"
        )

    def rsample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Like :meth:`sample` with ``sample_refine_steps = 0``, with gradients to the decoder's
        parameters (a reparametrised draw :math:`g(z)`). Refined draws are not reparametrised.

        Args:
            n: draws per condition.
            c: conditions ``[*cbatch, C]``, or ``None``.
            generator: random number generator, for reproducible draws.

        Returns:
            ``[n, *cbatch, *event]``.

        Example:
            >>> import freeflows as ff
            >>> x = ff.FreeFormFlow.resnet(2, hidden=8).rsample(4)
            >>> x.shape, x.requires_grad
            (torch.Size([4, 2]), True)
        """
        return super().rsample(n, c, generator)

    def _rsample(self, n: int, c: Tensor | None, generator: torch.Generator | None) -> Tensor:
        if self.sample_refine_steps:
            raise ValueError(
                "rsample draws g(z) without refinement; set sample_refine_steps = 0 to use it"
            )
        return self.decode(self._latent_sample(n, c, generator), c)

    @torch.no_grad()
    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        r"""``n`` draws :math:`g(z)`, :math:`z \sim p_Z` (one decoder pass), each refined towards
        :math:`f^{-1}(z)` by ``sample_refine_steps`` steps of
        :func:`~freeflows.inversion.invert_encoder` if that is positive. Shape ``[n, *event]``,
        or ``[n, *cbatch, *event]`` with ``c`` of shape ``[*cbatch, C]`` (``n`` draws for each
        condition). No gradients (see :meth:`rsample`).

        Args:
            n: draws per condition.
            c: conditions ``[*cbatch, C]``, or ``None``.
            generator: random number generator, for reproducible draws.

        Returns:
            ``[n, *event]``, or ``[n, *cbatch, *event]`` with a condition.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow.resnet(2, condition_dim=1, hidden=8, sample_refine_steps=3)
            >>> flow.sample(5, torch.randn(1)).shape, flow.sample(5, torch.randn(3, 1)).shape
            (torch.Size([5, 2]), torch.Size([5, 3, 2]))
        """
        return super().sample(n, c, generator)

    def _sample(self, n: int, c: Tensor | None, generator: torch.Generator | None) -> Tensor:
        z = self._latent_sample(n, c, generator)
        if self.sample_refine_steps == 0:
            return self.decode(z, c)
        x, _ = invert_encoder(self.encode, self.decode, z, c, steps=self.sample_refine_steps)
        return x

    @torch.no_grad()
    def sample_and_log_prob(
        self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        r"""Draws as :meth:`sample` and the exact log-density (``[n, *cbatch]``) of each under
        the distribution that drew it, without a root solve.

        * Decoder draws: :math:`\log p_Z(z) - \log\lvert\det J_g(z)\rvert` at the drawn
          :math:`z` (the pushforward density where :math:`g` is injective).
        * Refined draws (``sample_refine_steps > 0``): the ``"encoder"`` density at the draw;
          draws whose refinement did not reach :math:`f(x) = z` within the tolerance of
          :func:`~freeflows.inversion.decoder_tolerance` get NaN and a warning.

        Args:
            n: draws per condition.
            c: conditions ``[*cbatch, C]``, or ``None``.
            generator: random number generator, for reproducible draws.

        Returns:
            ``(x, log_q)``, ``[n, *cbatch, *event]`` and ``[n, *cbatch]``.

        Example:
            >>> import torch, freeflows as ff
            >>> flow = ff.FreeFormFlow.resnet(2, hidden=8)
            >>> x, log_q = flow.sample_and_log_prob(4)
            >>> torch.allclose(log_q, flow.log_prob(x), atol=1e-5)
            True
        """
        return super().sample_and_log_prob(n, c, generator)

    def _sample_and_log_prob(
        self, n: int, c: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        z = self._latent_sample(n, c, generator)
        basis = getattr(self.latent, "basis", None)
        if self.sample_refine_steps == 0:
            x, jac = self._decoder_value_and_jacobian(self._chunk(None))(z, c)
            return x, self._latent_log_prob(z, c) - log_abs_det(jac, basis)
        x, residual = invert_encoder(self.encode, self.decode, z, c, steps=self.sample_refine_steps)
        log_q = self._log_prob(x, c, variant="encoder")
        failed = ~(residual <= decoder_tolerance(z, self.solve_rtol))
        message = (
            "refined draws did not reach f(x) = z within the tolerance; their log-density is NaN "
            "(raise sample_refine_steps)"
        )
        return x, _nan_where(failed, log_q, message, stacklevel=3)
