# syntax=docker/dockerfile:1
# Learner and rollout worker: ``python -m learner`` / ``python -m services.rollout``.
# CPU by default (the learner's fused torch path); the GPU variant takes the CUDA torch wheels and
# a C compiler, which Triton needs to build its kernel launchers at run time:
#   docker build -f docker/trainer.Dockerfile -t distill/trainer .
#   docker build -f docker/trainer.Dockerfile -t distill/trainer:cuda \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#       --build-arg SYSTEM_PACKAGES="gcc libc6-dev" .
# BASE_IMAGE must provide ``python`` (>= 3.11) with pip and apt-get (when SYSTEM_PACKAGES is set).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG SYSTEM_PACKAGES=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    HF_HOME=/models/hf-cache

RUN if [ -n "${SYSTEM_PACKAGES}" ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${SYSTEM_PACKAGES} \
        && rm -rf /var/lib/apt/lists/*; \
    fi

COPY pyproject.toml /tmp/build/pyproject.toml
COPY scripts/images.py /tmp/build/scripts/images.py
# torch first, from its own index (CPU or CUDA build); the rest from PyPI finds it satisfied.
RUN pip install --index-url "${TORCH_INDEX}" $(python /tmp/build/scripts/images.py requirements trainer --only torch) \
    && python /tmp/build/scripts/images.py requirements trainer > /tmp/build/requirements.txt \
    && pip install -r /tmp/build/requirements.txt \
    && rm -rf /tmp/build

# Named volumes copy these directories' ownership when first created: the learner can write.
RUN useradd --system --uid 10001 --create-home --home-dir /home/distill distill \
    && mkdir -p /runs /models/hf-cache /datasets \
    && chown -R distill:distill /runs /models /datasets
WORKDIR /app
COPY contracts /app/contracts
COPY kernels /app/kernels
COPY learner /app/learner
COPY proto /app/proto
COPY services /app/services

USER distill
CMD ["python", "-m", "learner", "--runs-dir", "/runs"]
