"""The losses against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from training import losses
from training.losses import (
    GAUSSIAN_SIGMA,
    activation_loss,
    inv_max_loss,
    jeffrey_divergence,
    kl_to_standard_normal,
    mahalanobis_distance,
    reconstruction_nll,
    similarity_loss,
    sparsity_loss,
    spread_loss,
)


def t(*rows: list[float] | float) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- reconstruction


def test_gaussian_nll_uses_fixed_sigma() -> None:
    # sigmoid(0) = 0.5: sample 0 is off by 0.2 on each of its 4 pixels, sample 1 is exact
    logits = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    x = torch.stack([torch.full((1, 2, 2), 0.3), torch.full((1, 2, 2), 0.5)]).double()
    nll = reconstruction_nll(logits, x, "gaussian")
    per_pixel = 0.2**2 / (2 * GAUSSIAN_SIGMA**2)
    assert nll.shape == (2,)
    assert nll[0].item() == pytest.approx(4 * per_pixel)
    assert nll[1].item() == pytest.approx(0.0, abs=1e-12)


def test_bernoulli_nll_is_summed_bce_with_logits() -> None:
    logits = t([[[0.0, math.log(3.0)], [-1.0, 2.0]]]).unsqueeze(0)  # (1, 1, 2, 2)
    x = t([[[1.0, 1.0], [0.0, 0.25]]]).unsqueeze(0)

    def bce(logit: float, target: float) -> float:
        p = 1 / (1 + math.exp(-logit))
        return -(target * math.log(p) + (1 - target) * math.log(1 - p))

    expected = bce(0.0, 1.0) + bce(math.log(3.0), 1.0) + bce(-1.0, 0.0) + bce(2.0, 0.25)
    # by hand: log 2 + log(4/3) + log(1 + e^-1) + ...
    assert bce(0.0, 1.0) == pytest.approx(math.log(2.0))
    assert bce(math.log(3.0), 1.0) == pytest.approx(math.log(4.0 / 3.0))
    nll = reconstruction_nll(logits, x, "bernoulli")
    assert nll.shape == (1,)
    assert nll.item() == pytest.approx(expected)


# --------------------------------------------------------------------------- KL to the prior


def test_kl_is_zero_at_the_prior() -> None:
    zeros = torch.zeros(3, 5)
    assert torch.equal(kl_to_standard_normal(zeros, zeros), torch.zeros(3))


def test_kl_hand_value() -> None:
    # dim 0: mu=1, var=1 -> 0.5 * (1 + 1 - 1 - 0) = 0.5
    # dim 1: mu=0, var=2 -> 0.5 * (0 + 2 - 1 - ln 2)
    mu = t([1.0, 0.0])
    logvar = t([0.0, math.log(2.0)])
    expected = 0.5 + 0.5 * (1.0 - math.log(2.0))
    assert kl_to_standard_normal(mu, logvar).item() == pytest.approx(expected)


# --------------------------------------------------------------------------- similarity


def test_jeffrey_zero_for_identical_gaussians() -> None:
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.allclose(jeffrey_divergence(mu, logvar, mu, logvar), torch.zeros(4), atol=1e-6)


def test_jeffrey_is_symmetric_and_the_sum_of_both_kls() -> None:
    gen = torch.Generator().manual_seed(0)
    mu1, lv1, mu2, lv2 = (torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(4))
    j12 = jeffrey_divergence(mu1, lv1, mu2, lv2)
    j21 = jeffrey_divergence(mu2, lv2, mu1, lv1)
    assert torch.allclose(j12, j21)
    n = torch.distributions.Normal
    q1, q2 = n(mu1, (0.5 * lv1).exp()), n(mu2, (0.5 * lv2).exp())
    both = torch.distributions.kl_divergence(q1, q2) + torch.distributions.kl_divergence(q2, q1)
    assert torch.allclose(j12, both.sum(1))


def test_jeffrey_1d_hand_value() -> None:
    # N(0, 1) vs N(1, 2): 0.5 * (1/2 + 2 - 2 + 1 * (1 + 1/2)) = 1
    got = jeffrey_divergence(t([0.0]), t([0.0]), t([1.0]), t([math.log(2.0)]))
    assert got.item() == pytest.approx(1.0)


def test_mahalanobis_hand_value() -> None:
    # diff 2 under pooled variance (1 + 3) / 2 = 2 -> 4 / 2 = 2; second dim equal means -> 0
    got = mahalanobis_distance(t([0.0, 5.0]), t([0.0, 0.0]), t([2.0, 5.0]), t([math.log(3.0), 0.0]))
    assert got.item() == pytest.approx(2.0)


def test_similarity_loss_dispatch() -> None:
    mu1, lv1 = t([0.0, 1.0], [1.0, 1.0]), t([0.0, 0.5], [0.1, -0.2])
    mu2, lv2 = t([1.0, -1.0], [1.0, 1.0]), t([0.3, 0.0], [0.1, -0.2])
    args = (mu1, lv1, mu2, lv2)
    assert torch.equal(similarity_loss("jeffrey", *args), jeffrey_divergence(*args))
    assert torch.equal(similarity_loss("mahalanobis", *args), mahalanobis_distance(*args))
    assert torch.allclose(similarity_loss("l1", *args), t(3.0, 0.0))
    assert torch.allclose(similarity_loss("l2", *args), t(5.0, 0.0))
    none = similarity_loss("none", *args)
    assert none.shape == (2,)
    assert torch.equal(none, torch.zeros(2))


def test_similarity_loss_unknown_kind() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="bogus"):
        similarity_loss("bogus", x, x, x, x)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- activation


def test_spread_loss_cannot_be_met_by_a_constant() -> None:
    eps = 0.1
    constant = torch.full((8, 4), 0.7)
    assert spread_loss(constant, eps).item() == pytest.approx(1 / eps)
    # unit 0: {-1, 1} (unbiased std sqrt 2); unit 1: {0, 0} (std 0)
    spread = t([-1.0, 0.0], [1.0, 0.0])
    expected = 0.5 * (1 / (math.sqrt(2.0) + eps) + 1 / eps)
    assert spread_loss(spread, eps).item() == pytest.approx(expected)
    assert spread_loss(torch.randn(8, 4), eps) < spread_loss(constant, eps)


def test_sparsity_loss_zero_exactly_at_the_target() -> None:
    target = 0.05
    # every unit's batch mean of tanh|mu| is the target: unit 0 constant, unit 1 spread (0, 2s)
    mu = t(
        [math.atanh(target), 0.0],
        [-math.atanh(target), -math.atanh(2 * target)],
        [math.atanh(target), math.atanh(2 * target)],
        [math.atanh(target), 0.0],
    )
    assert torch.tanh(mu.abs()).mean(0) == pytest.approx([target, target])
    assert sparsity_loss(mu, target).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("scale", [0.0, 0.01, 0.5, 3.0])
def test_sparsity_loss_positive_off_target(scale: float) -> None:
    mu = torch.full((4, 3), scale)
    assert sparsity_loss(mu, 0.05).item() > 1e-4


def test_sparsity_loss_hand_value() -> None:
    # one unit with batch activation 0.5: s log s + (1 - s) log(1 - s) - log 0.5
    s = 0.2
    mu = t([math.atanh(0.5)])
    expected = s * math.log(s) + (1 - s) * math.log(1 - s) - math.log(0.5)
    assert sparsity_loss(mu, s).item() == pytest.approx(expected, rel=1e-5)


def test_inv_max_loss_hand_value() -> None:
    mu = t([1.0, -2.0], [0.5, 0.25])  # per-sample max |mu|: 2, 0.5
    eps = 1e-3
    expected = 0.5 * (1 / (2 + eps) + 1 / (0.5 + eps))
    assert inv_max_loss(mu, eps).item() == pytest.approx(expected)


def test_activation_loss_dispatch() -> None:
    mu = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(activation_loss("spread", mu), spread_loss(mu))
    assert torch.equal(activation_loss("sparsity", mu, 0.2), sparsity_loss(mu, 0.2))
    assert not torch.equal(activation_loss("sparsity", mu, 0.2), sparsity_loss(mu, 0.05))
    assert torch.equal(activation_loss("inv_max", mu), inv_max_loss(mu))
    none = activation_loss("none", mu)
    assert none.shape == ()
    assert none.item() == 0.0
    with pytest.raises(ValueError, match="bogus"):
        activation_loss("bogus", mu)  # type: ignore[arg-type]


def test_every_declared_kind_is_handled() -> None:
    x = torch.randn(3, 2)
    for kind in losses.Similarity.__args__:
        assert similarity_loss(kind, x, x, x, x).shape == (3,)
    for kind in losses.Activation.__args__:
        assert activation_loss(kind, x).shape == ()


@pytest.mark.parametrize("kind", ["spread", "sparsity", "inv_max"])
def test_activation_gradients_are_finite_even_at_collapse(kind: str) -> None:
    """At the collapse point (every mu_c zero) the gradient must still be finite."""
    for mu in (torch.zeros(8, 4), torch.randn(8, 4)):
        mu = mu.clone().requires_grad_(True)
        losses.activation_loss(kind, mu).backward()
        assert torch.isfinite(mu.grad).all(), (kind, mu.grad)


@pytest.mark.parametrize("kind", ["jeffrey", "mahalanobis", "l1", "l2"])
def test_similarity_gradients_are_finite(kind: str) -> None:
    mu1, lv1, mu2, lv2 = (torch.randn(5, 3, requires_grad=True) for _ in range(4))
    losses.similarity_loss(kind, mu1, lv1, mu2, lv2).sum().backward()
    for t in (mu1, lv1, mu2, lv2):
        assert t.grad is None or torch.isfinite(t.grad).all()
