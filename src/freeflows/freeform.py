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

**The density** reported by :meth:`FreeFormFlow.log_prob` is exact for the model
:math:`x = g(z)`: :math:`\log p_Z(f(x)) - \log\lvert\det J_g(f(x))\rvert`, with the full
Jacobian. The encoder-based value :math:`\log p_Z(f(x)) + \log\lvert\det J_f(x)\rvert` is also
available; the gap between the two shows how well :math:`g` inverts :math:`f`.

**Sampling** is one decoder pass, :math:`g(z)`. With ``sample_refine_steps = K > 0`` each draw is
then moved towards :math:`f^{-1}(z)` by :math:`K` steps of :func:`freeflows.inversion.invert_encoder`
(one encoder and one decoder pass each), so the draws follow the encoder's density, the one that
maximum likelihood trains.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .checks import check_condition, check_data, numel
from .conditioning import accepts_condition, call_with_condition
from .contract import Loss
from .hutchinson import HutchinsonMode, check_hutchinson, hutchinson_vectors
from .inversion import invert_encoder
from .jacobian import JacobianMode, log_abs_det_jacobian
from .tangents import Unsupported, dual_forward

SurrogateMode = Literal["jvp", "vjp"]
SURROGATE_MODES: tuple[str, ...] = ("jvp", "vjp")

#: Upper bound on Jacobian elements held at once by ``log_prob`` (``chunk * D * D``).
JACOBIAN_ELEMENTS = 2**24


class FreeFormFlow(nn.Module):
    r"""A normalizing flow from an encoder ``f`` and a decoder ``g`` of any architecture.

    Args:
        encoder: network ``[B, *event] -> [B, *event]`` (data to latent).
        decoder: network ``[B, *event] -> [B, *event]`` (latent to data).
        latent: latent distribution with ``event_shape``, ``log_prob``, ``sample`` and ``basis``.
        beta: weight :math:`\beta \ge 0` of the reconstruction loss.
        hutchinson: distribution of the probe vectors, ``"gaussian"``, ``"rademacher"`` or
            ``"sphere"`` (see :mod:`freeflows.hutchinson`).
        hutchinson_samples: probes per sample ``K``; the surrogate is their average.
        condition_dim: number of condition features, or ``None`` for an unconditional flow.
            Conditions go to both networks (see :mod:`freeflows.conditioning`).
        jacobian_mode: ``"auto"``, ``"forward"`` or ``"reverse"`` products for ``log_prob``.
        surrogate: how the surrogate is estimated (see the module docstring): ``"vjp"``
            (default, faster) takes :math:`v^\top J_g` by reverse mode through the decoder and
            :math:`J_f v` by forward mode through the encoder; ``"jvp"`` takes :math:`J_g v` by
            forward mode through the decoder and :math:`v^\top J_f` by reverse mode through the
            encoder, with a double backward pass.
        sample_refine_steps: iterations of :func:`freeflows.inversion.invert_encoder` applied to
            each decoder draw by :meth:`sample` (``0``, the default: the plain decoder draw).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent: nn.Module,
        beta: float = 10.0,
        hutchinson: HutchinsonMode = "gaussian",
        hutchinson_samples: int = 1,
        condition_dim: int | None = None,
        jacobian_mode: JacobianMode = "auto",
        surrogate: SurrogateMode = "vjp",
        sample_refine_steps: int = 0,
    ):
        super().__init__()
        if not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"beta must be a number >= 0, got {beta!r}")
        if condition_dim is not None and (not isinstance(condition_dim, int) or condition_dim < 1):
            raise ValueError(f"condition_dim must be a positive integer or None, got {condition_dim!r}")
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
        self._encoder_takes_c = accepts_condition(encoder)
        self._decoder_takes_c = accepts_condition(decoder)

    # -- the two networks ---------------------------------------------------------------------
    def encode(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """:math:`z = f(x)` (data to latent)."""
        z = call_with_condition(self.encoder, x, c, self._encoder_takes_c)
        self._check_shape("encoder", x, z)
        return z

    def decode(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        """:math:`x = g(z)` (latent to data)."""
        x = call_with_condition(self.decoder, z, c, self._decoder_takes_c)
        self._check_shape("decoder", z, x)
        return x

    @staticmethod
    def _check_shape(name: str, inp: Tensor, out: Tensor) -> None:
        if out.shape != inp.shape:
            raise ValueError(
                f"the {name} maps {tuple(inp.shape)} to {tuple(out.shape)}; it must keep the shape"
            )

    def _inputs(self, x: Tensor, c: Tensor | None) -> Tensor | None:
        check_data(x, self.event_shape)
        return check_condition(c, self.condition_dim, x.shape[0])

    # -- the model contract -------------------------------------------------------------------
    def loss(self, x: Tensor, c: Tensor | None = None) -> Loss:
        """The free-form objective of a batch (see the module docstring).

        ``Loss.parts``: ``nll`` is :math:`-\\log p_Z(f(x))`, the latent term only (the surrogate is
        not a log-determinant); ``reconstruction`` is :math:`\\lVert x - g(f(x))\\rVert^2`; both
        are batch means, detached.
        """
        c = self._inputs(x, c)
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
            nll = -self.latent.log_prob(z)
            reconstruction = (x - x_hat).reshape(batch, -1).square().sum(dim=1)
            value = (nll - surrogate + self.beta * reconstruction).mean()
        return Loss(value, {"nll": nll.mean().detach(), "reconstruction": reconstruction.mean().detach()})

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

    def log_prob(
        self,
        x: Tensor,
        c: Tensor | None = None,
        *,
        variant: Literal["decoder", "encoder"] = "decoder",
        chunk_size: int | None = None,
    ) -> Tensor:
        r"""Exact log-density ``[B]``.

        ``variant="decoder"`` (default): :math:`\log p_Z(z) - \log\lvert\det J_g(z)\rvert`, the
        density of samples :math:`g(z)`, :math:`z \sim p_Z`, evaluated at :math:`z = f(x)`.
        ``variant="encoder"``: :math:`\log p_Z(f(x)) + \log\lvert\det J_f(x)\rvert`.

        Jacobians are built by :func:`freeflows.jacobian.batch_jacobian` with ``jacobian_mode``
        (``"auto"``: one structured forward pass with ``D`` tangents for ``ResNet``-like
        networks, else ``vmap(jacrev)``), in chunks of ``chunk_size`` rows (by default as many as
        keep ``chunk * D * D`` below ``2**24``); the result does not depend on it.
        """
        c = self._inputs(x, c)
        if variant not in ("decoder", "encoder"):
            raise ValueError(f"unknown log_prob variant {variant!r}; choose 'decoder' or 'encoder'")
        if chunk_size is None:
            chunk_size = max(1, JACOBIAN_ELEMENTS // numel(self.event_shape) ** 2)
        basis = getattr(self.latent, "basis", None)
        z = self.encode(x, c)
        if variant == "decoder":
            fn, net, inp, takes_c, sign = self.decode, self.decoder, z, self._decoder_takes_c, -1.0
        else:
            fn, net, inp, takes_c, sign = self.encode, self.encoder, x, self._encoder_takes_c, 1.0
        log_det = sign * log_abs_det_jacobian(
            fn,
            inp,
            c,
            basis=basis,
            mode=self.jacobian_mode,
            chunk_size=chunk_size,
            module=net,
            takes_c=takes_c,
        )
        return self.latent.log_prob(z) + log_det

    def diagnostics(
        self, x: Tensor, c: Tensor | None = None, log_prob: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Batch means of the reconstruction error and of the gap between the encoder- and
        decoder-based log-densities (``log_prob_gap``). A growing gap means ``beta`` is too small.
        Pass the decoder-based ``log_prob`` if it is already computed."""
        c = self._inputs(x, c)
        reconstruction = (x - self.decode(self.encode(x, c), c)).reshape(x.shape[0], -1).square().sum(1)
        if log_prob is None:
            log_prob = self.log_prob(x, c)
        gap = (self.log_prob(x, c, variant="encoder") - log_prob).abs()
        return {"reconstruction": reconstruction.mean().detach(), "log_prob_gap": gap.mean().detach()}

    @property
    def divergence_hint(self) -> str:
        """What to try when training diverges, for the runner's message."""
        return (
            f"raise beta (now {self.beta:g}), e.g. to {max(2 * self.beta, 10):g}: a larger "
            "reconstruction weight keeps the decoder close to the encoder's inverse, which the "
            "surrogate gradient needs"
        )

    def sample(self, n: int, c: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws :math:`g(z)`, :math:`z \\sim p_Z` (one decoder pass), each refined towards
        :math:`f^{-1}(z)` by ``sample_refine_steps`` steps of
        :func:`~freeflows.inversion.invert_encoder` if that is positive. With ``c`` of shape
        ``[C]``, all ``n`` draws are from :math:`p(x \\mid c)`; with ``[n, C]``, one per row."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        c = check_condition(c, self.condition_dim, n)
        z = self.latent.sample(n, generator=generator)
        if c is not None:
            z = z.to(c)
        if self.sample_refine_steps == 0:
            return self.decode(z, c)
        x, _ = invert_encoder(self.encode, self.decode, z, c, steps=self.sample_refine_steps)
        return x
