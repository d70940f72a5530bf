"""FFJORD: a stack of continuous normalizing flows (``flows.ContinuousFlow``)."""

from __future__ import annotations

from functools import partial
from typing import Any, ClassVar

import flows
from flows.continuous import ConcatSquashNet, ContinuousFlow

from .density import DensityModel, check_in_shape, preprocessing

__all__ = ["FFJORD"]


class FFJORD(DensityModel):
    """FFJORD: ``num_steps`` chained ODE blocks ``dz/dt = f_k(z, t, context)``.

    Each block maps ``z -> z(T)`` with ``logdet = ∫_0^T tr(∂f_k/∂z) dt``, exact (``D``
    vector-Jacobian products per evaluation) or by Hutchinson's estimate (``logdet_mode``);
    ``f_k`` is a :class:`flows.continuous.ConcatSquashNet` of ``num_blocks + 1`` hidden
    layers of ``hidden_features``, gated by ``[t, context]``. Vectors ``(B, D)``; images
    ``(C, H, W)`` (dequantized levels in ``[0, K)`` when ``num_levels=K``) are taken to the
    logit range as in RealNVP and flattened, so the blocks act on vectors of ``C*H*W``
    (FFJORD's multiscale convolutional model is not included). The latent has the input's
    shape. Needs the ``ode`` extra (``pip install 'jacflow[ode]'``).

    Evaluate a model trained with estimates in exact mode, or report the estimate with
    its standard error: ``with flows.logdet_mode(model, "exact"): model.log_prob(x)``.

    Departures from the paper: every dynamics net is concatsquash (the paper's tabular
    models use ``concat`` layers for POWER, GAS, HEPMASS and MINIBOONE); no batch
    normalization between blocks.

    Args:
        in_shape: one sample's shape, ``(D,)`` or ``(C, H, W)``.
        num_levels: quantization levels ``K``; ``None`` for continuous data (no preprocessing).
        num_steps: chained ODE blocks (FFJORD's ``num_blocks``, "flow steps").
        hidden_features: width of each dynamics net.
        num_blocks: hidden layers after the first in each dynamics net (FFJORD's 64-64-64 is 2).
        context_features: size of a ``(B, K)`` context fed to every dynamics net; 0 for none.
        activation: ``"tanh"`` or ``"softplus"``.
        time: integration time ``T`` of each block (initial value when ``learn_time``).
        learn_time: learn each block's ``T`` (FFJORD's ``train_T``).
        logdet_mode: ``"exact"`` or ``"estimate"`` (Hutchinson).
        probe: ``"rademacher"`` or ``"gaussian"`` Hutchinson probes.
        atol, rtol: the solver's tolerances.
        method: the torchdiffeq method (``"dopri5"``, ...).
        adjoint: gradients by the adjoint method.
        kinetic_energy, jacobian_norm: RNODE's regularization weights (0: off).
        alpha: the logit margin for image data.

    References:
        Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud, "FFJORD: Free-form Continuous
        Dynamics for Scalable Reversible Generative Models", ICLR 2019, arXiv:1810.01367.

    Example:
        >>> import torch
        >>> model = FFJORD((2,), hidden_features=8, num_blocks=1)
        >>> model.log_prob(torch.randn(4, 2)).shape, model.sample(3).shape
        (torch.Size([4]), torch.Size([3, 2]))
    """

    name: ClassVar[str] = "ffjord"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # FFJORD's train_toy.py defaults (rtqichen/ffjord): one block of concatsquash
        # 64-64-64, tanh, T = 0.5 learned, dopri5 at atol = rtol = 1e-5. Exact trace (the
        # paper's toys use brute-force divergence; cheap for D = 2).
        "toy2d": dict(num_steps=1, hidden_features=64, num_blocks=2, activation="tanh", time=0.5),
        # Grathwohl et al. 2019 (arXiv:1810.01367), appendix, the table of the tabular
        # models: nonlinearity, layers of f, hidden width = multiplier x D, flow steps
        # (POWER D=6: tanh, 3 layers of 10D, 5 steps; GAS D=8: tanh, 3 of 20D, 5; HEPMASS
        # D=21: softplus, 2 of 10D, 10; MINIBOONE D=43: softplus, 2 of 20D, 1; BSDS300 D=63:
        # tanh, 3 of 20D, 2), T = 1 learned, Hutchinson estimates in training.
        "power": dict(num_steps=5, hidden_features=60, num_blocks=2, activation="tanh", logdet_mode="estimate"),
        "gas": dict(num_steps=5, hidden_features=160, num_blocks=2, activation="tanh", logdet_mode="estimate"),
        "hepmass": dict(num_steps=10, hidden_features=210, num_blocks=1, activation="softplus", logdet_mode="estimate"),
        "miniboone": dict(num_steps=1, hidden_features=860, num_blocks=1, activation="softplus", logdet_mode="estimate"),
        "bsds300": dict(num_steps=2, hidden_features=1260, num_blocks=2, activation="tanh", logdet_mode="estimate"),
        # jacflow: 8x8 digits (1x8x8, K=17, flattened to D=64) on a 2-core CPU: one block
        # of 3 x 128, Hutchinson estimates in training.
        "digits": dict(num_steps=1, hidden_features=128, num_blocks=2, activation="softplus", logdet_mode="estimate"),
    }

    def __init__(
        self,
        in_shape: tuple[int, ...],
        num_levels: int | None = None,
        num_steps: int = 1,
        hidden_features: int = 64,
        num_blocks: int = 2,
        context_features: int = 0,
        activation: str = "tanh",
        time: float = 1.0,
        learn_time: bool = True,
        logdet_mode: str = "exact",
        probe: str = "rademacher",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        method: str = "dopri5",
        adjoint: bool = False,
        kinetic_energy: float = 0.0,
        jacobian_norm: float = 0.0,
        alpha: float = 0.05,
    ) -> None:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"FFJORD expected num_steps >= 1, got {num_steps!r}")
        in_shape = check_in_shape("FFJORD", in_shape)
        features = 1
        for size in in_shape:
            features *= size
        dynamics = partial(
            ConcatSquashNet, hidden_features=hidden_features, num_blocks=num_blocks, activation=activation
        )
        blocks = [
            ContinuousFlow(
                features, dynamics, context_features, time=time, learn_time=learn_time, logdet_mode=logdet_mode,
                probe=probe, atol=atol, rtol=rtol, method=method, adjoint=adjoint,
                kinetic_energy=kinetic_energy, jacobian_norm=jacobian_norm,
            )
            for _ in range(num_steps)
        ]
        layers = preprocessing(num_levels, "logit", alpha) if len(in_shape) == 3 else []
        if len(in_shape) == 3:
            layers.append(flows.Flatten(in_shape))
        body = blocks if len(in_shape) == 1 else [*blocks, flows.Inverse(flows.Flatten(in_shape))]
        transform = flows.Sequential(*layers, *body)
        config = dict(
            in_shape=in_shape, num_levels=num_levels, num_steps=num_steps, hidden_features=hidden_features,
            num_blocks=num_blocks, context_features=context_features, activation=activation, time=time,
            learn_time=learn_time, logdet_mode=logdet_mode, probe=probe, atol=atol, rtol=rtol, method=method,
            adjoint=adjoint, kinetic_energy=kinetic_energy, jacobian_norm=jacobian_norm, alpha=alpha,
        )
        super().__init__(transform, in_shape, num_levels, config)
