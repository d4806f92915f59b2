# syntax=docker/dockerfile:1
# Control plane image: FastAPI + uvicorn over Redis, and nothing of torch (the control plane never
# imports it; tests/test_compose.py imports its code with only this image's packages).
#   docker build -f docker/control.Dockerfile -t distill/control .      (context: the repo root)
#   docker run -e DISTILL_API_TOKEN=... -e DISTILL_REDIS_URL=redis://HOST:6379/0 -p 8000:8000 distill/control
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

# Versions come from pyproject.toml through scripts/images.py: one place pins them.
COPY pyproject.toml /tmp/build/pyproject.toml
COPY scripts/images.py /tmp/build/scripts/images.py
RUN python /tmp/build/scripts/images.py requirements control > /tmp/build/requirements.txt \
    && pip install -r /tmp/build/requirements.txt \
    && rm -rf /tmp/build

RUN useradd --system --uid 10001 --create-home --home-dir /home/distill distill
WORKDIR /app
COPY contracts /app/contracts
COPY proto /app/proto
COPY services/__init__.py /app/services/__init__.py
COPY services/control /app/services/control
COPY services/rpc /app/services/rpc

USER distill
EXPOSE 8000
CMD ["python", "-m", "services.control", "--host", "0.0.0.0", "--port", "8000"]
