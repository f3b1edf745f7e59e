"""`rarechange demo`: start the server on the bundled model, detect changes on a sample pair."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    import numpy as np


def sample_pair() -> tuple[str, bytes, bytes, np.ndarray | None]:
    """A real SZTAKI AirChange pair when the shared data is there, else a generated one."""
    import numpy as np

    from serving.config import shared_data_dir

    data = shared_data_dir()
    pair_dir = data / "sztaki" / "Szada" / "1" if data else None
    if pair_dir and (pair_dir / "im1.png").is_file():
        from PIL import Image

        gt = np.asarray(Image.open(pair_dir / "gt.png").convert("L")) > 127
        return (
            f"SZTAKI AirChange {pair_dir}",
            (pair_dir / "im1.png").read_bytes(),
            (pair_dir / "im2.png").read_bytes(),
            gt,
        )
    from serving.pictures import encode_png
    from training.synthetic import SceneConfig, render_pair

    pair = render_pair(20261129, SceneConfig(height=512, width=512, n_changes=4))
    return (
        "generated scene pair (training/synthetic.py, seed 20261129)",
        encode_png(pair.before),
        encode_png(pair.after),
        pair.mask.astype(bool),
    )


@click.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("out"),
    show_default=True,
)
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of <name>/model.onnx (default: the bundled models).",
)
def demo(out: Path, models_dir: Path | None) -> None:
    """Serve the bundled model on a free local port, send a sample pair, write out/*.png, stop."""
    from serving.cli.detect import summary, write_outputs
    from serving.client import ChangeDetectionClient
    from serving.config import ServerSettings
    from serving.decode import decode_image
    from serving.errors import RareChangeError
    from serving.quality import binary_scores
    from serving.server import create_server

    settings = ServerSettings(
        port=0, metrics_port=-1, **({"models_dir": models_dir} if models_dir else {})
    )
    try:
        server = create_server(settings).start()
    except RareChangeError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        name, before, after, truth = sample_pair()
        click.echo(f"server on {server.address}; pair: {name}")
        with ChangeDetectionClient(server.address) as client:
            client.wait_ready()
            result = client.detect(before, after)
        b = decode_image(before, max_pixels=1 << 31)
        a = decode_image(after, max_pixels=1 << 31)
        for path in write_outputs(out, b, a, result).values():
            click.echo(f"wrote {path}")
        info = summary(result)
        if truth is not None:
            scores = binary_scores(result.mask, truth)
            info["vs_ground_truth"] = {
                k: round(scores[k], 3) for k in ("precision", "recall", "f1", "iou")
            }
        click.echo(json.dumps(info, indent=1))
    finally:
        server.stop(grace=1.0)
