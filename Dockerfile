# CPU image by default. For CUDA, build on a CUDA runtime base that has Python 3.10+, e.g.:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 -t pesc-serve:cuda .
# (the Makefile's pinned torch wheel is then replaced by the matching CUDA build via TORCH_SPEC).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PESC_SERVE_CACHE=/opt/pesc-cache

RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip make && rm -rf /var/lib/apt/lists/*; \
    elif ! command -v make >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY pesc_serve ./pesc_serve
COPY training ./training

# Same install path as `make serve` (creates /app/.venv).
RUN make install PYTHON=python3 TORCH_SPEC="${TORCH_SPEC}"

EXPOSE 8000
ENTRYPOINT ["/app/.venv/bin/python", "-m", "pesc_serve"]
CMD ["--model", "camelidae", "--host", "0.0.0.0", "--port", "8000"]
