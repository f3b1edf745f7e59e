"""Many pairs and the CLI of `rarechange score`: manifest parsing, the retry loop, the local
process pool and a real local Ray (2 CPUs) on GeoTIFFs written here, manifest_results.csv, and
the exit codes 0 / 1 / 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from click.testing import CliRunner

from serving.cli.main import cli
from serving.config import ServerSettings
from serving.scoring.manifest import (
    ManifestError,
    PairJob,
    _attempts,
    read_manifest,
    retriable,
    score_manifest,
)
from serving.scoring.pair import ScoreOptions
from serving.scoring.rasters import PairError, UnreadableInput, UsageProblem

MODELS = Path(__file__).resolve().parents[2] / "models"
SIZE = 80


def planted_pair(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured RGB scene and the same scene with a bright roof planted in it."""
    rng = np.random.default_rng(seed)
    before = rng.integers(60, 120, (size, size, 3), dtype=np.uint8)
    after = before.copy()
    after[20:44, 24:52] = (230, 220, 200)
    return before, after


def write_tif(path: Path, image: np.ndarray, x0: float = 500_000.0) -> Path:
    """(H, W, C) uint8 as a GeoTIFF in UTM 31N, 2 m pixels, upper-left corner at x0."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=image.shape[0],
        width=image.shape[1],
        count=image.shape[2],
        dtype="uint8",
        crs="EPSG:32631",
        transform=Affine(2.0, 0.0, x0, 0.0, -2.0, 4_000_000.0),
    ) as dst:
        dst.write(np.moveaxis(image, -1, 0))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("pairs")
    out = {}
    for i in range(2):
        before, after = planted_pair(SIZE, seed=i)
        out[f"p{i}"] = (
            write_tif(root / f"p{i}_before.tif", before),
            write_tif(root / f"p{i}_after.tif", after),
        )
    before, after = planted_pair(SIZE, seed=5)
    # the after image 100 km east: the footprints do not overlap
    out["apart"] = (
        write_tif(root / "apart_before.tif", before),
        write_tif(root / "apart_after.tif", after, x0=600_000.0),
    )
    return out


def manifest(path: Path, rows: list[tuple[str, Path, Path]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "before", "after"])
        for row in rows:
            w.writerow(row)
    return path


def settings() -> ServerSettings:
    return ServerSettings(models_dir=MODELS, metrics_port=-1, warmup=False, intra_op_threads=1)


def results(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {r["id"]: r for r in csv.DictReader(f)}


# ----------------------------------------------------------------------------- the manifest
def test_manifest_paths_ids_and_bands(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "m.csv"
    path.write_text('before,after,bands\nsub/a.tif,/abs/b.tif,"3,2,1"\nc.tif,d.tif,\n')
    jobs = read_manifest(path)
    assert jobs[0].before == tmp_path / "sub" / "a.tif"  # relative to the manifest
    assert jobs[0].after == Path("/abs/b.tif")
    assert jobs[0].bands == (3, 2, 1) and jobs[1].bands is None
    assert [j.id for j in jobs] == ["00001-a", "00002-c"]  # made unique and readable


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("before,later\na,b\n", "needs columns before and after"),
        ("id,before,after\nx,a,b\nx,c,d\n", "appears twice"),
        ("id,before,after\n../x,a,b\n", "must be letters"),
        ('before,after,bands\na,b,"3,x"\n', "band numbers"),
        ("before,after\na,\n", "must both be given"),
        ("before,after\n", "no pairs"),
    ],
)
def test_bad_manifests_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


# --------------------------------------------------------------------------- the retry loop
def test_retries_transient_failures_but_not_judgements_about_the_data() -> None:
    """The engine-independent loop with a scripted worker: what fails how, and how often."""
    script = {
        "flaky": [OSError("disk hiccup"), None],
        "unreadable": [UnreadableInput("cannot read"), UnreadableInput("cannot read")],
        "apart": [PairError("do not overlap"), None],
        "bands": [UsageProblem("--bands"), None],
        "fine": [None],
    }
    jobs = [PairJob(k, Path(f"{k}_b.tif"), Path(f"{k}_a.tif")) for k in script]
    calls: list[tuple[str, bool]] = []
    flight: dict[int, PairJob] = {}

    def start(job: PairJob, opts: ScoreOptions) -> int:
        calls.append((job.id, opts.resume))
        flight[len(calls)] = job
        return len(calls)

    def done(handles: list[int]):  # type: ignore[no-untyped-def]
        h = handles[0]
        job = flight.pop(h)
        error = script[job.id].pop(0)
        yield h, None if error else {"status": "done"}, error

    finished = {}
    _attempts(jobs, ScoreOptions(), 1, start, done, lambda o: finished.update({o.job.id: o}), 2)
    assert {k: (o.status, o.attempts) for k, o in finished.items()} == {
        "flaky": ("done", 2),
        "unreadable": ("failed", 2),
        "apart": ("failed", 1),
        "bands": ("failed", 1),
        "fine": ("done", 1),
    }
    assert ("flaky", True) in calls  # a retry resumes the finished blocks
    assert finished["unreadable"].error == "cannot read"
    assert retriable(RuntimeError()) and not retriable(PairError("x"))


# ------------------------------------------------------------------------------ the engines
def run_manifest(pairs: dict, tmp_path: Path, engine: str) -> tuple[list, Path]:
    rows = [(k, b, a) for k, (b, a) in pairs.items()]
    out = tmp_path / engine
    outcomes = score_manifest(
        read_manifest(manifest(tmp_path / f"{engine}.csv", rows)),
        out,
        settings(),
        "aerial-rgb",
        ScoreOptions(block_size=48),
        engine=engine,  # type: ignore[arg-type]
        workers=2,
        retries=1,
        progress=False,
    )
    return outcomes, out


def test_local_engine_scores_the_good_pairs_and_reports_the_bad_one(
    pairs: dict, tmp_path: Path
) -> None:
    outcomes, out = run_manifest(pairs, tmp_path, "local")
    status = {o.job.id: o.status for o in outcomes}
    assert status == {"p0": "done", "p1": "done", "apart": "failed"}
    rows = results(out / "manifest_results.csv")
    assert rows["apart"]["status"] == "failed" and "do not overlap" in rows["apart"]["error"]
    assert rows["apart"]["attempts"] == "1"  # a judgement about the data is not retried
    for pid in ("p0", "p1"):
        assert rows[pid]["out"] == str(out / pid)
        assert (out / pid / "summary.json").is_file()
        with rasterio.open(out / pid / "change_mask.tif") as ds:
            assert int((ds.read(1) == 1).sum()) == int(rows[pid]["changed_pixels"])
    assert not (out / "apart" / "summary.json").exists()


def test_ray_engine_on_a_local_ray_gives_the_local_engines_pixels(
    pairs: dict, tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    local, out_local = run_manifest(pairs, tmp_path, "local")
    remote, out_ray = run_manifest(pairs, tmp_path, "ray")
    assert [o.status for o in remote] == [o.status for o in local]
    assert "do not overlap" in next(o.error for o in remote if o.job.id == "apart")
    for pid in ("p0", "p1"):
        for name in ("change_probability.tif", "change_mask.tif"):
            with (
                rasterio.open(out_local / pid / name) as a,
                rasterio.open(out_ray / pid / name) as b,
            ):
                assert np.array_equal(a.read(), b.read())


# ---------------------------------------------------------------------------------- the CLI
def test_cli_exit_codes(pairs: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    b, a = pairs["p0"]
    args = ["score", str(b), str(a), "--model", "aerial-rgb", "--models-dir", str(MODELS)]
    ok = runner.invoke(
        cli, [*args, "--out", str(tmp_path / "one"), "--quiet", "--block-size", "64"]
    )
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "one" / "change_mask.tif").is_file()
    again = runner.invoke(cli, [*args, "--out", str(tmp_path / "one"), "--quiet"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    resumed = runner.invoke(cli, [*args, "--out", str(tmp_path / "one"), "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    other = runner.invoke(
        cli, [*args, "--out", str(tmp_path / "one"), "--resume", "--threshold", "0.1"]
    )
    assert other.exit_code == 2 and "other inputs, model or settings" in other.output
    gated = runner.invoke(
        cli, [*args, "--out", str(tmp_path / "g"), "--mask-rule", "cva-gated", "--quiet"]
    )
    assert gated.exit_code == 0, gated.output
    assert json.loads((tmp_path / "g" / "summary.json").read_text())["mask_rule"] == "cva-gated"
    conflict = runner.invoke(
        cli, [*args, "--out", str(tmp_path / "h"), "--mask-rule", "cva-gated", "--threshold", "0.5"]
    )
    assert conflict.exit_code == 2 and "threshold" in conflict.output
    bands = runner.invoke(cli, [*args, "--out", str(tmp_path / "b"), "--bands", "1,2"])
    assert bands.exit_code == 2 and "--bands" in bands.output
    both = runner.invoke(cli, [*args, "--out", str(tmp_path / "c"), "--resume", "--overwrite"])
    assert both.exit_code == 2
    nothing = runner.invoke(cli, ["score", "--out", str(tmp_path / "d")])
    assert nothing.exit_code == 2 and "BEFORE AFTER" in nothing.output
    b2, a2 = pairs["apart"]
    apart = runner.invoke(
        cli,
        [
            "score",
            str(b2),
            str(a2),
            "--model",
            "aerial-rgb",
            "--models-dir",
            str(MODELS),
            "--out",
            str(tmp_path / "apart"),
            "--quiet",
        ],
    )
    assert apart.exit_code == 1 and "do not overlap" in apart.output

    rows = [(k, bb, aa) for k, (bb, aa) in pairs.items()]
    m = manifest(tmp_path / "m.csv", rows)
    some_failed = runner.invoke(
        cli,
        [
            "score",
            "--manifest",
            str(m),
            "--out",
            str(tmp_path / "many"),
            "--model",
            "aerial-rgb",
            "--models-dir",
            str(MODELS),
            "--quiet",
            "--workers",
            "2",
        ],
    )
    assert some_failed.exit_code == 1 and '"failed": 1' in some_failed.output
    bad = tmp_path / "bad.csv"
    bad.write_text("before,after\n")
    assert (
        runner.invoke(
            cli, ["score", "--manifest", str(bad), "--out", str(tmp_path / "x")]
        ).exit_code
        == 2
    )
