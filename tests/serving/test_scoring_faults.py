"""A full disk during batch scoring (serving.scoring.pair.score_pair and `rarechange score`).

The run must fail with an error that says the disk is full, where, and what to do next; leave no
``summary.json`` and nothing final-named that is half-written (every output present is complete:
identical to the same output of a run that never failed; all else has a temporary, dot-prefixed
name); and a later run with space and ``resume`` must finish with the same pixels as that run.

The disk fills two ways: a real tmpfs of a few MiB, when this process may mount one (root), with
the free space stepped up from nothing so that it runs out in every phase in turn (block files,
the COGs' staging rasters, the COGs, polygons, quicklook, summary); and failures injected at the
file layer (numpy's block writes, GDAL's COG copy, the summary's write and its rename), which runs
anywhere. A run killed with SIGKILL and resumed: test_scoring_pair.py::
test_resume_after_sigkill_gives_the_same_pixels.
"""

from __future__ import annotations

import collections
import errno
import os
import shutil
import subprocess
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.errors
import rasterio.shutil
from click.testing import CliRunner
from test_scoring_pair import MODEL, SETTINGS, write_pair

from serving.cli.main import cli
from serving.scoring import outputs, polygons
from serving.scoring.outputs import OutputWriteError
from serving.scoring.pair import OUTPUTS, PARTIAL, ModelScorer, ScoreOptions, score_pair

BLOCK = 64
PHASES = ("save", "add", "finish", "write_geojson", "write_quicklook", "write_json_atomic")


@pytest.fixture(scope="module")
def scorer() -> Iterator[ModelScorer]:
    with ModelScorer(SETTINGS, MODEL) as s:
        yield s


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, scorer: ModelScorer) -> tuple[Path, Path, Path]:
    """(before, after, reference run): 192 x 160 pixels, 12 blocks of 64."""
    root = tmp_path_factory.mktemp("pair")
    before, after, _, _ = write_pair(root, 192, 160, seed=21)
    run(scorer, before, after, root / "reference")
    return before, after, root / "reference"


def run(scorer: ModelScorer, before: Path, after: Path, out: Path, **options: Any) -> dict:
    return score_pair(
        before, after, out, scorer, ScoreOptions(block_size=BLOCK, **options), progress=False
    )


def pixels(path: Path) -> list[np.ndarray]:
    with rasterio.open(path) as ds:
        return [ds.read(1), *(ds.read(1, out_shape=(ds.height // f, ds.width // f))
                              for f in ds.overviews(1))]  # fmt: skip


def assert_same_output(name: str, got: Path, reference: Path) -> None:
    """A complete output: the very pixels (overviews too) or bytes of the reference run's."""
    if name.endswith(".tif"):
        for a, b in zip(pixels(got), pixels(reference), strict=True):
            np.testing.assert_array_equal(a, b)
    else:
        assert got.read_bytes() == reference.read_bytes(), name


def assert_failed_cleanly(exc: BaseException, out: Path, reference: Path) -> None:
    assert isinstance(exc, OutputWriteError) and isinstance(exc, OSError)
    assert exc.errno == errno.ENOSPC
    message = str(exc)
    assert "no space left on the device of" in message and str(out) in message, message
    assert "--resume" in message
    assert not (out / "summary.json").exists()
    for entry in out.iterdir():
        if entry.name in OUTPUTS:  # written before the disk filled: must be complete
            assert_same_output(entry.name, entry, reference / entry.name)
        else:  # anything else is hidden and temporary: never taken for an output
            assert entry.name.startswith("."), entry


def assert_resumes_to_the_reference(
    scorer: ModelScorer, pair: tuple[Path, Path, Path], out: Path
) -> None:
    before, after, reference = pair
    summary = run(scorer, before, after, out, resume=True)
    assert summary["status"] == "done"
    for name in OUTPUTS:
        if name != "summary.json":
            assert_same_output(name, out / name, reference / name)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temporary left


def phase_of(exc: BaseException) -> str:
    """The innermost writing step of serving.scoring in the traceback of the disk's error."""
    cause = exc.__cause__ or exc
    frames = traceback.extract_tb(cause.__traceback__)
    ours = [f.name for f in frames if f"serving{os.sep}scoring" in f.filename]
    return next((n for n in reversed(ours) if n in PHASES), "?")


# ------------------------------------------------------------------ a real, small filesystem
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the injected failures below run anywhere")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def leave_free(disk: Path, free: int) -> Path:
    """Fill ``disk`` with a filler file until about ``free`` bytes are left."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    stat = os.statvfs(disk)
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))
    return filler


@pytest.mark.slow
def test_a_full_tmpfs_fails_every_phase_cleanly_and_resumes(
    small_disk: Path, scorer: ModelScorer, pair: tuple[Path, Path, Path]
) -> None:
    """The free space goes up from nothing in 24 KiB steps until the run fits, then back down in
    pages (4 KiB) from there, so that the disk fills in turn in every phase it can: the job file,
    block files, the COGs (staging rasters, overview levels, the COG itself) and the quicklook
    (the polygons and the summary come after the COGs and need less than was used at the peak:
    they are covered by injected failures below)."""
    before, after, reference = pair
    out = small_disk / "out"
    phases: collections.Counter[str] = collections.Counter()

    def attempt(free: int) -> bool:
        """One run with ``free`` bytes left; True if it fitted. A run that did not fit failed
        cleanly, and resumed with space it gives the reference run's outputs."""
        shutil.rmtree(out, ignore_errors=True)
        filler = leave_free(small_disk, free)
        try:
            run(scorer, before, after, out)
        except OutputWriteError as exc:
            assert_failed_cleanly(exc, out, reference)
            phase = phase_of(exc)
            if phase == "write_json_atomic":  # the job file first, the summary last
                phase = "summary" if (out / "quicklook.png").exists() else "job"
            phases[phase] += 1
        else:
            for name in OUTPUTS:
                if name != "summary.json":
                    assert_same_output(name, out / name, reference / name)
            return True
        finally:
            filler.unlink()
        assert_resumes_to_the_reference(scorer, pair, out)
        return False

    fits = next((free for free in range(0, 4 << 20, 24 << 10) if attempt(free)), None)
    assert fits is not None, "the run never fitted on the disk"
    for free in range(fits - 4096, fits - (24 << 10), -4096):
        attempt(free)
    # the COGs fill the disk in `finish`: their staged blocks reach it from GDAL's cache on close;
    # the quicklook is drawn while they are copied, the disk's fullest moment, so the summary
    # written at the end always finds room here: it is covered by the injected failures below
    reached = {"job", "save", "finish", "write_quicklook"}
    assert reached <= set(phases), phases


@pytest.mark.slow
def test_rarechange_score_on_a_full_disk_says_so(
    small_disk: Path, pair: tuple[Path, Path, Path]
) -> None:
    before, after, _ = pair
    out = small_disk / "out"
    leave_free(small_disk, 64 * 1024)
    args = ["score", str(before), str(after), "--out", str(out), "--model", MODEL, "--quiet"]
    result = CliRunner().invoke(cli, [*args, "--block-size", str(BLOCK)])
    assert result.exit_code == 1, result.output
    assert f"Error: [Errno 28] no space left on the device of {out}" in result.output
    assert "--resume" in result.output and "Traceback" not in result.output
    assert not (out / "summary.json").exists()
    (small_disk / "filler").unlink()
    result = CliRunner().invoke(cli, [*args, "--block-size", str(BLOCK), "--resume"])
    assert result.exit_code == 0, result.output
    assert (out / "summary.json").exists()


# ------------------------------------------------------------------ failures at the file layer
def disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the filesystem says once it is full."""
    real = shutil.disk_usage

    def usage(path: str | os.PathLike) -> Any:
        return real(path)._replace(free=0)

    monkeypatch.setattr(outputs.shutil, "disk_usage", usage)


def numpy_block_write_fails(monkeypatch: pytest.MonkeyPatch, at: int = 3) -> None:
    """numpy's own report of a short write ("4096 requested and ..."), after half the bytes."""
    real, calls = np.save, []

    def save(file: Any, array: np.ndarray, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == at:
            file.write(b"\x93NUMPY" + bytes(2042))
            raise OSError("4096 requested and 2048 written")
        real(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    disk_full(monkeypatch)


def cog_copy_fails(monkeypatch: pytest.MonkeyPatch, at: int = 1) -> None:
    """GDAL's COG copy stops halfway, its error saying nothing of the disk."""
    real, calls = rasterio.shutil.copy, []

    def copy(src: Any, dst: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == at:
            Path(dst).write_bytes(b"II*\x00" + bytes(4092))
            raise rasterio.errors.RasterioIOError("TIFFAppendToStrip:Seek error at scanline 0")
        real(src, dst, **kwargs)

    monkeypatch.setattr(rasterio.shutil, "copy", copy)
    disk_full(monkeypatch)


def geojson_write_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The polygons' temporary file takes its first 1,000 characters, then ENOSPC."""
    real = open

    class Filling:
        def __init__(self, file: Any) -> None:
            self.file, self.room = file, 1000

        def write(self, text: str) -> int:
            if len(text) > self.room:
                self.file.write(text[: self.room])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.file.name)
            self.room -= len(text)
            return self.file.write(text)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.file, name)

        def __enter__(self) -> Filling:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    def filling_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        file = real(path, *args, **kwargs)
        return Filling(file) if Path(path).name == ".changes.geojson.tmp" else file

    monkeypatch.setattr(polygons, "open", filling_open, raising=False)


def summary_write_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The summary's temporary file gets half its text, then ENOSPC."""
    real = Path.write_text

    def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if self.name == ".summary.json.tmp":
            real(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)


def summary_rename_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The complete summary cannot be renamed into place (no room for the directory entry)."""
    real = os.replace

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        if Path(dst).name == "summary.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize(
    "inject",
    [
        numpy_block_write_fails,
        cog_copy_fails,
        lambda mp: cog_copy_fails(mp, at=2),  # the probability COG is done, the mask's is not
        geojson_write_fails,
        summary_write_fails,
        summary_rename_fails,
    ],
    ids=["block-write", "first-cog", "second-cog", "polygons", "summary-write", "summary-rename"],
)
def test_a_write_failing_for_space_fails_cleanly_and_resumes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scorer: ModelScorer,
    pair: tuple[Path, Path, Path],
    inject: Callable[[pytest.MonkeyPatch], None],
) -> None:
    before, after, reference = pair
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        inject(mp)
        with pytest.raises(OutputWriteError) as err:
            run(scorer, before, after, out)
    assert_failed_cleanly(err.value, out, reference)
    partial = out / PARTIAL
    assert not list(partial.rglob(".*.tmp")), "the failed write's temporary was left behind"
    assert not list(partial.glob(".*.staging*")), "the COG's staging rasters were left behind"
    assert not list(out.glob(".*.tif.tmp"))
    assert_resumes_to_the_reference(scorer, pair, out)


def test_a_failure_that_is_not_about_space_passes_unchanged(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scorer: ModelScorer,
    pair: tuple[Path, Path, Path],
) -> None:
    """Permission denied, with space to spare: the error stays what it is (not 'disk full')."""
    before, after, _ = pair

    def save(file: Any, array: np.ndarray, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), file.name)

    monkeypatch.setattr(np, "save", save)
    with pytest.raises(PermissionError) as err:
        run(scorer, before, after, tmp_path / "out")
    assert not isinstance(err.value, OutputWriteError)
    assert not (tmp_path / "out" / "summary.json").exists()
