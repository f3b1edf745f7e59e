# syntax=docker/dockerfile:1.7
#
# rarechange on an NVIDIA GPU: `rarechange serve` with ONNX Runtime's TensorRT and CUDA execution
# providers (RARECHANGE_PROVIDERS=auto picks TensorRT > CUDA > CPU), the bundled models, no torch.
# Build from the repository root:
#
#   docker build -f deploy/docker/gpu.Dockerfile -t rarechange-gpu:0.1.0 .
#
# One set of versions that go together (ONNX Runtime's TensorRT provider page, "Requirements"):
# onnxruntime-gpu 1.22 is built with CUDA 12.x, cuDNN 9 and TensorRT 10.9, hence the CUDA 12.8
# cuDNN runtime base and TensorRT 10.9 for CUDA 12.8 from NVIDIA's CUDA apt repository (configured
# in the base image). Move all three together. The host needs an NVIDIA driver for CUDA 12.8
# (>= 570) and the NVIDIA container toolkit (on Kubernetes: the GPU operator or device plugin).
# Ubuntu 24.04's Python is 3.12 (the CPU image runs 3.11; pyproject.toml allows both).

############################################################################ build: the venv
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving/ serving/
COPY export/ export/
COPY training/ training/
ARG EXTRAS=gpu
ARG ORT_GPU_VERSION=1.22.0
# onnxruntime (a base dependency) and onnxruntime-gpu both install the `onnxruntime` package, and
# whichever lands last wins file by file. Install both, remove the CPU one, then lay
# onnxruntime-gpu down again over what the removal took, and check that both GPU providers are
# compiled in (listing them needs no GPU).
RUN pip install ".[${EXTRAS}]" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && pip uninstall -y onnxruntime \
 && pip install --no-deps --force-reinstall "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && python -c "import importlib.util, sys; sys.exit('torch must not be in the serving image' if importlib.util.find_spec('torch') else 0)" \
 && python -c "import onnxruntime as ort, sys; need = {'TensorrtExecutionProvider', 'CUDAExecutionProvider'}; missing = need - set(ort.get_available_providers()); sys.exit(f'onnxruntime-gpu lacks {sorted(missing)}' if missing else 0)"

############################################################################ serve
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS serve
ARG TENSORRT_VERSION=10.9.0.34-1+cuda12.8
ENV DEBIAN_FRONTEND=noninteractive
# the Python the venv was made with, and the TensorRT runtime that ONNX Runtime's TensorRT
# provider loads (the inference library, its plugins and the ONNX parser)
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 \
      "libnvinfer10=${TENSORRT_VERSION}" \
      "libnvinfer-plugin10=${TENSORRT_VERSION}" \
      "libnvonnxparsers10=${TENSORRT_VERSION}" \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 rarechange \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin rarechange
# TensorRT engines are cached under /tmp/rarechange-trt-engines when the models folder is
# read-only (serving/backends/onnxruntime.py): /tmp is an emptyDir on Kubernetes. Engines built
# ahead with `rarechange export --tensorrt` (models/NAME/trt_cache) are loaded instead, but only on
# the GPU model and TensorRT version they were built with: see docs/deploy.md.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
    HOME=/tmp \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RARECHANGE_HOST=0.0.0.0 \
    RARECHANGE_PORT=50051 \
    RARECHANGE_METRICS_PORT=9090 \
    RARECHANGE_MODELS_DIR=/opt/rarechange/models \
    RARECHANGE_PROVIDERS=auto
COPY --from=build /opt/venv /opt/venv
COPY models/ /opt/rarechange/models/
COPY deploy/docker/bin/ /opt/rarechange/bin/
LABEL org.opencontainers.image.title="rarechange-gpu" \
      org.opencontainers.image.description="Rare change detection in image pairs: gRPC service (NVIDIA GPU: TensorRT, CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "/opt/rarechange/bin/healthcheck.py"]
ENTRYPOINT ["rarechange", "serve"]
