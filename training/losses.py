"""Losses of the disentangled VAE, as small pure functions tested against hand-computed values.

All take diagonal-Gaussian parameters (mean, log-variance) of shape (B, D) and return one value per
sample, shape (B,), unless they are batch statistics (the activation losses), which return a scalar.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn import functional as F

Similarity = Literal["jeffrey", "mahalanobis", "l1", "l2", "none"]
Activation = Literal["spread", "sparsity", "inv_max", "none"]
Likelihood = Literal["gaussian", "bernoulli"]

GAUSSIAN_SIGMA = 0.1  # fixed decoder std for the gaussian likelihood, in [0, 1] pixel units


def reconstruction_nll(
    logits: torch.Tensor, x: torch.Tensor, likelihood: Likelihood
) -> torch.Tensor:
    """-log p(x|z) per sample, up to a constant; x in [0, 1], (B, C, H, W)."""
    match likelihood:
        case "bernoulli":
            nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        case "gaussian":
            nll = (torch.sigmoid(logits) - x) ** 2 / (2 * GAUSSIAN_SIGMA**2)
        case _:
            raise ValueError(f"unknown likelihood {likelihood!r}")
    return nll.flatten(1).sum(1)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample."""
    return 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).sum(1)


def jeffrey_divergence(
    mu1: torch.Tensor, logvar1: torch.Tensor, mu2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(q1||q2) + KL(q2||q1) for diagonal Gaussians: the paper's recommended similarity loss."""
    v1, v2 = logvar1.exp(), logvar2.exp()
    d2 = (mu1 - mu2) ** 2
    return 0.5 * (v1 / v2 + v2 / v1 - 2.0 + d2 * (1.0 / v1 + 1.0 / v2)).sum(1)


def mahalanobis_distance(
    mu1: torch.Tensor, logvar1: torch.Tensor, mu2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Squared distance of the means under the pooled (average) covariance of the two posteriors."""
    pooled = 0.5 * (logvar1.exp() + logvar2.exp())
    return ((mu1 - mu2) ** 2 / pooled).sum(1)


def similarity_loss(
    kind: Similarity,
    mu1: torch.Tensor,
    logvar1: torch.Tensor,
    mu2: torch.Tensor,
    logvar2: torch.Tensor,
) -> torch.Tensor:
    """Pull the common posteriors of an unchanged pair together; per sample."""
    match kind:
        case "jeffrey":
            return jeffrey_divergence(mu1, logvar1, mu2, logvar2)
        case "mahalanobis":
            return mahalanobis_distance(mu1, logvar1, mu2, logvar2)
        case "l1":
            return (mu1 - mu2).abs().sum(1)
        case "l2":
            return ((mu1 - mu2) ** 2).sum(1)
        case "none":
            return torch.zeros(mu1.shape[0], device=mu1.device)
    raise ValueError(f"unknown similarity loss {kind!r}")


def spread_loss(mu_c: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Mean over common units of 1 / (std over the batch + eps).

    Unlike a per-sample term, this cannot be met by moving every mu_c to one constant point, the
    collapse that makes the similarity loss trivially zero (shared/notes/method-findings.md).
    """
    return (1.0 / (mu_c.std(dim=0) + eps)).mean()


def sparsity_loss(mu_c: torch.Tensor, target: float = 0.05, eps: float = 1e-4) -> torch.Tensor:
    """The paper's batch sparsity: -(1/D) sum_i [s log m_i + (1 - s) log(1 - m_i)] + its minimum.

    m_i is the batch activation of common unit i, the batch mean of tanh|mu_i| kept in (0, 1). The
    constant makes the loss zero exactly where every m_i equals s, and positive elsewhere.
    """
    m = torch.tanh(mu_c.abs()).mean(0).clamp(eps, 1 - eps)  # (D,)
    s = target
    cross = s * torch.log(m) + (1 - s) * torch.log(1 - m)
    best = s * torch.log(torch.tensor(s)) + (1 - s) * torch.log(torch.tensor(1 - s))
    return (best - cross).mean()


def inv_max_loss(mu_c: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """(1/B) sum_k (max_i |mu_i^k|)^-1: at least one common unit active for every sample."""
    return (1.0 / (mu_c.abs().amax(dim=1) + eps)).mean()


def activation_loss(
    kind: Activation, mu_c: torch.Tensor, sparsity_target: float = 0.05
) -> torch.Tensor:
    match kind:
        case "spread":
            return spread_loss(mu_c)
        case "sparsity":
            return sparsity_loss(mu_c, sparsity_target)
        case "inv_max":
            return inv_max_loss(mu_c)
        case "none":
            return torch.zeros((), device=mu_c.device)
    raise ValueError(f"unknown activation loss {kind!r}")
