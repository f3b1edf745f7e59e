"""Shapes and invariants of the disentangled VAE and the change detector."""

from __future__ import annotations

import pytest
import torch

from training.model import (
    ChangeDetector,
    Decoder,
    DisentangledVAE,
    DistanceClassifier,
    Encoder,
    ModelConfig,
    Posterior,
)


def small(channels: int = 3, **kw: object) -> ModelConfig:
    base: dict[str, object] = {
        "in_channels": channels,
        "patch_size": 32,
        "widths": (8, 16),
        "hidden": 32,
        "z_common": 6,
        "z_specific": 5,
        "classifier_hidden": 8,
    }
    return ModelConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("patch", "widths"), [(30, (8, 16)), (32, (4, 4, 4, 4, 4, 4)), (20, (8,) * 3)]
)
def test_patch_not_divisible_is_rejected(patch: int, widths: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(patch_size=patch, widths=widths)


def test_config_normalises_widths_and_round_trips() -> None:
    cfg = ModelConfig(patch_size=24, widths=[8, 16, 32])  # type: ignore[arg-type]
    assert cfg.widths == (8, 16, 32)
    assert cfg.feature_size == 3
    assert ModelConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("channels", [3, 4])
def test_encoder_decoder_vae_shapes(channels: int) -> None:
    torch.manual_seed(0)
    cfg = small(channels)
    x = torch.rand(5, channels, 32, 32)
    q = Encoder(cfg)(x)
    assert isinstance(q, Posterior)
    assert q.mu_c.shape == q.logvar_c.shape == (5, cfg.z_common)
    assert q.mu_s.shape == q.logvar_s.shape == (5, cfg.z_specific)
    rec = Decoder(cfg)(q.mu_c, q.mu_s)
    assert rec.shape == (5, channels, 32, 32)

    vae = DisentangledVAE(cfg)
    for training in (True, False):
        vae.train(training)
        q2, rec2 = vae(x)
        assert q2.mu_c.shape == (5, cfg.z_common)
        assert q2.mu_s.shape == (5, cfg.z_specific)
        assert rec2.shape == (5, channels, 32, 32)


def test_eval_mode_vae_is_deterministic() -> None:
    torch.manual_seed(0)
    vae = DisentangledVAE(small()).eval()
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(vae(x)[1], vae(x)[1])


@pytest.mark.parametrize("channels", [3, 4])
def test_encoder_common_is_posterior_mu_c(channels: int) -> None:
    torch.manual_seed(0)
    enc = Encoder(small(channels)).eval()
    x = torch.rand(4, channels, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.common(x), enc(x).mu_c)


@pytest.mark.parametrize("channels", [3, 4])
def test_change_detector_is_symmetric_and_a_probability(channels: int) -> None:
    torch.manual_seed(0)
    det = ChangeDetector(small(channels)).eval()
    a, b = torch.rand(6, channels, 32, 32), torch.rand(6, channels, 32, 32)
    with torch.no_grad():
        p_ab, p_ba = det(a, b), det(b, a)
        logits = det.logits(a, b)
    assert p_ab.shape == p_ba.shape == logits.shape == (6,)
    assert torch.allclose(p_ab, p_ba, atol=1e-6, rtol=0)
    assert torch.all((p_ab > 0) & (p_ab < 1))
    assert torch.allclose(p_ab, torch.sigmoid(logits))
    # a single pair keeps its batch axis
    assert det(a[:1], b[:1]).shape == (1,)


def test_detector_has_no_decoder() -> None:
    names = {n for n, _ in ChangeDetector(small()).named_parameters()}
    assert names
    assert not any(n.startswith("decoder") for n in names)


def test_distance_classifier_is_monotone_in_the_common_distance_and_symmetric() -> None:
    torch.manual_seed(0)
    head = DistanceClassifier(small())
    a = torch.randn(64, 6)
    near, far = a + 0.1 * torch.randn(64, 6), a + 2.0 * torch.randn(64, 6)
    head.calibrate(a, near)  # unchanged pairs: their mean squared distance becomes 1
    assert torch.allclose(((a - near) ** 2).mean(1).mean() / head.norm, torch.tensor(1.0))
    with torch.no_grad():
        head.log_gain.fill_(1.5)
        head.bias.fill_(-0.3)
    for other in (near, far):
        assert torch.allclose(head(a, other), head(other, a))
    d2 = ((a - far) ** 2).mean(1)
    order = torch.argsort(d2)
    assert (head(a, far)[order].diff() >= 0).all()  # ranked by distance alone, whatever was learned
    same = torch.exp(torch.tensor(1.5)) * torch.log(torch.tensor(1e-6)) - 0.3
    assert head(a, a).allclose(same.expand(64))  # identical features: far below any change
    with torch.no_grad():  # untrained: p = d / (1 + d) of the normalised distance d
        head.log_gain.zero_()
        head.bias.zero_()
    d = ((a - far) ** 2).mean(1) / head.norm
    assert torch.allclose(torch.sigmoid(head(a, far)), d / (1 + d), atol=1e-5)


def test_detector_with_the_distance_head_round_trips_through_its_state() -> None:
    torch.manual_seed(0)
    cfg = small(classifier="distance")
    det = ChangeDetector(cfg)
    assert isinstance(det.classifier, DistanceClassifier)
    det.classifier.calibrate(torch.zeros(2, 6), torch.full((2, 6), 3.0))
    again = ChangeDetector(ModelConfig(**cfg.to_dict()))
    again.load_state_dict(det.state_dict())  # the norm buffer travels with the weights
    x, y = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    assert torch.equal(again.eval()(x, y), det.eval()(x, y))
    assert float(again.classifier.norm) == 9.0
    assert isinstance(ChangeDetector(small()).classifier, type(det.classifier)) is False
