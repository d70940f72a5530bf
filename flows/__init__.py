"""jacflow's invertible-layer library: every layer returns ``(output, log|det J|)``.

``forward`` maps data to latent (the density direction); ``inverse`` maps back.
"""

from flows import jacobian, nets, splines

# The contract
from flows.base import Flow, Inverse, InverseFlow, InverseNotAvailable, Sequential

# Coupling layers
from flows.coupling import AdditiveCoupling, AffineCoupling, Coupling, RQSplineCoupling

# Autoregressive flows
from flows.autoregressive import MADE, Autoregressive, MaskedAffineAutoregressive, RQSplineAutoregressive

# Normalisation
from flows.normalization import ActNorm

# Linear maps and permutations
from flows.linear import InvConv1x1, Permutation, Reverse

# Elementwise preprocessing
from flows.elementwise import Logit, ScalarAffine

# Reshaping and multi-scale
from flows.reshape import Flatten, Split, Squeeze

# Densities
from flows.distributions import FlowDistribution, StandardNormal

# The oracle
from flows.jacobian import check_flow, exact_logdet

__all__ = [
    "Flow", "Inverse", "InverseFlow", "InverseNotAvailable", "Sequential",
    "AdditiveCoupling", "AffineCoupling", "Coupling", "RQSplineCoupling",
    "MADE", "Autoregressive", "MaskedAffineAutoregressive", "RQSplineAutoregressive",
    "ActNorm",
    "InvConv1x1", "Permutation", "Reverse",
    "Logit", "ScalarAffine",
    "Flatten", "Split", "Squeeze",
    "FlowDistribution", "StandardNormal",
    "check_flow", "exact_logdet", "jacobian", "nets", "splines",
]
