# syntax=docker/dockerfile:1
# Teacher and reward services: ``python -m services.teacher`` / ``python -m services.reward``.
# torch for the CPU by default; for a GPU teacher build with the CUDA wheels (and vLLM if wanted):
#   docker build -f docker/services.Dockerfile -t distill/services .
#   docker build -f docker/services.Dockerfile -t distill/services:cuda \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg EXTRA_PIP=vllm .
# BASE_IMAGE must provide ``python`` (>= 3.11) with pip; the CUDA wheels bring their own CUDA
# runtime, the host's NVIDIA driver comes in through the container toolkit.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# extra pip requirements, e.g. "vllm" for the teacher's vllm backend
ARG EXTRA_PIP=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    HF_HOME=/models/hf-cache

COPY pyproject.toml /tmp/build/pyproject.toml
COPY scripts/images.py /tmp/build/scripts/images.py
# torch first, from its own index (CPU or CUDA build); the rest from PyPI finds it satisfied.
RUN pip install --index-url "${TORCH_INDEX}" $(python /tmp/build/scripts/images.py requirements services --only torch) \
    && python /tmp/build/scripts/images.py requirements services > /tmp/build/requirements.txt \
    && pip install -r /tmp/build/requirements.txt ${EXTRA_PIP} \
    && rm -rf /tmp/build

# Named volumes copy these directories' ownership when first created: the services can write.
RUN useradd --system --uid 10001 --create-home --home-dir /home/distill distill \
    && mkdir -p /models/hf-cache \
    && chown -R distill:distill /models
WORKDIR /app
COPY contracts /app/contracts
COPY proto /app/proto
COPY services /app/services

USER distill
EXPOSE 50051 50061
CMD ["python", "-m", "services.reward", "--host", "0.0.0.0", "--port", "50061"]
