"""deploy/docker: what can be checked of the images without building them.

No container engine here: the Dockerfiles are parsed, and every fact they state about the
service (extras, ports, entrypoint, settings, user, paths) is held against pyproject.toml, the
real CLI and ServerSettings, and the Kubernetes manifests that run the images.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from itertools import chain
from pathlib import Path

import pytest
from conftest import DOCKER, ROOT, SERVE_STAGE, Stage, find, pod_specs, stage
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from serving.cli.main import cli
from serving.config import ServerSettings

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PREFIX = ServerSettings.model_config["env_prefix"]
SETTINGS_ENV = {PREFIX + name.upper() for name in ServerSettings.model_fields}
# what each image must install: the serving image also carries the Triton client (it is the
# gateway of the triton overlay), the ray target Ray, the GPU image onnxruntime-gpu
EXPECTED_EXTRAS = {
    ("cpu", "serve"): {"triton"},
    ("cpu", "ray"): {"triton", "ray"},
    ("gpu", "serve"): {"gpu"},
}
# run as Kubernetes pods from these images; their pods must run as the image's user
IMAGE_OF = {"cpu": ("rarechange", "rarechange-ray"), "gpu": ("rarechange-gpu",)}
NEVER_IN_CONTEXT = (".venv", ".git", "runs", "out", "tests", "docs", "bench", ".pytest_cache")


def installs(s: Stage) -> list[str]:
    """The pip install lines of a stage and the stages it is built from, ARGs expanded."""
    lines: list[str] = []
    node: Stage | None = s
    lineage = []
    while node is not None:
        lineage.append(node)
        node = node.parent
    for node in reversed(lineage):
        lines += [node.expand(r) for r in node.all("RUN") if "pip install" in r]
    return lines


def final_stage_with_venv(stages: list[Stage], name: str) -> Stage:
    """The stage whose /opt/venv the named final stage copies (COPY --from=...)."""
    final = stage(stages, name)
    sources = [
        c.split()[0].removeprefix("--from=")
        for c in final.inherited("COPY")
        if c.startswith("--from=") and "/opt/venv" in c
    ]
    assert len(sources) == 1, f"{name}: one COPY --from=... /opt/venv expected, got {sources}"
    return stage(stages, sources[0])


def extras_installed(s: Stage) -> set[str]:
    found: set[str] = set()
    for line in installs(s):
        for group in re.findall(r"\.\[([^\]]*)\]", line):
            found |= {e.strip() for e in group.split(",") if e.strip()}
    return found


def pinned(s: Stage) -> dict[str, str]:
    """name -> version of every `name==version` a stage's pip lines pin."""
    out: dict[str, str] = {}
    for line in installs(s):
        for req in re.findall(r"\"([A-Za-z0-9_.\-\[\]]+==[^\"\s]+)\"", line):
            r = Requirement(req)
            out[r.name] = str(next(iter(r.specifier)).version)
    return out


def same(a: str, b: str) -> bool:
    """Package names compared as pip does (case, '-', '_' and '.' alike)."""
    return re.sub(r"[-_.]+", "-", a).lower() == re.sub(r"[-_.]+", "-", b).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in requirements}


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_each_dockerfile_has_its_own_dockerignore(name: str) -> None:
    # BuildKit reads <Dockerfile name>.dockerignore beside the Dockerfile for that build
    ignore = DOCKER / f"{name}.Dockerfile.dockerignore"
    assert ignore.is_file()
    patterns = ignore_patterns(ignore)
    assert patterns[0] == (False, "*"), "an allowlist: everything out, then what is copied"


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_multi_stage_pinned_bases_no_add(dockerfiles: dict[str, list[Stage]], name: str) -> None:
    stages = dockerfiles[name]
    assert len(stages) >= 2, "multi-stage: the build tools stay out of the final image"
    assert stages[-1].name == SERVE_STAGE, "the default target (the last stage) serves"
    for s in stages:
        if s.parent is None:
            _image, _, tag = s.base.partition(":")
            assert tag and tag != "latest", f"{name}: FROM {s.base} must pin a tag"
        assert not s.all("ADD"), f"{name}/{s.name}: COPY, not ADD"
    final = stages[-1]
    root = final
    while root.parent is not None:
        root = root.parent
    if name == "cpu":
        assert "slim" in root.base, root.base
    else:
        assert root.base.startswith("nvidia/cuda:") and "-runtime-" in root.base, root.base


@pytest.mark.parametrize(("name", "target"), [("cpu", "serve"), ("cpu", "ray"), ("gpu", "serve")])
def test_user_is_numeric_not_root_and_the_pods_agree(
    dockerfiles: dict[str, list[Stage]], rendered: dict, name: str, target: str
) -> None:
    s = stage(dockerfiles[name], target)
    user = s.user()
    assert user is not None, f"{name}/{target} has no USER"
    uid, _, gid = user.partition(":")
    # numeric: the kubelet can only verify runAsNonRoot against a numeric user
    assert uid.isdigit() and int(uid) != 0, user
    assert gid.isdigit() and int(gid) != 0, user
    created = " ".join(s.inherited("RUN"))
    assert f"--uid {uid}" in created and f"--gid {gid}" in created, "the user is created"
    # every pod that runs one of this Dockerfile's images runs as that user
    images = IMAGE_OF[name]
    checked = 0
    for objects in rendered.values():
        for obj in objects:
            for spec in pod_specs(obj):
                names = {c["image"].rsplit("/", 1)[-1].split(":")[0] for c in spec["containers"]}
                if names & set(images):
                    ctx = spec["securityContext"]
                    assert (ctx["runAsUser"], ctx["runAsGroup"]) == (int(uid), int(gid)), obj
                    assert ctx["runAsNonRoot"] is True
                    checked += 1
    assert checked, f"no pod runs {images}"


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_ports_entrypoint_and_env_match_the_service(
    dockerfiles: dict[str, list[Stage]], settings_from_env: Callable[..., ServerSettings], name: str
) -> None:
    s = stage(dockerfiles[name], SERVE_STAGE)
    defaults = {f: ServerSettings.model_fields[f].default for f in ("port", "metrics_port")}
    exposed = {int(p.split("/")[0]) for e in s.all("EXPOSE") for p in e.split()}
    assert exposed == set(defaults.values()), (exposed, defaults)
    env = s.env()
    assert int(env[PREFIX + "PORT"]) == defaults["port"]
    assert int(env[PREFIX + "METRICS_PORT"]) == defaults["metrics_port"]
    # in a container the server must listen on every interface, not the default loopback
    assert env[PREFIX + "HOST"] == "0.0.0.0"
    unknown = {k for k in env if k.startswith(PREFIX)} - SETTINGS_ENV
    assert not unknown, f"not ServerSettings fields (silently ignored): {unknown}"
    # the values load as settings (types, ranges), as the server reads them
    loaded = settings_from_env({k: v for k, v in env.items() if k.startswith(PREFIX)})
    assert (loaded.host, loaded.port) == ("0.0.0.0", defaults["port"])
    # exec form, the project's own script, the real `serve` command
    entrypoint = s.exec_form("ENTRYPOINT")
    assert entrypoint is not None
    script, *args = entrypoint
    assert PYPROJECT["project"]["scripts"][script] == "serving.cli.main:cli"
    assert args == ["serve"] and "serve" in cli.commands
    # HEALTHCHECK runs a script the image copies
    (check,) = s.all("HEALTHCHECK")
    script_path = re.search(r"(/opt/\S+\.py)", check)
    assert script_path and image_path_to_repo(s, script_path[1]).is_file(), check


@pytest.mark.parametrize(("name", "target"), [("cpu", "serve"), ("cpu", "ray"), ("gpu", "serve")])
def test_extras_exist_in_pyproject_and_bring_no_torch(
    dockerfiles: dict[str, list[Stage]], name: str, target: str
) -> None:
    stages = dockerfiles[name]
    venv = final_stage_with_venv(stages, target)
    extras = extras_installed(venv)
    optional = PYPROJECT["project"]["optional-dependencies"]
    assert extras == EXPECTED_EXTRAS[(name, target)], extras
    assert extras <= set(optional), f"extras not in pyproject.toml: {extras - set(optional)}"
    wanted = requirement_names(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        wanted |= requirement_names(optional[extra])
    assert "torch" not in wanted, "a serving image never installs torch"
    installed = [a for line in installs(venv) for a in re.findall(r"pip install ([^&]*)", line)]
    assert installed and not any("torch" in args for args in installed), installed
    # and the build itself fails if torch came in anyway (through some dependency)
    assert any("find_spec('torch')" in line for line in installs(venv))
    # pinned versions are ones pyproject.toml allows
    for package, version in pinned(venv).items():
        every = [*PYPROJECT["project"]["dependencies"], *chain.from_iterable(optional.values())]
        specs = [Requirement(r).specifier for r in every if same(Requirement(r).name, package)]
        assert specs, f"{package} is pinned but not a dependency in pyproject.toml"
        assert all(Version(version) in spec for spec in specs), (package, version, specs)


def test_python_versions_are_allowed_by_pyproject(dockerfiles: dict[str, list[Stage]]) -> None:
    allowed = SpecifierSet(PYPROJECT["project"]["requires-python"])
    cpu_base = stage(dockerfiles["cpu"], SERVE_STAGE)
    while cpu_base.parent is not None:
        cpu_base = cpu_base.parent
    cpu_python = re.match(r"python:(\d+\.\d+)", cpu_base.base)
    assert cpu_python and Version(cpu_python[1]) in allowed
    gpu_runs = " ".join(s.expand(r) for s in dockerfiles["gpu"] for r in s.all("RUN"))
    gpu_pythons = set(re.findall(r"python(3\.\d+)", gpu_runs))
    assert len(gpu_pythons) == 1, gpu_pythons  # the venv's python is the runtime's
    assert Version(gpu_pythons.pop()) in allowed


def test_gpu_image_has_the_cuda_and_tensorrt_providers(dockerfiles: dict[str, list[Stage]]) -> None:
    stages = dockerfiles["gpu"]
    build = final_stage_with_venv(stages, SERVE_STAGE)
    (line,) = [r for r in installs(build) if "onnxruntime-gpu" in r and ".[" in r]
    # onnxruntime (a base dependency) is removed and onnxruntime-gpu laid down again after it
    uninstall = line.index("pip uninstall -y onnxruntime")
    assert line.index("--force-reinstall") > uninstall
    assert "TensorrtExecutionProvider" in line and "CUDAExecutionProvider" in line
    # the TensorRT runtime in the final image is the build for the base image's CUDA
    serve = stage(stages, SERVE_STAGE)
    cuda = re.match(r"nvidia/cuda:(\d+\.\d+)", serve.base)
    trt = serve.all_args()["TENSORRT_VERSION"]
    assert cuda and trt.endswith(f"+cuda{cuda[1]}"), (serve.base, trt)
    runs = " ".join(serve.expand(r) for r in serve.all("RUN"))
    for package in ("libnvinfer10", "libnvinfer-plugin10", "libnvonnxparsers10"):
        assert f"{package}={trt}" in runs, package
    assert serve.env()[PREFIX + "PROVIDERS"] in ("auto", "tensorrt")


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_copied_paths_are_in_the_build_context(
    dockerfiles: dict[str, list[Stage]], name: str
) -> None:
    context = build_context(ROOT, DOCKER / f"{name}.Dockerfile.dockerignore")
    for s in dockerfiles[name]:
        for copy in s.all("COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _dest = [w for w in copy.split() if not w.startswith("--")]
            for src in sources:
                prefix = src.rstrip("/").removeprefix("./")
                assert any(f == prefix or f.startswith(prefix + "/") for f in context), (
                    f"{name}: COPY {src} finds nothing in the build context"
                )
    for never in NEVER_IN_CONTEXT:
        assert not any(f == never or f.startswith(never + "/") for f in context), never
    assert not any("__pycache__" in f or "/trt_cache/" in f for f in context)
    models = {p.parent.name for p in (ROOT / "models").glob("*/model.onnx")}
    assert {f.split("/")[1] for f in context if f.endswith("/model.onnx")} == models
    size = sum((ROOT / f).stat().st_size for f in context)
    assert size < 64 * 1024 * 1024, f"build context of {size / 2**20:.0f} MiB"


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_models_and_scripts_land_where_settings_and_manifests_look(
    dockerfiles: dict[str, list[Stage]], rendered: dict, name: str
) -> None:
    s = stage(dockerfiles[name], SERVE_STAGE)
    copies = dict(
        (src.rstrip("/"), dest.rstrip("/"))
        for c in s.inherited("COPY")
        if not c.startswith("--from=")
        for src, dest in [c.split()[-2:]]
    )
    assert copies["models"] == s.env()[PREFIX + "MODELS_DIR"]
    bin_dir = copies["deploy/docker/bin"]
    # every script a manifest runs from the image exists in deploy/docker/bin
    used = set()
    for objects in rendered.values():
        for obj in objects:
            for spec in pod_specs(obj):
                for c in spec.get("initContainers", []) + spec["containers"]:
                    for word in c.get("command", []) + c.get("args", []):
                        if word.startswith(bin_dir + "/"):
                            used.add(word)
    assert used, "the triton overlay runs scripts from the image"
    for path in used:
        assert (ROOT / "deploy/docker/bin" / Path(path).name).is_file(), path


def test_ray_image_matches_the_rayjob(dockerfiles: dict[str, list[Stage]], rendered: dict) -> None:
    build_ray = final_stage_with_venv(dockerfiles["cpu"], "ray")
    version = build_ray.all_args()["RAY_VERSION"]
    rayjob = find(rendered["batch"], "RayJob")
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == version
    # KubeRay runs `bash -lc` (a login shell resets PATH) and probes with wget
    ray = stage(dockerfiles["cpu"], "ray")
    runs = " ".join(ray.inherited("RUN"))
    assert "/etc/profile.d/" in runs and "/opt/venv/bin" in runs
    assert "wget" in " ".join(ray.all("RUN"))


# ----------------------------------------------------------------------------- helpers
def image_path_to_repo(s: Stage, image_path: str) -> Path:
    """The repository file a path inside the image was copied from."""
    for copy in s.inherited("COPY"):
        if copy.startswith("--from="):
            continue
        src, dest = copy.split()[-2:]
        if image_path.startswith(dest.rstrip("/") + "/"):
            return ROOT / src / image_path.removeprefix(dest.rstrip("/") + "/")
    raise AssertionError(f"{image_path} is not copied into the image")


def ignore_patterns(path: Path) -> list[tuple[bool, str]]:
    """(is_exception, pattern) in order, as Docker reads a .dockerignore."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        out.append((negate, pattern))
    return out


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match plus `**` (any number of folders), as Docker's patternmatcher."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def build_context(root: Path, dockerignore: Path) -> list[str]:
    """Files (relative, '/'-separated) Docker would send: the last matching pattern decides, and
    a pattern that matches a parent folder matches everything under it."""
    patterns = ignore_patterns(dockerignore)
    rules = [(negate, pattern_regex(p)) for negate, p in patterns]
    exceptions = [p for negate, p in patterns if negate]

    def excluded(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        verdict = False
        for negate, regex in rules:
            if any(regex.match(p) for p in prefixes):
                verdict = not negate
        return verdict

    def may_reinclude(rel_dir: str) -> bool:
        return any(p.startswith(rel_dir + "/") for p in exceptions)

    files: list[str] = []
    for folder, dirs, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        rel = "" if rel == "." else rel + "/"
        # never walk into a folder that is out and that no exception reaches into (.venv, .git)
        dirs[:] = [d for d in dirs if not excluded(rel + d) or may_reinclude(rel + d)]
        files += [rel + n for n in names if not excluded(rel + n)]
    return files
