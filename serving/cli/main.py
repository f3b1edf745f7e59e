"""`rarechange`: train, export, serve, detect, score, evaluate, demo."""

from __future__ import annotations

import logging

import click

from serving import __version__
from serving.cli.argv import RecordingGroup
from serving.cli.demo import demo
from serving.cli.detect import detect
from serving.cli.evaluate import evaluate
from serving.cli.experiment import experiment
from serving.cli.export import export
from serving.cli.score import score
from serving.cli.serve import serve
from serving.cli.train import train


@click.group(cls=RecordingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rarechange")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Detect rare real changes in pairs of images of the same place.

    Train a disentangled VAE on unchanged pairs and a few labelled changes, export it to ONNX,
    serve it over gRPC, and score image pairs or whole GeoTIFF scenes.
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for command in (train, export, serve, detect, score, evaluate, demo, experiment):
    cli.add_command(command)

if __name__ == "__main__":
    cli()
