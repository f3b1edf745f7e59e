"""The thin path end to end: train on generated pairs -> ONNX -> real gRPC server -> mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.client import ChangeDetectionClient
from serving.quality import binary_scores
from training.synthetic import NuisanceConfig, SceneConfig, plant_change, render_pair

# scenes the model never saw: training uses seeds 0..59, validation 1_000_000..
TEST_SEEDS = (500, 501, 502)
STRONG = NuisanceConfig(strength=1.5)


def unchanged_scene(seed: int):
    return render_pair(seed, SceneConfig(height=512, width=512, n_changes=0, nuisance=STRONG))


@pytest.mark.slow
def test_planted_change_is_found_and_nuisances_are_not(thin_models_dir: Path, start_server) -> None:
    server = start_server(thin_models_dir)
    ious, nuisance_fractions = [], []
    with ChangeDetectionClient(server.address) as client:
        for seed in TEST_SEEDS:
            base = unchanged_scene(seed)
            quiet = client.detect(base.before, base.after)
            nuisance_fractions.append(quiet.response.changed_fraction)

            planted = plant_change(base, (200, 220, 248, 268), seed=seed, kind="build")
            result = client.detect(planted.before, planted.after)
            assert result.mask.shape == (512, 512)
            ious.append(binary_scores(result.mask, planted.mask > 0)["iou"])
            # the map peaks where the change was planted
            inside = result.probability[planted.mask > 0].mean()
            outside = result.probability[planted.mask == 0].mean()
            assert inside > 0.5 > 0.05 > outside, (inside, outside)
    assert np.mean(ious) > 0.5, f"IoU per scene {ious}"
    assert max(nuisance_fractions) < 0.01, (
        f"changed fraction on unchanged pairs {nuisance_fractions}"
    )
