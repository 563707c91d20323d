# syntax=docker/dockerfile:1
# One image for the Squeeze API and the Celery worker.
#
# CPU (default):  docker build -t squeeze:cpu .
# CUDA worker:    docker build -t squeeze:cuda \
#                   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04 \
#                   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The base needs Python >= 3.11; on an Ubuntu base without it, python3.11 is installed from apt.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive

# A virtual environment, so the same steps work on python:*-slim and on CUDA (Ubuntu) bases.
RUN set -eux; \
    if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the chosen wheel index (CPU or CUDA); `pip install .` then accepts it as is.
RUN pip install --upgrade pip \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /srv/squeeze

COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY alembic.ini ./
COPY alembic ./alembic
RUN pip install . \
 && rm -rf build ./*.egg-info

RUN groupadd --system squeeze \
 && useradd --system --gid squeeze --create-home --home-dir /home/squeeze --shell /usr/sbin/nologin squeeze \
 && mkdir -p /data/artifacts /srv/squeeze/var \
 && chown -R squeeze:squeeze /data/artifacts /srv/squeeze/var

ENV SQUEEZE_STORAGE_ROOT=/data/artifacts \
    HF_HUB_OFFLINE=1

USER squeeze
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

CMD ["sh", "-c", "alembic upgrade head && uvicorn app.main:app --host 0.0.0.0 --port 8000"]
