"""The oracle itself: exact Jacobians, and deliberately wrong flows it must catch."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import flows
from flows.base import Flow, zero_logdet
from flows.jacobian import FlowCheckError, batch_jacobian, check_flow, exact_logdet, jacobian
from flows.nets import MLP, GlowConvNet
from tests.registry import perturb


class ShiftedLogdet(flows.ActNorm):
    """ActNorm whose logdet is off by a constant."""

    def forward(self, x, context=None):
        y, logdet = super().forward(x, context)
        return y, logdet + 0.01


class NoSpatialFactor(flows.ActNorm):
    """ActNorm that forgets to multiply by H*W."""

    def _logdet(self, x):
        return self.log_scale.sum().expand(x.shape[0])


class WrongSign(flows.InvConv1x1):
    """1x1 conv reporting -log|det W|."""

    def forward(self, x, context=None):
        y, logdet = super().forward(x, context)
        return y, -logdet


class LeakyMask(flows.AffineCoupling):
    """Affine coupling whose conditioner also sees the part it transforms.

    Its logdet is still the sum of log-scales, which is wrong once the Jacobian is no
    longer triangular; and its declared structure no longer holds."""

    def forward(self, x, context=None):
        self._leak = x[:, self._transformed][:, :1]  # the first transformed feature
        return super().forward(x, context)

    def _params(self, conditioner_input, context):
        return super()._params(conditioner_input + self._leak, context)


class MixesSamples(Flow):
    """Adds a bit of the batch mean: each sample's output depends on the others."""

    def forward(self, x, context=None):
        return x + 0.1 * x.mean(0, keepdim=True), zero_logdet(x) + x[0].numel() * torch.log1p(torch.tensor(0.1 / x.shape[0]))

    def inverse(self, y, context=None):
        mean = y.mean(0, keepdim=True) / 1.1
        return y - 0.1 * mean, -self.forward(y)[1]


class BadInverse(flows.Reverse):
    """An inverse that does not undo the forward."""

    def inverse(self, y, context=None):
        return y + 1e-3, zero_logdet(y)


class BadInverseLogdet(flows.ActNorm):
    """Inverse logdet with the wrong sign."""

    def inverse(self, y, context=None):
        x, logdet = super().inverse(y, context)
        return x, -logdet


def prepared(flow: Flow) -> Flow:
    flow = flow.double()
    perturb(flow)
    return flow


WRONG = {
    "logdet-off-by-constant": (lambda: ShiftedLogdet(3), (3,), "logdet is wrong"),
    "missing-spatial-factor": (lambda: NoSpatialFactor(2), (2, 3, 3), "logdet is wrong"),
    "wrong-sign": (lambda: WrongSign(3), (3, 2, 2), "logdet is wrong"),
    "leaky-mask": (lambda: LeakyMask(4, partial(MLP, hidden_features=8)), (4,), "structure violated"),
    "mixes-samples": (lambda: MixesSamples(), (3,), "samples interact"),
    "bad-inverse": (lambda: BadInverse(), (3,), r"inverse\(forward\(x\)\) != x"),
    "bad-inverse-logdet": (lambda: BadInverseLogdet(3), (3,), "inverse logdet is not minus"),
}


@pytest.mark.parametrize("name", sorted(WRONG))
def test_oracle_catches_wrong_flow(name: str) -> None:
    make, shape, message = WRONG[name]
    flow = prepared(make())
    x = torch.randn(3, *shape)
    with pytest.raises(FlowCheckError, match=message):
        check_flow(flow, x)


def test_leaky_mask_is_also_a_wrong_logdet() -> None:
    """Without the declared structure, the leak still shows up as a wrong logdet."""
    flow = prepared(LeakyMask(4, partial(MLP, hidden_features=8)))
    flow.jacobian_mask = lambda shape: None
    with pytest.raises(FlowCheckError, match="logdet is wrong"):
        check_flow(flow, torch.randn(3, 4))


def test_logdet_of_wrong_shape_is_reported() -> None:
    class ScalarLogdet(flows.Reverse):
        def forward(self, x, context=None):
            return x.flip(1), torch.zeros(())

    with pytest.raises(FlowCheckError, match=r"logdet must have shape \(batch,\) = \(2,\), got \(\)"):
        check_flow(ScalarLogdet(), torch.randn(2, 3))


def test_failure_message_says_by_how_much() -> None:
    with pytest.raises(FlowCheckError, match=r"difference 1\.000e-02"):
        check_flow(prepared(ShiftedLogdet(3)), torch.randn(2, 3))


def test_vmap_jacobian_matches_the_full_batch_jacobian() -> None:
    flow = prepared(flows.Sequential(flows.ActNorm(3), flows.AffineCoupling(3, partial(GlowConvNet, hidden_features=4))))
    x = torch.randn(2, 3, 2, 2)
    flow(x)
    per_sample = jacobian(flow, x)
    full = batch_jacobian(flow, x)
    assert per_sample.shape == (2, 12, 12)
    for b in range(2):
        torch.testing.assert_close(per_sample[b], full[b, :, b, :], rtol=1e-12, atol=1e-12)


def test_fallback_for_flows_that_cannot_be_vmapped() -> None:
    class DataDependentBranch(flows.Reverse):
        """Python control flow on tensor values: vmap cannot trace it."""

        def forward(self, x, context=None):
            scale = 2.0 if bool(x.sum() > -1e9) else 3.0
            return x.flip(1) * scale, zero_logdet(x) + x[0].numel() * torch.log(torch.tensor(scale))

    flow = DataDependentBranch()
    x = torch.randn(3, 4)
    jac = jacobian(flow, x)
    expected = torch.eye(4).flip(1) * 2.0
    torch.testing.assert_close(jac, expected.expand(3, 4, 4), rtol=0, atol=0)
    torch.testing.assert_close(exact_logdet(flow, x), torch.full((3,), 4 * torch.log(torch.tensor(2.0)).item()))


def test_exact_logdet_of_a_known_linear_map() -> None:
    conv = flows.InvConv1x1(3, lu=False).double()
    x = torch.randn(2, 3, 2, 2)
    expected = 4 * torch.linalg.slogdet(conv.weight)[1]
    torch.testing.assert_close(exact_logdet(conv, x), expected.detach().expand(2), rtol=1e-12, atol=1e-12)


def test_check_flow_returns_the_errors_it_measured() -> None:
    report = check_flow(prepared(flows.ActNorm(2)), torch.randn(3, 2, 2, 2))
    assert set(report) >= {"logdet", "round_trip", "inverse_logdet", "cross_sample", "structure"}
    assert all(v < 1e-10 for v in report.values())


class ForwardOnly(flows.ActNorm):
    """A correct layer without an inverse."""

    def inverse(self, y, context=None):
        raise flows.InverseNotAvailable("ForwardOnly has no closed-form inverse")


def test_a_flow_without_inverse_fails_unless_the_inverse_is_waived() -> None:
    flow = prepared(ForwardOnly(3))
    x = torch.randn(3, 3)
    with pytest.raises(FlowCheckError, match=r"inverse is not available .*pass require_inverse=False"):
        check_flow(flow, x)
    report = check_flow(flow, x, require_inverse=False)
    assert report["logdet"] < 1e-12 and report["inverse"] != report["inverse"]  # nan: not checked
