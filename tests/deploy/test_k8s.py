"""deploy/k8s: every overlay renders, validates against the Kubernetes schemas, and says only
what the real service, its settings, its CLI and its images can back.

Core kinds are validated by kubernetes-validate against one Kubernetes version. The custom
resources (ServiceMonitor, PrometheusRule: Prometheus Operator; RayJob: KubeRay) have no schema
there: they are checked structurally, field by field, for what their operators need, and the pod
templates a RayJob embeds are validated as core PodTemplates.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import click
import grpc
import kubernetes_validate
import pytest
import yaml
from conftest import (
    K8S,
    KUBERNETES_VERSION,
    ROOT,
    LiveServer,
    configmap_env,
    find,
    pod_specs,
)
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2

from serving import __version__
from serving.backends.onnxruntime import read_verified_model
from serving.cli.main import cli
from serving.config import ServerSettings
from serving.server import SERVICE_NAME

PREFIX = ServerSettings.model_config["env_prefix"]
SETTINGS_ENV = {PREFIX + name.upper() for name in ServerSettings.model_fields}
GATEWAY_OVERLAYS = ("cpu", "gpu", "triton")
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "RayJob"}
# the bundled models, as the images carry them: metadata name -> metadata
MODELS = {
    m.name: m
    for m in (read_verified_model(p)[1] for p in sorted((ROOT / "models").glob("*/model.onnx")))
}


# ----------------------------------------------------------------------------- helpers
def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ('500m', '3Gi', '2', '1e9') as a number (cores or bytes)."""
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in binary.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    if text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def gateway(objects: tuple[dict, ...]) -> tuple[dict, dict]:
    """The gateway Deployment and its `rarechange` container."""
    deployment = find(objects, "Deployment", "rarechange")
    (container,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "rarechange"
    ]
    return deployment, container


def port_of(container: dict, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


def probes(container: dict) -> dict[str, dict]:
    return {
        k: container[k]
        for k in ("startupProbe", "readinessProbe", "livenessProbe")
        if k in container
    }


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def containers_of(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def settings_env(objects: tuple[dict, ...], container: dict, image_env: dict[str, str]) -> dict:
    return {**image_env, **configmap_env(objects, container)}


@pytest.fixture(scope="module")
def image_env(dockerfiles: dict) -> dict[str, dict[str, str]]:
    from conftest import SERVE_STAGE, stage

    return {name: stage(stages, SERVE_STAGE).env() for name, stages in dockerfiles.items()}


def image_env_for(overlay: str, image_env: dict[str, dict[str, str]]) -> dict[str, str]:
    return image_env["gpu" if overlay == "gpu" else "cpu"]


# ----------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("name", ["cpu", "gpu", "triton", "batch", "monitoring"])
def test_every_kustomization_renders(rendered: dict, name: str) -> None:
    objects = rendered[name]
    assert objects, f"{name} renders nothing"
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicates in {name}"
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        "rarechange"
    }, "every object lands in the rarechange namespace"


def all_objects(rendered: dict) -> list[tuple[str, dict]]:
    namespace = yaml.safe_load((K8S / "namespace.yaml").read_text())
    return [("namespace.yaml", namespace)] + [(n, o) for n, objs in rendered.items() for o in objs]


def test_every_object_validates_against_the_kubernetes_schemas(rendered: dict) -> None:
    custom: set[str] = set()
    checked = 0
    for source, obj in all_objects(rendered):
        where = f"{source}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            custom.add(obj["kind"])
            continue
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is invalid for Kubernetes {KUBERNETES_VERSION}: {exc.message}")
        checked += 1
    # only the custom resources are left to the structural checks below
    assert custom == CUSTOM_KINDS, custom
    assert checked >= 25


def test_rayjob_pod_templates_validate_as_core_pod_templates(rendered: dict) -> None:
    rayjob = find(rendered["batch"], "RayJob")
    spec = rayjob["spec"]
    templates = [spec["rayClusterSpec"]["headGroupSpec"]["template"]]
    templates += [g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]]
    templates.append(spec["submitterPodTemplate"])
    for i, template in enumerate(templates):
        wrapped = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"rayjob-{i}", "namespace": "rarechange"},
            "template": template,
        }
        kubernetes_validate.validate(wrapped, KUBERNETES_VERSION, strict=True)


def test_custom_resources_have_what_their_operators_need(rendered: dict) -> None:
    seen = set()
    for _, obj in all_objects(rendered):
        kind, spec = obj["kind"], obj.get("spec", {})
        if kind == "ServiceMonitor":
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert spec["selector"]["matchLabels"]
            for endpoint in spec["endpoints"]:
                assert isinstance(endpoint["port"], str), "a named Service port"
                assert endpoint["path"] == "/metrics"
                assert quantity_s(endpoint["scrapeTimeout"]) < quantity_s(endpoint["interval"])
        elif kind == "PrometheusRule":
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            for group in spec["groups"]:
                assert group["name"] and group["rules"]
                for rule in group["rules"]:
                    assert isinstance(rule["expr"], str)
                    assert ("alert" in rule) != ("record" in rule)
        elif kind == "RayJob":
            assert obj["apiVersion"] == "ray.io/v1"
            assert isinstance(spec["entrypoint"], str)
            assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
            assert spec["shutdownAfterJobFinishes"] is True
            assert isinstance(spec["ttlSecondsAfterFinished"], int)
            cluster = spec["rayClusterSpec"]
            assert isinstance(cluster["rayVersion"], str)
            groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
            for group in groups:
                # KubeRay passes these to `ray start` as strings; numbers are refused
                params = group["rayStartParams"]
                assert all(isinstance(v, str) for v in params.values()), params
                assert group["template"]["spec"]["containers"][0]["image"]
            for group in cluster["workerGroupSpecs"]:
                assert group["groupName"]
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        else:
            continue
        seen.add(kind)
    assert seen == CUSTOM_KINDS


def quantity_s(duration: str) -> float:
    return float(duration[:-1]) * {"s": 1, "m": 60, "h": 3600}[duration[-1]]


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "triton", "batch"])
def test_images_are_the_release(rendered: dict, overlay: str) -> None:
    for obj in rendered[overlay]:
        for spec in pod_specs(obj):
            for c in containers_of(spec):
                image = c["image"]
                name, _, tag = image.rpartition("/")[2].partition(":")
                assert tag and tag != "latest", image
                if name.startswith("rarechange"):
                    assert tag == __version__, f"{image}: the release is {__version__}"
                assert c["imagePullPolicy"] == "IfNotPresent"  # justified in checkov-skips.yaml


# ----------------------------------------------------------------------------- the gateway
@pytest.mark.parametrize("overlay", GATEWAY_OVERLAYS)
def test_gateway_settings_are_real_settings_and_load(
    rendered: dict,
    image_env: dict,
    settings_from_env: Callable[[dict[str, str]], ServerSettings],
    overlay: str,
) -> None:
    objects = rendered[overlay]
    deployment, container = gateway(objects)
    env = settings_env(objects, container, image_env_for(overlay, image_env))
    unknown = {k for k in env if k.startswith(PREFIX)} - SETTINGS_ENV
    assert not unknown, f"not ServerSettings fields (the server would ignore them): {unknown}"
    secret_env = {v["name"] for v in container.get("env", []) if "valueFrom" in v}
    assert secret_env <= SETTINGS_ENV, secret_env
    settings = settings_from_env({k: v for k, v in env.items() if k.startswith(PREFIX)})
    # where the image put the models (its own RARECHANGE_MODELS_DIR), not overridden elsewhere
    assert str(settings.models_dir) == image_env_for(overlay, image_env)[PREFIX + "MODELS_DIR"]
    assert settings.default_model in MODELS
    # ports: container ports, probes and Service target ports are the settings' ports
    assert port_of(container, "grpc") == settings.port
    assert port_of(container, "metrics") == settings.metrics_port
    for name, probe in probes(container).items():
        assert set(probe) & {"grpc", "exec", "tcpSocket"} == {"grpc"}, name
        assert probe["grpc"]["port"] == settings.port, name
        assert probe["grpc"].get("service", "") in ("", SERVICE_NAME), name
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(probes(container))
    # no replicas field: the HPA owns the count
    assert "replicas" not in deployment["spec"]


def test_the_probes_get_serving_from_the_real_server(
    live_server: LiveServer, rendered: dict
) -> None:
    """The cpu overlay's probes, as the kubelet sends them (service name, timeout), against
    `rarechange serve` started with the overlay's settings; its port is the probes' port
    (test_gateway_settings_are_real_settings_and_load), here on a free one."""
    _, container = gateway(rendered["cpu"])
    for name, probe in probes(container).items():
        assert probe["grpc"]["port"] == live_server.configured_port
        with grpc.insecure_channel(live_server.address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                timeout=probe["timeoutSeconds"],
            )
        assert response.status == health_pb2.HealthCheckResponse.SERVING, name


def test_startup_probe_covers_loading_and_warm_up(live_server: LiveServer, rendered: dict) -> None:
    def budget(container: dict) -> float:
        p = container["startupProbe"]
        return p.get("initialDelaySeconds", 0) + p["periodSeconds"] * p["failureThreshold"]

    cpu = budget(gateway(rendered["cpu"])[1])
    # measured here (2 CPUs, other work running) from process start to SERVING
    assert cpu >= 3 * live_server.startup_s, (cpu, live_server.startup_s)
    # TensorRT builds engines before SERVING: the GPU pods get far longer
    assert budget(gateway(rendered["gpu"])[1]) >= 5 * cpu
    for overlay in GATEWAY_OVERLAYS:
        _, c = gateway(rendered[overlay])
        live = c["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 30, "lenient while busy"
        assert c["readinessProbe"]["timeoutSeconds"] < c["readinessProbe"]["periodSeconds"]


@pytest.mark.parametrize("overlay", GATEWAY_OVERLAYS)
def test_drain_fits_in_the_termination_grace_period(
    rendered: dict, image_env: dict, overlay: str
) -> None:
    objects = rendered[overlay]
    deployment, container = gateway(objects)
    env = settings_env(objects, container, image_env_for(overlay, image_env))
    grace = float(env.get(PREFIX + "GRACE_S", ServerSettings.model_fields["grace_s"].default))
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    total = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pause >= 5, "endpoints need a few seconds to drop the pod"
    assert total >= pause + grace + 5, (total, pause, grace)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", GATEWAY_OVERLAYS)
def test_resources_fit_the_settings(
    rendered: dict,
    image_env: dict,
    settings_from_env: Callable[[dict[str, str]], ServerSettings],
    overlay: str,
) -> None:
    objects = rendered[overlay]
    _, container = gateway(objects)
    env = settings_env(objects, container, image_env_for(overlay, image_env))
    s = settings_from_env({k: v for k, v in env.items() if k.startswith(PREFIX)})
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    for key in ("cpu", "memory"):
        assert quantity(requests[key]) <= quantity(limits[key]), key
    if s.backend == "onnxruntime" and s.providers == "cpu":
        # ONNX Runtime's threads never outnumber the CPUs the pod may use
        assert s.instances * s.intra_op_threads <= quantity(limits["cpu"])
    # a full queue holds at most a quarter of the memory limit (each patch pair is 2 x C x P x P
    # values of the model's input type)
    bytes_per_pair = max(
        2 * m.channels * m.patch_size**2 * {"uint8": 1, "uint16": 2, "float32": 4}[m.input_dtype]
        for m in MODELS.values()
    )
    assert s.max_queue_size * bytes_per_pair <= quantity(limits["memory"]) / 4
    # the largest image allowed, tiled at the default model's stride, fits the queue
    stride = MODELS[s.default_model].recommended_stride
    assert math.ceil(math.sqrt(s.max_pixels) / stride) ** 2 <= s.max_queue_size
    assert s.max_batch_size <= s.max_queue_size


def test_cpu_memory_fits_the_measured_server(live_server: LiveServer, rendered: dict) -> None:
    _, container = gateway(rendered["cpu"])
    if not live_server.peak_rss_bytes:
        pytest.skip("no /proc/PID/status here to read the server's peak memory")
    request = quantity(container["resources"]["requests"]["memory"])
    assert request >= 1.5 * live_server.peak_rss_bytes, (request, live_server.peak_rss_bytes)


def test_gpu_overlay_asks_for_a_gpu_on_gpu_nodes(rendered: dict) -> None:
    for overlay, name in (("gpu", "rarechange"), ("triton", "rarechange-triton")):
        deployment = find(rendered[overlay], "Deployment", name)
        spec = deployment["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert (
            c["resources"]["requests"]["nvidia.com/gpu"]
            == c["resources"]["limits"]["nvidia.com/gpu"]
        )
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
    # the triton overlay's gateway needs no GPU
    _, container = gateway(rendered["triton"])
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    # and the gpu overlay insists on TensorRT (no silent fall-back to the CPU)
    _, container = gateway(rendered["gpu"])
    env = configmap_env(rendered["gpu"], container)
    assert env[PREFIX + "PROVIDERS"] in ("tensorrt", "cuda")


# ----------------------------------------------------------------------------- security
def test_every_pod_runs_restricted(rendered: dict) -> None:
    """Pod Security 'restricted', as the namespace enforces, plus a read-only root with /tmp."""
    namespace = yaml.safe_load((K8S / "namespace.yaml").read_text())
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = 0
    for _, obj in all_objects(rendered):
        for spec in pod_specs(obj):
            pods += 1
            ctx = spec["securityContext"]
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 10000
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
            assert spec["automountServiceAccountToken"] is False
            assert spec.get("serviceAccountName"), "its own ServiceAccount, not `default`"
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for c in containers_of(spec):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
                tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{c['name']}: /tmp"
                assert c["resources"]["requests"] and c["resources"]["limits"]
    assert pods >= 7


@pytest.mark.parametrize("overlay", GATEWAY_OVERLAYS)
def test_services_select_the_pods_and_ports_they_name(rendered: dict, overlay: str) -> None:
    objects = rendered[overlay]
    workloads = [o for o in objects if o["kind"] == "Deployment"]
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        targets = [
            w for w in workloads if selects(selector, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)}"
        names = {
            p["name"]
            for c in targets[0]["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, (service["metadata"]["name"], port)
    headless = find(objects, "Service", "rarechange-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    # each ServiceMonitor endpoint reaches exactly one Service port: no pod is scraped twice
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        for endpoint in monitor["spec"]["endpoints"]:
            hits = [
                s
                for s in objects
                if s["kind"] == "Service"
                and selects(selector, s["metadata"]["labels"])
                and endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}
            ]
            assert len(hits) == 1, (
                monitor["metadata"]["name"],
                [h["metadata"]["name"] for h in hits],
            )
    # the gateway's metrics Service port leads to the settings' metrics port
    _, container = gateway(objects)
    service = find(objects, "Service", "rarechange")
    (metrics,) = [p for p in service["spec"]["ports"] if p["name"] == "metrics"]
    assert port_of(container, metrics["targetPort"]) == port_of(container, "metrics")


@pytest.mark.parametrize("overlay", GATEWAY_OVERLAYS)
def test_disruption_budget_and_network_policy(rendered: dict, overlay: str) -> None:
    objects = rendered[overlay]
    deployment, container = gateway(objects)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = find(objects, "PodDisruptionBudget", "rarechange")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["maxUnavailable"] == 1
    policy = find(objects, "NetworkPolicy", "rarechange")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {"grpc", "metrics"}
    assert {p["name"] for p in container["ports"]} >= allowed


# ----------------------------------------------------------------------------- autoscaling
@pytest.mark.parametrize("overlay", GATEWAY_OVERLAYS)
def test_hpa_scales_on_queue_time_with_cpu_as_fallback(rendered: dict, overlay: str) -> None:
    objects = rendered[overlay]
    hpa = find(objects, "HorizontalPodAutoscaler", "rarechange")
    spec = hpa["spec"]
    target = spec["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "rarechange")
    assert 1 <= spec["minReplicas"] < spec["maxReplicas"]
    kinds = [m["type"] for m in spec["metrics"]]
    assert kinds == ["Pods", "Resource"], "queue time first, CPU as the fallback"
    pods = spec["metrics"][0]["pods"]
    assert pods["metric"]["name"] == adapter_metric_name()
    assert pods["target"]["type"] == "AverageValue" and quantity(pods["target"]["averageValue"]) > 0
    cpu = spec["metrics"][1]["resource"]
    assert cpu["name"] == "cpu" and 50 <= cpu["target"]["averageUtilization"] <= 90
    up, down = spec["behavior"]["scaleUp"], spec["behavior"]["scaleDown"]
    assert up["stabilizationWindowSeconds"] < down["stabilizationWindowSeconds"]
    assert down["stabilizationWindowSeconds"] >= 300, "a new pod pays warm-up: do not flap"
    assert all(p["value"] > 0 and p["periodSeconds"] <= 60 for p in up["policies"])
    assert max(p["value"] for p in down["policies"] if p["type"] == "Percent") <= 50
    # CPU utilisation needs CPU requests
    _, container = gateway(objects)
    assert quantity(container["resources"]["requests"]["cpu"]) > 0


def adapter_metric_name() -> str:
    values = yaml.safe_load((ROOT / "deploy/monitoring/prometheus-adapter.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule["name"]["as"]


# ----------------------------------------------------------------------------- triton
def test_triton_overlay_wires_gateway_triton_and_the_model_repository(
    rendered: dict, image_env: dict, tmp_path: Path
) -> None:
    objects = rendered["triton"]
    _, container = gateway(objects)
    env = settings_env(objects, container, image_env["cpu"])
    assert env[PREFIX + "BACKEND"] == "triton"
    host, _, port = env[PREFIX + "TRITON_URL"].rpartition(":")
    service = find(objects, "Service", host)
    (grpc_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    triton = find(objects, "Deployment", "rarechange-triton")
    spec = triton["spec"]["template"]["spec"]
    assert selects(service["spec"]["selector"], triton["spec"]["template"]["metadata"]["labels"])
    (server,) = spec["containers"]
    flags = {k: v for k, _, v in (a.removeprefix("--").partition("=") for a in server["args"])}
    assert port_of(server, grpc_port["targetPort"]) == int(flags["grpc-port"])
    assert port_of(server, "http") == int(flags["http-port"])
    assert port_of(server, "metrics") == int(flags["metrics-port"])
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[name]["httpGet"]["port"] == "http"
    drain = server["lifecycle"]["preStop"]["sleep"]["seconds"] + int(flags["exit-timeout-secs"])
    assert spec["terminationGracePeriodSeconds"] >= drain + 5
    # the gateway waits for this Triton with the models it will serve
    (wait,) = gateway(objects)[0]["spec"]["template"]["spec"]["initContainers"]
    wait_args = cli_args(wait["command"])
    assert wait_args["--url"] == env[PREFIX + "TRITON_URL"]
    assert wait_args["--models-dir"] == env[PREFIX + "MODELS_DIR"]
    # the init container writes the repository where tritonserver reads it
    (init,) = spec["initContainers"]
    init_args = cli_args(init["command"])
    assert init_args["--models-dir"] == env[PREFIX + "MODELS_DIR"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    server_mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    (volume,) = [n for n, path in mounts.items() if path == init_args["--out"]]
    assert server_mounts[volume] == flags["model-repository"]
    assert init["image"] == container["image"], "Triton's models come from the gateway's image"
    # Triton batches what the gateway's batcher sends
    assert int(init_args["--max-batch-size"]) == int(env[PREFIX + "MAX_BATCH_SIZE"])
    assert int(init_args["--max-queue-delay-us"]) == int(env[PREFIX + "MAX_QUEUE_DELAY_US"])
    # run the init container's command on this checkout's models: Triton's own ModelConfig
    # protobuf parses every config, under the names the gateway asks for
    out = tmp_path / "repository"
    here = {
        image_env["cpu"][PREFIX + "MODELS_DIR"]: str(ROOT / "models"),
        init_args["--out"]: str(out),
    }
    command = [here.get(w, w) for w in init["command"]]
    command[1] = str(ROOT / "deploy/docker/bin" / Path(command[1]).name)
    done = subprocess.run(
        [sys.executable, *command[1:]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    configs = {}
    for path in sorted(out.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        configs[config.name] = config
        assert (path.parent / "1" / "model.onnx").is_file()
    assert set(configs) == set(MODELS)
    for config in configs.values():
        assert config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == int(init_args["--max-batch-size"])
        assert [g.kind for g in config.instance_group] == [
            model_config_pb2.ModelInstanceGroup.KIND_GPU
        ]
    # the network lets the gateway reach Triton's gRPC port and nothing else reach it
    egress = find(objects, "NetworkPolicy", "rarechange")["spec"]["egress"]
    triton_labels = triton["spec"]["template"]["metadata"]["labels"]
    assert any(
        selects(peer.get("podSelector", {}).get("matchLabels", {"-": "-"}), triton_labels)
        and {"port": int(flags["grpc-port"]), "protocol": "TCP"} in rule["ports"]
        for rule in egress
        for peer in rule["to"]
    )
    triton_policy = find(objects, "NetworkPolicy", "rarechange-triton")
    gateway_labels = gateway(objects)[0]["spec"]["template"]["metadata"]["labels"]
    (from_gateway,) = [
        r for r in triton_policy["spec"]["ingress"] if any("podSelector" in p for p in r["from"])
    ]
    assert selects(from_gateway["from"][0]["podSelector"]["matchLabels"], gateway_labels)


def cli_args(command: list[str]) -> dict[str, str]:
    """--flag value pairs of a command line."""
    return {a: b for a, b in pairwise(command) if a.startswith("--")}


# ----------------------------------------------------------------------------- batch
def score_params(args: list[str]) -> dict[str, Any]:
    """Parse with the real `rarechange score` command (unknown flags and bad values raise)."""
    score = cli.commands["score"]
    return score.make_context("score", list(args)).params


def test_the_scoring_job_runs_a_real_score_command(rendered: dict) -> None:
    objects = rendered["batch"]
    job = find(objects, "Job", "rarechange-score")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["rarechange"]
    sub, *args = container["args"]
    assert sub == "score"
    params = score_params(args)
    assert params["engine"] == "local" and params["resume"] is True
    assert params["workers"] * params["threads"] <= quantity(
        container["resources"]["limits"]["cpu"]
    )
    mounted_on_pvc(spec, container, [params["manifest"], params["out"]], objects)
    # usage errors (click's exit code) fail the Job at once, evictions are not held against it
    assert spec["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert fail[0]["onExitCodes"]["values"] == [click.UsageError.exit_code]
    assert fail[0]["onExitCodes"]["containerName"] == container["name"]
    assert any(r["action"] == "Ignore" for r in rules)
    policy = find(objects, "NetworkPolicy", "rarechange-score")
    assert selects(
        policy["spec"]["podSelector"]["matchLabels"], job["spec"]["template"]["metadata"]["labels"]
    )
    assert policy["spec"]["ingress"] == [] and policy["spec"]["egress"] == []


def test_the_rayjob_runs_a_real_score_command_that_fits_its_cluster(rendered: dict) -> None:
    objects = rendered["batch"]
    rayjob = find(objects, "RayJob")
    program, sub, *args = shlex.split(rayjob["spec"]["entrypoint"])
    assert (program, sub) == ("rarechange", "score")
    params = score_params(args)
    assert params["engine"] == "ray" and params["ray_address"] == "auto"
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the driver's pod takes no actors"
    capacity = 0
    for group in cluster["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        cpus = int(group["rayStartParams"]["num-cpus"])
        assert cpus <= quantity(c["resources"]["limits"]["cpu"])
        # each actor runs ONNX Runtime on --threads threads: no oversubscription of a pod
        assert cpus * params["threads"] <= quantity(c["resources"]["limits"]["cpu"])
        capacity += cpus * group["minReplicas"]
    assert params["workers"] <= capacity, "every actor (num_cpus=1) finds a CPU"
    for group in [head, *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        (c,) = spec["containers"]
        mounted_on_pvc(spec, c, [params["manifest"], params["out"]], objects)
        volumes = {v["name"]: v for v in spec["volumes"]}
        (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
        store = float(group["rayStartParams"]["object-store-memory"])
        assert store < quantity(volumes[shm["name"]]["emptyDir"]["sizeLimit"])


def mounted_on_pvc(spec: dict, container: dict, paths: list[Path], objects: tuple) -> None:
    """Every path lies on a volume from a claim of this overlay (shared, not the pod's disk)."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for path in paths:
        mounts = [
            m for m in container["volumeMounts"] if str(path).startswith(m["mountPath"] + "/")
        ]
        assert mounts, f"{path} is on no volume"
        claim = volumes[mounts[0]["name"]].get("persistentVolumeClaim", {}).get("claimName")
        assert claim in claims, f"{path} is not on the overlay's claim"
    (pvc,) = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "Ray's pods mount it at once"


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "triton", "batch"])
def test_every_rarechange_variable_anywhere_is_a_setting(rendered: dict, overlay: str) -> None:
    for obj in rendered[overlay]:
        names: set[str] = set()
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("rarechange-settings"):
            names |= set(obj["data"])
        for spec in pod_specs(obj):
            for c in containers_of(spec):
                names |= {v["name"] for v in c.get("env", [])}
        unknown = {n for n in names if n.startswith(PREFIX)} - SETTINGS_ENV
        assert not unknown, f"{obj['kind']}/{obj['metadata']['name']}: {unknown}"
