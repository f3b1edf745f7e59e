"""Deployment checks: what deploy/ says, held against the real service, pyproject.toml and the
Kubernetes schemas, on a machine with no container engine and no cluster.

Fixtures:
* ``dockerfiles``: deploy/docker/*.Dockerfile parsed into stages (ENV, ARG, USER, ENTRYPOINT...).
* ``rendered``: every kustomization rendered by ``kubectl kustomize`` (skips without kubectl).
* ``live_server``: the real ``rarechange serve``, started once as the CPU image would start it:
  the entrypoint, the image's ENV, then the cpu overlay's ConfigMap over it; its /metrics scraped
  before and after one real DetectChange call.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
MONITORING = DEPLOY / "monitoring"
OVERLAYS = ("cpu", "gpu", "triton", "batch")
# every kustomization a user applies, by a short name
KUSTOMIZATIONS = {**{o: K8S / "overlays" / o for o in OVERLAYS}, "monitoring": MONITORING}
# the one Kubernetes version the manifests are validated against (kubernetes-validate's schemas);
# also the oldest the docs promise: the preStop `sleep` action needs 1.30 or later
KUBERNETES_VERSION = "1.33.0"
SERVE_STAGE = "serve"  # the default (last) stage of both Dockerfiles
WAIT_S = 120.0  # only ever reached when a test is about to fail


# ----------------------------------------------------------------------------- Dockerfiles
@dataclass
class Stage:
    name: str
    base: str  # the FROM image, or the name of an earlier stage
    parent: Stage | None
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults, globals first
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, args)

    def all(self, instruction: str) -> list[str]:
        return [a for i, a in self.instructions if i == instruction]

    def inherited(self, instruction: str) -> list[str]:
        """Instructions of this stage and the stages it is built FROM, earliest first."""
        own = self.all(instruction)
        return (self.parent.inherited(instruction) if self.parent else []) + own

    def expand(self, text: str) -> str:
        """${VAR} and $VAR from this stage's ARG defaults (what a plain `docker build` uses)."""
        args = self.all_args()
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), text)

    def all_args(self) -> dict[str, str]:
        """ARG defaults of this stage and the stages it is built FROM (later wins)."""
        return {**(self.parent.all_args() if self.parent else {}), **self.args}

    def env(self) -> dict[str, str]:
        """ENV of this stage, inherited ones included (later wins)."""
        env: dict[str, str] = {}
        for text in self.inherited("ENV"):
            words = shlex.split(text)
            if words and "=" not in words[0]:  # legacy `ENV KEY value words`
                env[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, _, value = word.partition("=")
                env[key] = value
        return env

    def user(self) -> str | None:
        users = self.inherited("USER")
        return users[-1] if users else None

    def exec_form(self, instruction: str) -> list[str] | None:
        """The last ENTRYPOINT/CMD (inherited), which must be JSON (exec form)."""
        found = self.inherited(instruction)
        return json.loads(found[-1]) if found else None


def logical_lines(text: str) -> Iterator[str]:
    """Dockerfile lines with continuations joined and comments dropped."""
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current.append(line[:-1].strip())
            continue
        current.append(line)
        yield " ".join(p for p in current if p)
        current = []
    if current:
        yield " ".join(current)


def parse_dockerfile(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for line in logical_lines(path.read_text()):
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else str(len(stages))
            parent = next((s for s in stages if s.name == base), None)
            stages.append(Stage(name, base, parent, args=dict(global_args) if not parent else {}))
            continue
        if instruction == "ARG":
            key, _, default = rest.partition("=")
            (stages[-1].args if stages else global_args)[key.strip()] = default.strip().strip('"')
            if not stages:
                continue
        stages[-1].instructions.append((instruction, rest.strip()))
    return stages


@pytest.fixture(scope="session")
def dockerfiles() -> dict[str, list[Stage]]:
    """{'cpu': stages, 'gpu': stages}."""
    found = {p.name.removesuffix(".Dockerfile"): p for p in DOCKER.glob("*.Dockerfile")}
    assert set(found) == {"cpu", "gpu"}, sorted(found)
    return {name: parse_dockerfile(path) for name, path in found.items()}


def stage(stages: list[Stage], name: str) -> Stage:
    return next(s for s in stages if s.name == name)


# ----------------------------------------------------------------------------- kustomize
@cache
def kubectl() -> str | None:
    """kubectl with its built-in kustomize, or None."""
    path = shutil.which("kubectl")
    if path is None:
        return None
    probe = subprocess.run(
        [path, "kustomize", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return path if probe.returncode == 0 else None


@cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize DIR` as objects."""
    exe = kubectl()
    assert exe is not None
    done = subprocess.run(
        [exe, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"kubectl kustomize {directory}:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


@pytest.fixture(scope="session")
def rendered() -> dict[str, tuple[dict[str, Any], ...]]:
    """{kustomization short name: rendered objects}, every kustomization of deploy/."""
    if kubectl() is None:
        pytest.skip("kubectl (with `kubectl kustomize`) is not installed: cannot render deploy/k8s")
    return {name: render(path) for name, path in KUSTOMIZATIONS.items()}


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict:
    hits = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"{len(hits)} {kind} {name or ''} objects"
    return hits[0]


def pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod spec inside a workload (Deployment, Job, or a RayJob's head/workers/submitter)."""
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        return [spec["template"]["spec"]]
    if obj["kind"] == "RayJob":
        cluster = spec["rayClusterSpec"]
        specs = [cluster["headGroupSpec"]["template"]["spec"]]
        specs += [g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])]
        if "submitterPodTemplate" in spec:
            specs.append(spec["submitterPodTemplate"]["spec"])
        return specs
    return []


def configmap_env(objects: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict:
    """The environment a container gets from its envFrom ConfigMaps and its literal env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            env.update(find(objects, "ConfigMap", ref["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


@pytest.fixture
def settings_from_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str]], Any]:
    """ServerSettings as the server reads them from exactly this environment."""
    from serving.config import ServerSettings

    prefix = ServerSettings.model_config["env_prefix"]

    def load(env: dict[str, str]) -> ServerSettings:
        for key in list(os.environ):
            if key.startswith(prefix):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return ServerSettings()

    return load


# ----------------------------------------------------------------------------- the server
@dataclass
class LiveServer:
    address: str  # host:port actually bound
    metrics_url: str
    configured_port: int  # what the manifests say
    configured_metrics_port: int
    env: dict[str, str]  # the environment it was started with (image ENV + ConfigMap)
    startup_s: float  # process start to SERVING (models loaded, warmed up)
    pid: int
    before: list[tuple[str, dict[str, str], float]]  # /metrics samples before any call
    after: list[tuple[str, dict[str, str], float]]  # ... and after one DetectChange
    peak_rss_bytes: int = 0

    @property
    def sample_names(self) -> set[str]:
        return {name for name, _, _ in self.before + self.after}

    def labels_of(self, sample: str) -> set[str]:
        return {k for name, labels, _ in self.before + self.after if name == sample for k in labels}


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def peak_rss(pid: int) -> int:
    """VmHWM of a process (Linux), 0 where /proc has none."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return 0
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def env_file(path: Path) -> dict[str, str]:
    """A kustomize env file (KEY=VALUE lines, # comments)."""
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def container_environment(image_env: dict[str, str]) -> dict[str, str]:
    """The image's ENV, then what the cpu overlay's gateway container sets over it: from the
    rendered overlay, or (no kubectl here) from the base's env file, which the cpu overlay
    takes as it is."""
    if kubectl() is None:
        return {**image_env, **env_file(K8S / "base" / "settings.env")}
    objects = render(KUSTOMIZATIONS["cpu"])
    deployment = find(objects, "Deployment", "rarechange")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {**image_env, **configmap_env(objects, container)}


@pytest.fixture(scope="session")
def live_server(
    dockerfiles: dict[str, list[Stage]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """`rarechange serve` with the cpu overlay's settings, on free ports of the loopback."""
    serve = stage(dockerfiles["cpu"], SERVE_STAGE)
    env = container_environment(serve.env())
    image_models = env["RARECHANGE_MODELS_DIR"]
    port, metrics_port = int(env["RARECHANGE_PORT"]), int(env["RARECHANGE_METRICS_PORT"])
    run_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RARECHANGE_")},
        **env,
        # what differs from the pod: this checkout's models, loopback, and free ports (the
        # configured ones may be taken here, and other tests' servers must never meet this one)
        "RARECHANGE_MODELS_DIR": str(ROOT / "models"),
        "RARECHANGE_HOST": "127.0.0.1",
        "RARECHANGE_PORT": "0",
        "RARECHANGE_METRICS_PORT": "0",
        "PYTHONUNBUFFERED": "1",
    }
    assert image_models.startswith("/opt/"), image_models
    entrypoint = serve.exec_form("ENTRYPOINT")
    assert entrypoint is not None
    exe = shutil.which(entrypoint[0], path=str(Path(sys.executable).parent))
    command = [exe, *entrypoint[1:]] if exe else [sys.executable, "-m", "serving.cli.main", "serve"]
    log = tmp_path_factory.mktemp("live-server") / "stderr.txt"
    t0 = time.monotonic()
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=run_env
        )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        startup_s = time.monotonic() - t0
        assert "serving on" in line, line + log.read_text()
        address = line.split()[-1]
        metrics_url = proc.stdout.readline().split()[-1]  # type: ignore[union-attr]
        before = scrape(metrics_url)
        one_call(address)
        after = scrape(metrics_url)
        yield LiveServer(
            address=address,
            metrics_url=metrics_url,
            configured_port=port,
            configured_metrics_port=metrics_port,
            env=env,
            startup_s=startup_s,
            pid=proc.pid,
            before=before,
            after=after,
            peak_rss_bytes=peak_rss(proc.pid),
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def one_call(address: str) -> None:
    """One real DetectChange on the default model, so every labelled series has a sample."""
    from serving.client import ChangeDetectionClient

    rng = np.random.default_rng(0)
    before = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    after = before.copy()
    after[32:64, 32:64] = 255 - after[32:64, 32:64]
    with ChangeDetectionClient(address) as client:
        result = client.detect(before, after, timeout=WAIT_S)
    assert result.response.height == 96
