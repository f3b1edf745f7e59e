"""The disentangled VAE of Hamaguchi, Sakurada and Nakamura (CVPR 2019) and its change classifier.

One shared encoder maps an image patch to a diagonal Gaussian posterior over a latent split in two:
common features z_c (the content of the place) and specific features z_s (trivial signals such as
illumination, season, blur). The decoder reconstructs the patch from (z_c, z_s). After
pre-training on unchanged pairs, a classifier on the common means of both dates says whether
the pair changed.

Read top to bottom: config, encoder, decoder, VAE, classifier, and the detector that export
turns into ONNX.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ModelConfig:
    in_channels: int = 3
    patch_size: int = 32
    widths: tuple[int, ...] = (32, 64)  # one 4x4 stride-2 convolution per entry
    hidden: int = 256
    z_common: int = 16
    z_specific: int = 16
    classifier_hidden: int = 64
    # "mlp": the paper's classifier on both dates' common features; "distance": two parameters on
    # their squared distance, for a handful of labels (DistanceClassifier says why)
    classifier: Literal["mlp", "distance"] = "mlp"
    likelihood: Literal["gaussian", "bernoulli"] = "gaussian"

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        down = 2 ** len(self.widths)
        if self.patch_size % down:
            raise ValueError(
                f"patch_size {self.patch_size} must be divisible by 2**len(widths) = {down}"
            )

    @property
    def feature_size(self) -> int:
        return self.patch_size // 2 ** len(self.widths)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Posterior:
    """q(z|x) split into its common and specific parts; all (B, z_*)."""

    mu_c: torch.Tensor
    logvar_c: torch.Tensor
    mu_s: torch.Tensor
    logvar_s: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for c_out in cfg.widths:
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        flat = c_in * cfg.feature_size**2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, cfg.hidden), nn.LeakyReLU(0.2))
        self.to_c = nn.Linear(cfg.hidden, 2 * cfg.z_common)  # mean and log-variance of z_c
        self.to_s = nn.Linear(cfg.hidden, 2 * cfg.z_specific)  # mean and log-variance of z_s

    def forward(self, x: torch.Tensor) -> Posterior:
        h = self.fc(self.conv(x))  # (B, hidden)
        mu_c, logvar_c = self.to_c(h).chunk(2, dim=1)  # (B, z_common) each
        mu_s, logvar_s = self.to_s(h).chunk(2, dim=1)  # (B, z_specific) each
        return Posterior(mu_c, logvar_c.clamp(-10, 10), mu_s, logvar_s.clamp(-10, 10))

    def common(self, x: torch.Tensor) -> torch.Tensor:
        """The common-feature means alone: all the classifier and the exported model need."""
        h = self.fc(self.conv(x))
        return self.to_c(h)[:, : self.to_c.out_features // 2]  # (B, z_common)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c0 = cfg.widths[-1]
        self.fc = nn.Sequential(
            nn.Linear(cfg.z_common + cfg.z_specific, cfg.hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(cfg.hidden, c0 * cfg.feature_size**2),
            nn.LeakyReLU(0.2),
        )
        layers: list[nn.Module] = []
        widths = list(reversed(cfg.widths))
        for c_in, c_out in zip(widths, [*widths[1:], cfg.in_channels], strict=True):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            layers.append(nn.LeakyReLU(0.2))
        self.deconv = nn.Sequential(*layers[:-1])  # the last layer outputs logits / means

    def forward(self, z_c: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z_c, z_s], dim=1))  # (B, c0 * f * f)
        f = self.cfg.feature_size
        h = h.view(-1, self.cfg.widths[-1], f, f)  # (B, c0, f, f)
        return self.deconv(h)  # (B, C, P, P), logits (bernoulli) or pre-sigmoid means (gaussian)


class DisentangledVAE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor) -> tuple[Posterior, torch.Tensor]:
        """Encode, sample (reparameterisation trick), decode: (posterior, reconstruction logits)."""
        q = self.encoder(x)
        z_c = reparameterise(q.mu_c, q.logvar_c) if self.training else q.mu_c
        z_s = reparameterise(q.mu_s, q.logvar_s) if self.training else q.mu_s
        return q, self.decoder(z_c, z_s)


def reparameterise(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


class ChangeClassifier(nn.Module):
    """C([mu_c_A, mu_c_B, |mu_c_A - mu_c_B|]) -> logit that the pair changed.

    The paper feeds the concatenated common features; the absolute difference is added because it
    makes "same place, same content" linearly visible (shared/notes/method-findings.md).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3 * cfg.z_common, cfg.classifier_hidden),
            nn.ReLU(),
            nn.Linear(cfg.classifier_hidden, 1),
        )

    def forward(self, mu_c_a: torch.Tensor, mu_c_b: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([mu_c_a, mu_c_b, (mu_c_a - mu_c_b).abs()], dim=1)  # (B, 3 z_common)
        return self.net(feats).squeeze(1)  # (B,)


class DistanceClassifier(nn.Module):
    """logit = gain * log(mean_k (mu_c_A,k - mu_c_B,k)^2 / norm) + bias, gain > 0.

    Pre-training alone makes the distance between the two dates' common features a change score:
    with no label at all it ranks held-out SZTAKI patches at AUROC 0.57-0.96 (median 0.85), while
    the MLP fitted on 5 positives ranked held-out pairs below chance (pixel AUROC 0.48 over eight
    folds, docs/results/study-aerial-rgb.md). Monotone in that distance, the labels here only set
    the slope and the offset: the ranking cannot be learned wrong from five examples.
    ``norm`` is the mean squared distance of unchanged pairs, set by :meth:`calibrate`; untrained
    (gain 1, bias 0) the probability is d / (1 + d) of that normalised distance d, a fixed scale
    that every fold shares, so a threshold chosen on some folds means the same on another.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("norm", torch.ones(()))
        self.log_gain = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def calibrate(self, mu_c_a: torch.Tensor, mu_c_b: torch.Tensor) -> None:
        """Scale distances by the mean over unchanged pairs, so one init suits every encoder."""
        self.norm.fill_(float(((mu_c_a - mu_c_b) ** 2).mean()) + 1e-12)

    def forward(self, mu_c_a: torch.Tensor, mu_c_b: torch.Tensor) -> torch.Tensor:
        d = ((mu_c_a - mu_c_b) ** 2).mean(1) / self.norm  # (B,), 1 = a typical unchanged pair
        return torch.exp(self.log_gain) * torch.log(d + 1e-6) + self.bias


class ChangeDetector(nn.Module):
    """Encoder + classifier: the part that is exported and served (no decoder).

    The logit is averaged over both orders of the pair, so that "before vs after" and "after vs
    before" get the same probability: a change is a change whichever date is first.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.classifier: ChangeClassifier | DistanceClassifier = (
            DistanceClassifier(cfg) if cfg.classifier == "distance" else ChangeClassifier(cfg)
        )

    def logits(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        mu_a = self.encoder.common(before)  # (B, z_common)
        mu_b = self.encoder.common(after)  # (B, z_common)
        return 0.5 * (self.classifier(mu_a, mu_b) + self.classifier(mu_b, mu_a))  # (B,)

    def forward(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """Inputs scaled to [0, 1], (B, C, P, P) each; returns the change probability (B,)."""
        return torch.sigmoid(self.logits(before, after))


def bce_change_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels.float())
