"""jacflow's invertible-layer library: every layer returns ``(output, log|det J|)``.

``forward`` maps data to latent (the density direction); ``inverse`` maps back.
"""

from flows import (
    attention, continuous, derivatives, jacobian, lipschitz, maps, nets, reversible, spectral, splines, statistical,
    transformer,
)

# The contract
from flows.base import Flow, Inverse, InverseFlow, InverseNotAvailable, Sequential

# Input validation for layers, yours included
from flows.validation import check_context, check_input

# Elementwise maps shared by the coupling and autoregressive families
from flows.maps import AdditiveMap, AffineMap, ElementwiseMap, SplineMap

# Coupling layers
from flows.coupling import AdditiveCoupling, AffineCoupling, Coupling, RQSplineCoupling

# Autoregressive flows
from flows.autoregressive import MADE, Autoregressive, MaskedAffineAutoregressive, RQSplineAutoregressive

# Normalization
from flows.normalization import ActNorm

# Linear maps and permutations
from flows.linear import InvConv1x1, Permutation, Reverse

# Elementwise preprocessing
from flows.elementwise import Logit, ScalarAffine

# Reshaping and multi-scale
from flows.reshape import Flatten, Split, Squeeze

# Transformer autoregressive flows (TarFlow)
from flows.transformer import FixedPoint, Patchify, TransformerAutoregressive

# Free-form Jacobians: log-det modes (exact / estimate / gradient)
from flows.freeform import FreeFormFlow, logdet_is_exact, logdet_is_likelihood, logdet_mode
from flows.residual import ConvergenceError, Residual
from flows.lipschitz import LipSwish, LipschitzConvNet, LipschitzMLP, LipschitzNet
from flows.spectral import LipschitzConv2d, LipschitzLinear
from flows.continuous import ConcatSquashNet, ContinuousFlow, SolverError

# Memory-saving backpropagation: inputs rebuilt through inverses instead of stored
from flows.reversible import DriftMonitor, InvertibleSequential, invertible_backprop

# Densities (torch distributions) and interop with torch.distributions
from flows.bases import DiagonalNormal, GaussianMixture, StandardNormal
from flows.distributions import FlowDistribution
from flows.interop import FlowAsTransform, TransformAsFlow

# The oracle: exact Jacobians, and the statistical half for estimators
from flows.jacobian import check_flow, exact_logdet
from flows.statistical import EstimatorCheckError, check_estimator, check_gradient_estimator

__all__ = [
    "Flow", "Inverse", "InverseFlow", "InverseNotAvailable", "Sequential",
    "check_context", "check_input",
    "AdditiveMap", "AffineMap", "ElementwiseMap", "SplineMap",
    "AdditiveCoupling", "AffineCoupling", "Coupling", "RQSplineCoupling",
    "MADE", "Autoregressive", "MaskedAffineAutoregressive", "RQSplineAutoregressive",
    "ActNorm",
    "InvConv1x1", "Permutation", "Reverse",
    "Logit", "ScalarAffine",
    "Flatten", "Split", "Squeeze",
    "FixedPoint", "Patchify", "TransformerAutoregressive",
    "FreeFormFlow", "logdet_is_exact", "logdet_is_likelihood", "logdet_mode",
    "Residual", "ConvergenceError", "LipSwish", "LipschitzConvNet", "LipschitzMLP", "LipschitzNet",
    "LipschitzConv2d", "LipschitzLinear", "ConcatSquashNet", "ContinuousFlow", "SolverError",
    "DriftMonitor", "InvertibleSequential", "invertible_backprop",
    "DiagonalNormal", "FlowDistribution", "GaussianMixture", "StandardNormal",
    "FlowAsTransform", "TransformAsFlow",
    "check_flow", "exact_logdet", "EstimatorCheckError", "check_estimator", "check_gradient_estimator",
    "attention", "continuous", "derivatives", "jacobian", "lipschitz", "maps", "nets", "reversible", "spectral",
    "splines", "statistical", "transformer",
]
