"""docs/deploy.md and deploy/README.md: the paths, commands and settings they give exist."""

from __future__ import annotations

import re

import pytest
from conftest import DEPLOY, KUSTOMIZATIONS, ROOT, Stage

from serving.config import ServerSettings

DOCS = {"docs/deploy.md": ROOT / "docs" / "deploy.md", "deploy/README.md": DEPLOY / "README.md"}
PREFIX = ServerSettings.model_config["env_prefix"]
# variables the docs name that are not server settings, with what reads them
OTHER_VARIABLES = {"RARECHANGE_CHECKOV": "tests/deploy/test_checkov.py"}


@pytest.mark.parametrize("doc", list(DOCS))
def test_every_path_named_exists(doc: str) -> None:
    text = DOCS[doc].read_text()
    base = ROOT if doc.startswith("docs/") else DEPLOY
    for path in set(re.findall(r"`((?:deploy/|docs/|serving/|export/)[\w./-]+)`", text)):
        if "*" in path or "NAME" in path or "<" in path:
            continue
        assert (ROOT / path).exists(), f"{doc}: {path}"
    if base == DEPLOY:
        for path in set(
            re.findall(r"^\| `((?:docker|k8s|monitoring|security)/[^`]+)`", text, re.M)
        ):
            for expanded in expand_braces(path):
                if "*" not in expanded:
                    assert (DEPLOY / expanded).exists(), f"{doc}: {expanded}"


def expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^}]+)\}", path)
    if not m:
        return [path]
    return [path[: m.start()] + part + path[m.end() :] for part in m[1].split(",")]


def test_commands_name_real_kustomizations_dockerfiles_and_targets(
    dockerfiles: dict[str, list[Stage]],
) -> None:
    text = DOCS["docs/deploy.md"].read_text()
    applied = set(re.findall(r"kubectl apply -k ([\w/.-]+)", text))
    known = {str(p.relative_to(ROOT)) for p in KUSTOMIZATIONS.values()}
    assert applied and applied <= known, applied - known
    assert known <= applied, f"undocumented: {known - applied}"
    for name, target in re.findall(
        r"docker build -f deploy/docker/(\w+)\.Dockerfile(?: --target (\w+))?", text
    ):
        assert name in dockerfiles
        if target:
            assert target in {s.name for s in dockerfiles[name]}


@pytest.mark.parametrize("doc", list(DOCS))
def test_every_variable_named_is_read_by_something(doc: str) -> None:
    names = set(re.findall(rf"\b{PREFIX}[A-Z_]+\b", DOCS[doc].read_text()))
    settings = {PREFIX + f.upper() for f in ServerSettings.model_fields}
    unknown = names - settings - set(OTHER_VARIABLES)
    assert not unknown, f"{doc}: {unknown}"
