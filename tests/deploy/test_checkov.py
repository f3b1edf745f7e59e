"""deploy/security: a security scan (checkov) of what is deployed, each finding fixed or justified.

checkov scans the manifests as `kubectl apply -k` sends them (every kustomization rendered, plus
the namespace), the two Dockerfiles, and deploy/ for committed secrets. It runs with no skips of
its own; every finding must have an entry, with its reason, in deploy/security/checkov-skips.yaml,
and every entry must still match a finding.

checkov pins packages the project's own environment cannot take, so it lives in a virtual
environment of its own (deploy/security/install-checkov.sh) that RARECHANGE_CHECKOV points at (or
on PATH); without it these tests skip and say so. It runs with --skip-download: no network.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import DEPLOY, DOCKER, K8S, ROOT

SKIPS_FILE = DEPLOY / "security" / "checkov-skips.yaml"
ENV = "RARECHANGE_CHECKOV"
TIMEOUT_S = 300


def checkov() -> str | None:
    configured = os.environ.get(ENV)
    if configured:
        assert Path(configured).is_file(), f"{ENV}={configured} does not exist"
        return configured
    return shutil.which("checkov")


def run(exe: str, *args: str) -> list[dict[str, Any]]:
    """One checkov run, its JSON reports (one per framework)."""
    done = subprocess.run(
        [exe, "--skip-download", "--output", "json", "--compact", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=TIMEOUT_S,
        env={**os.environ, "LOG_LEVEL": "WARNING"},
    )
    # 0: nothing failed, 1: something failed; anything else is checkov itself failing
    assert done.returncode in (0, 1), done.stderr[-4000:]
    report = json.loads(done.stdout)
    return report if isinstance(report, list) else [report]


@pytest.fixture(scope="module")
def scan(rendered: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    exe = checkov()
    if exe is None:
        pytest.skip(
            "checkov is not installed (its pins conflict with .venv): run "
            f"`bash deploy/security/install-checkov.sh` and set {ENV} to the checkov it prints"
        )
    manifests = tmp_path_factory.mktemp("rendered")
    for name, objects in rendered.items():
        (manifests / f"{name}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    shutil.copy(K8S / "namespace.yaml", manifests / "namespace.yaml")
    reports = run(exe, "--framework", "kubernetes", "--directory", str(manifests))
    reports += run(
        exe,
        "--framework",
        "dockerfile",
        "--file",
        str((DOCKER / "cpu.Dockerfile").relative_to(ROOT)),
        "--file",
        str((DOCKER / "gpu.Dockerfile").relative_to(ROOT)),
    )
    reports += run(exe, "--framework", "secrets", "--directory", str(DEPLOY.relative_to(ROOT)))
    by_type = {r["check_type"]: r for r in reports if "check_type" in r}
    return by_type


def findings(scan: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(check id, resource, file) of every failed check."""
    return [
        (f["check_id"], f["resource"], f["file_path"])
        for report in scan.values()
        for f in report["results"]["failed_checks"]
    ]


def justifications() -> list[dict[str, Any]]:
    entries = yaml.safe_load(SKIPS_FILE.read_text())["findings"]
    for entry in entries:
        assert entry["check"] and entry["resources"], entry
        assert len(entry["reason"].split()) >= 15, f"{entry['check']}: say why, not just that"
    return entries


def justified(finding: tuple[str, str, str], entry: dict[str, Any]) -> bool:
    check, resource, _ = finding
    return check == entry["check"] and any(
        fnmatch.fnmatchcase(resource, p) for p in entry["resources"]
    )


def test_the_scan_covers_manifests_dockerfiles_and_secrets(scan: dict[str, dict[str, Any]]) -> None:
    assert {"kubernetes", "dockerfile"} <= set(scan), sorted(scan)
    for kind in ("kubernetes", "dockerfile"):
        summary = scan[kind]["summary"]
        assert summary["parsing_errors"] == 0, kind
        assert summary["resource_count"] > 0 and summary["passed"] > 0, (kind, summary)
    # no committed secret anywhere under deploy/ (a secrets report appears only on findings)
    if "secrets" in scan:
        assert not scan["secrets"]["results"]["failed_checks"]


def test_every_finding_is_fixed_or_justified(scan: dict[str, dict[str, Any]]) -> None:
    entries = justifications()
    open_findings = [f for f in findings(scan) if not any(justified(f, e) for e in entries)]
    version = next(iter(scan.values()))["summary"].get("checkov_version")
    assert not open_findings, (
        f"checkov {version} findings with no entry in {SKIPS_FILE.relative_to(ROOT)} "
        f"(fix them, or justify them there): {open_findings}"
    )


def test_every_justification_still_matches_a_finding(scan: dict[str, dict[str, Any]]) -> None:
    found = findings(scan)
    stale = [e["check"] for e in justifications() if not any(justified(f, e) for f in found)]
    assert not stale, f"fixed, so remove from {SKIPS_FILE.relative_to(ROOT)}: {stale}"
