"""jacflow's invertible-layer library: every layer returns ``(output, log|det J|)``.

``forward`` maps data to latent (the density direction); ``inverse`` maps back.
"""

from flows import derivatives, jacobian, maps, nets, splines

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

# Free-form Jacobians: log-det modes (exact / estimate / gradient)
from flows.freeform import FreeFormFlow, logdet_is_exact, logdet_is_likelihood, logdet_mode

# Densities (torch distributions) and interop with torch.distributions
from flows.bases import DiagonalNormal, GaussianMixture, StandardNormal
from flows.distributions import FlowDistribution
from flows.interop import FlowAsTransform, TransformAsFlow

# The oracle
from flows.jacobian import check_flow, exact_logdet

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
    "FreeFormFlow", "logdet_is_exact", "logdet_is_likelihood", "logdet_mode",
    "DiagonalNormal", "FlowDistribution", "GaussianMixture", "StandardNormal",
    "FlowAsTransform", "TransformAsFlow",
    "check_flow", "exact_logdet", "derivatives", "jacobian", "maps", "nets", "splines",
]
