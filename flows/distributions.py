"""The density of a flow, ``FlowDistribution``: a torch distribution and a module.

Shapes follow ``torch.distributions``: a distribution has an ``event_shape`` (one sample,
e.g. ``(D,)`` or ``(C, H, W)``) and a ``batch_shape``; ``sample(sample_shape)`` returns
``sample_shape + batch_shape + event_shape`` and ``log_prob(x)`` returns ``x``'s leading
(non-event) shape. A ``(..., K)`` context makes ``context.shape[:-1]`` the batch shape.
The bases are in flows/bases.py; any ``torch.distributions.Distribution`` serves too.
"""

from __future__ import annotations

from torch import Size, Tensor, nn
from torch.distributions import Distribution

from flows.base import Flow
from flows.bases import ModuleDistribution, ShapeLike, TorchBase, _check_sample_shape, _check_temperature

__all__ = ["FlowDistribution"]


class FlowDistribution(ModuleDistribution):
    """The density of ``x`` such that ``transform(x)`` follows ``base``: a torch distribution.

    ``log p(x | c) = log p_base(z | c) + log|det dz/dx|`` with ``z, logdet = transform(x, c)``.
    Sampling draws ``z`` from the base (its spread scaled by ``temperature``) and inverts
    the flow; :meth:`rsample` keeps the gradients (a reparameterized sample, e.g. for a
    variational posterior), :meth:`sample` does not.

    Shapes (``E`` the event shape, one sample's; ``c`` a ``(..., K)`` context):

    - ``log_prob(x, c)``: ``x`` is ``(..., *E)``, the result ``(...)``; ``c`` broadcasts
      against the leading dims of ``x``.
    - ``rsample(sample_shape, c, temperature)`` and ``sample``: ``sample_shape +
      c.shape[:-1] + E`` (so ``sample(n, c)`` with ``c`` of shape ``(B, K)`` gives
      ``(n, B, *E)``, ``n`` samples per context row, and ``sample(context=c)`` one per row).
    - ``sample_and_log_prob``: both, in one pass through the inverse.
    - ``forward(x, c)`` is ``log_prob``, so ``dist(x)``, DDP, ``torch.compile(dist)`` and
      ``torch.func.functional_call`` work without a wrapper.

    Args:
        transform: the flow, data -> latent.
        base: a base from this module (which follow ``.to()`` and may learn, take a
            context and a temperature), or any ``torch.distributions.Distribution``
            whose ``event_shape`` is one sample's shape and whose ``batch_shape`` is ``()``
            (e.g. ``Independent(Normal(zeros(D), ones(D)), 1)``; it stays on its own device).

    Example:
        >>> import torch, flows
        >>> dist = FlowDistribution(flows.ActNorm(2), flows.StandardNormal((2,)))
        >>> dist.log_prob(torch.randn(5, 2)).shape, dist.sample((3,)).shape
        (torch.Size([5]), torch.Size([3, 2]))
        >>> x, log_p = dist.sample_and_log_prob((4,))
        >>> torch.allclose(log_p, dist.log_prob(x))
        True
    """

    def __init__(self, transform: Flow, base: Distribution | nn.Module) -> None:
        if not isinstance(transform, Flow):
            raise TypeError(f"FlowDistribution expects a flows.Flow as transform, got {type(transform).__name__}")
        if isinstance(base, Distribution) and not isinstance(base, nn.Module):
            if base.batch_shape != Size() or not base.event_shape:
                raise ValueError(
                    f"FlowDistribution expects a base with batch_shape () and one sample's shape as "
                    f"event_shape, got {type(base).__name__} with batch_shape {tuple(base.batch_shape)} and "
                    f"event_shape {tuple(base.event_shape)}; wrap it in torch.distributions.Independent"
                )
            base = TorchBase(base)
        if not hasattr(base, "event_shape"):
            raise TypeError(f"FlowDistribution expects a distribution as base, got {type(base).__name__}")
        super().__init__(Size(base.event_shape))
        self.transform = transform
        self.base = base

    def _check_dtype(self, x: Tensor) -> None:
        if x.dtype != self._anchor.dtype:
            raise TypeError(
                f"FlowDistribution expects input of dtype {self._anchor.dtype} (its parameters'), got {x.dtype}; "
                f"convert the input (x.to({self._anchor.dtype})) or the model (.to({x.dtype}))"
            )

    def _flat_context(self, context: Tensor | None, leading: Size) -> Tensor | None:
        """``context`` broadcast to ``leading + (K,)`` and flattened to ``(prod(leading), K)``."""
        if context is None:
            return None
        try:
            expanded = context.expand(*leading, context.shape[-1])
        except RuntimeError as error:
            raise ValueError(
                f"FlowDistribution expects a context of shape (..., K) that broadcasts to the samples' leading "
                f"shape {tuple(leading)}, got {tuple(context.shape)}"
            ) from error
        return expanded.reshape(-1, context.shape[-1])

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log p(x | context)`` for ``x`` of shape ``(..., *event_shape)``: ``(...)``, float32 or wider."""
        leading = self._leading(x, "FlowDistribution")
        self._check_dtype(x)
        if leading.numel() == 0:
            return x.new_zeros(leading)
        log_p_base, logdet = self.log_prob_parts(x.reshape(-1, *self.event_shape), self._flat_context(context, leading))
        return (log_p_base + logdet).reshape(leading)

    def log_prob_parts(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(log p_base(z), logdet)`` per sample, each ``(B,)``, for ``x`` of shape ``(B, *event_shape)``:
        the two terms of :meth:`log_prob`."""
        z, logdet = self.transform(x, context)
        return self.base.log_prob(z.to(logdet.dtype), context), logdet

    def _sample(
        self, sample_shape: ShapeLike, context: Tensor | None, temperature: float
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Size]:
        """``(x, z, flat context, log|det dx/dz|, leading shape)``, ``z`` and the context flat."""
        _check_temperature("FlowDistribution", temperature)
        shape = _check_sample_shape("FlowDistribution", sample_shape)
        z = self.base.rsample(shape, context, temperature)
        leading = z.shape[: z.dim() - len(self.event_shape)]
        z_flat = z.reshape(-1, *self.event_shape)
        flat_context = self._flat_context(context, leading)
        if leading.numel() == 0:  # no sample: nothing to invert
            return z, z_flat, flat_context, z.new_zeros(0), leading
        x, inverse_logdet = self.transform.inverse(z_flat, flat_context)
        return x.reshape(z.shape), z_flat, flat_context, inverse_logdet, leading

    def rsample(self, sample_shape: ShapeLike = Size(), context: Tensor | None = None,
                temperature: float = 1.0) -> Tensor:
        """Reparameterized samples, ``sample_shape + context.shape[:-1] + event_shape``; gradients
        flow to the flow's (and the base's) parameters and to the context."""
        return self._sample(sample_shape, context, temperature)[0]

    def sample_and_log_prob(
        self, sample_shape: ShapeLike = Size(), context: Tensor | None = None, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Reparameterized samples and their ``log p`` (the model's, at temperature 1) in one
        pass: ``log p(x) = log p_base(z) - log|det dx/dz|``.

        Returns ``(x, log_p)`` shaped ``sample_shape + batch + event_shape`` and
        ``sample_shape + batch``, where ``batch = context.shape[:-1]``.
        """
        x, z_flat, flat_context, inverse_logdet, leading = self._sample(sample_shape, context, temperature)
        if leading.numel() == 0:
            return x, x.new_zeros(leading)
        log_p = self.base.log_prob(z_flat.to(inverse_logdet.dtype), flat_context) - inverse_logdet
        return x, log_p.reshape(leading)
