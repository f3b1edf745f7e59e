# syntax=docker/dockerfile:1.7
#
# rarechange on the CPU: `rarechange serve` with ONNX Runtime in-process, the bundled models, no
# torch. Build from the repository root (the context is the checkout; BuildKit reads
# cpu.Dockerfile.dockerignore beside this file, so only what is copied below is sent):
#
#   docker build -f deploy/docker/cpu.Dockerfile -t rarechange:0.1.0 .                # serve
#   docker build -f deploy/docker/cpu.Dockerfile --target ray -t rarechange-ray:0.1.0 .  # KubeRay
#
# Targets: `serve` (the last stage, the default) and `ray` (the same install plus Ray, for the
# RayJob of deploy/k8s/overlays/batch). The serving image also carries the `triton` extra, so the
# same image is the gateway of the triton overlay. tests/deploy/test_docker.py checks this file
# against pyproject.toml and the service's settings.

############################################################################ build: the venv
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving/ serving/
COPY export/ export/
COPY training/ training/
# extras from pyproject.toml; train and export (torch) never go in a serving image
ARG EXTRAS=triton
RUN pip install ".[${EXTRAS}]" \
 && python -c "import importlib.util, sys; sys.exit('torch must not be in the serving image' if importlib.util.find_spec('torch') else 0)"

FROM build AS build-ray
# must equal rayVersion in deploy/k8s/overlays/batch/rayjob.yaml (checked by tests/deploy)
ARG RAY_VERSION=2.60.0
RUN pip install ".[ray]" "ray[default]==${RAY_VERSION}"

############################################################################ runtime: shared
FROM python:3.11-slim-bookworm AS runtime
# a fixed numeric id: Kubernetes can only verify runAsNonRoot for a numeric user
RUN groupadd --system --gid 10001 rarechange \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin rarechange \
 && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/rarechange-venv.sh
# HOME and every scratch file under /tmp: the only writable path (an emptyDir on Kubernetes,
# where the root filesystem is read-only). The RARECHANGE_* values are the container's defaults;
# the ConfigMap of deploy/k8s overrides them. HOST: a container must listen on every interface.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
    HOME=/tmp \
    RARECHANGE_HOST=0.0.0.0 \
    RARECHANGE_PORT=50051 \
    RARECHANGE_METRICS_PORT=9090 \
    RARECHANGE_MODELS_DIR=/opt/rarechange/models
COPY models/ /opt/rarechange/models/
COPY deploy/docker/bin/ /opt/rarechange/bin/
LABEL org.opencontainers.image.title="rarechange" \
      org.opencontainers.image.description="Rare change detection in image pairs: gRPC service (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"

############################################################################ ray (KubeRay)
FROM runtime AS ray
# KubeRay's default probes on Ray pods run wget; its command is `bash -lc` (bash is in the base)
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build-ray /opt/venv /opt/venv
USER 10001:10001

############################################################################ serve (default)
FROM runtime AS serve
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
# gRPC (rarechange.v1, grpc.health.v1, reflection, KServe v2) and Prometheus /metrics
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/rarechange/bin/healthcheck.py"]
ENTRYPOINT ["rarechange", "serve"]
