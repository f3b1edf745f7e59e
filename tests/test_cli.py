"""The one console script: every subcommand has help, heavy imports wait for the subcommand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from serving import __version__
from serving.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("train", "export", "serve", "detect", "score", "evaluate", "demo")


def test_help_lists_every_subcommand() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name: str) -> None:
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys; from serving.cli.main import cli; "
        "heavy = [m for m in ('torch', 'onnxruntime', 'grpc', 'rasterio', 'numpy', 'onnx') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_score_fails_clearly_on_a_file_that_is_not_a_raster(tmp_path: Path) -> None:
    tif = tmp_path / "a.tif"
    tif.write_bytes(b"x")
    result = CliRunner().invoke(cli, ["score", str(tif), str(tif), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "cannot read the before image" in result.output
    assert not (tmp_path / "o" / "summary.json").exists()


def test_serve_refuses_an_empty_models_dir(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--models-dir", str(tmp_path), "--port", "0"])
    assert result.exit_code == 1
    assert "no models" in result.output


@pytest.mark.slow
def test_train_export_serve_detect_from_the_command_line(tmp_path: Path) -> None:
    """The CLI path a user takes: train (briefly), export, serve in a process, detect."""
    pytest.importorskip("torch")
    from serving.pictures import encode_png
    from training.synthetic import SceneConfig, render_pair

    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(
        cli,
        [
            "train",
            "--preset",
            "thin",
            "--out",
            str(run),
            "--set",
            "train.pretrain_steps=5",
            "--set",
            "train.finetune_steps=5",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (run / "checkpoint.pt").is_file() and (run / "metrics.json").is_file()
    models = tmp_path / "models"
    triton = tmp_path / "triton"
    result = runner.invoke(
        cli,
        [
            "export",
            str(run),
            "--out",
            str(models / "cli-model"),
            "--int8",
            "--fp16",
            # a 5-step model is near chance: this run checks the path, test_variants the margin
            "--max-accuracy-loss",
            "100",
            "--triton-repo",
            str(triton),
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("cli-model", "cli-model-int8", "cli-model-fp16"):
        assert (models / name / "model.onnx").is_file() and (models / name / "README.md").is_file()
    card = (models / "cli-model" / "README.md").read_text()
    assert "## Reduced-precision variants" in card and "| int8 |" in card
    assert f"rarechange train --preset thin --out {run}" in card  # how it was produced
    assert "rarechange export" in card and "--int8" in card
    assert (triton / "cli-model" / "config.pbtxt").is_file()
    assert (triton / "cli-model" / "1" / "model.onnx").read_bytes() == (
        models / "cli-model" / "model.onnx"
    ).read_bytes()

    pair = render_pair(11, SceneConfig(height=80, width=100))
    (tmp_path / "b.png").write_bytes(encode_png(pair.before))
    (tmp_path / "a.png").write_bytes(encode_png(pair.after))
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serving.cli.main",
            "serve",
            "--models-dir",
            str(models),
            "--port",
            "0",
            "--metrics-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as server:
        try:
            line = server.stdout.readline()
            assert "serving on" in line, line + server.stderr.read()
            address = line.strip().rsplit(" ", 1)[-1]
            result = runner.invoke(
                cli,
                [
                    "detect",
                    str(tmp_path / "b.png"),
                    str(tmp_path / "a.png"),
                    "--address",
                    address,
                    "--out",
                    str(tmp_path / "out"),
                ],
            )
            assert result.exit_code == 0, result.output
            for name in ("mask.png", "probability.png", "overlay.png"):
                assert (tmp_path / "out" / name).stat().st_size > 0
            report = json.loads((tmp_path / "out" / "regions.json").read_text())
            assert report["mask_rule"] == "threshold" and 0 <= report["threshold"] <= 1
            detect = ["detect", str(tmp_path / "b.png"), str(tmp_path / "a.png")]
            gated = [*detect, "--address", address, "--mask-rule", "cva-gated"]
            result = runner.invoke(cli, [*gated, "--out", str(tmp_path / "gated")])
            assert result.exit_code == 0, result.output
            report = json.loads((tmp_path / "gated" / "regions.json").read_text())
            assert report["mask_rule"] == "cva-gated" and report["gated_cut"] > 0
            assert "threshold" not in report
            result = runner.invoke(cli, [*gated, "--threshold", "0.5"])
            assert result.exit_code == 2 and "--threshold" in result.output
        finally:
            server.terminate()
            # SIGTERM drains and exits cleanly
            assert server.wait(timeout=30) == 0


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "70000"], {}, "port"),
        (["--metrics-port", "-5"], {}, "metrics_port"),
        (["--max-batch-size", "0"], {}, "max_batch_size"),
        (["--tls-cert", "server.pem"], {}, "tls_key"),
        ([], {"RARECHANGE_INSTANCES": "none"}, "instances"),
        ([], {"RARECHANGE_BACKEND": "tensorflow"}, "backend"),
    ],
)
def test_serve_refuses_invalid_settings_naming_them(
    args: list[str], env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(cli, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert "invalid settings" in result.output and named in result.output


def test_the_clis_mask_rules_are_the_servers() -> None:
    from serving.cli.options import MASK_RULES
    from serving.metadata import MASK_RULES as SERVER_RULES

    assert MASK_RULES == SERVER_RULES


def test_the_clis_mask_rule_help_states_the_servers_cut() -> None:
    """The help spells the gated cut's constants out (no numpy at --help): they must be the
    server's."""
    from serving import cva
    from serving.cli.options import mask_rule_option

    @mask_rule_option
    def probe(mask_rule: str | None) -> None: ...

    text = " ".join(probe.__click_params__[0].help.split())
    assert f"median + {cva.GATE_SPREAD:g} robust SD" in text
    assert f"at least {cva.GATE_FLOOR:g}" in text
