# CPU image by default: torch comes from PyTorch's CPU wheel index (no CUDA libraries).
# For CUDA, build on a CUDA runtime base and take torch from the matching CUDA index, e.g.:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t pesc-serve:cuda .
# (TORCH_INDEX= with an empty value uses PyPI's default wheel; TORCH_SPEC pins the version.)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PESC_SERVE_CACHE=/opt/pesc-cache

# g++ compiles the CPU kernels (pesc_serve/csrc) on the first start, for the CPU the
# container runs on (-march=native), into $PESC_SERVE_CACHE: mount a volume there to keep
# them across restarts.  Without a compiler the server still runs, on slower PyTorch paths.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-dev python3-venv python3-pip make g++ \
        && rm -rf /var/lib/apt/lists/*; \
    else \
        apt-get update && apt-get install -y --no-install-recommends make g++ && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY pesc_serve ./pesc_serve
COPY training ./training

# Same install path as `make serve` (creates /app/.venv).
RUN make install PYTHON=python3 TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX="${TORCH_INDEX}"

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["/app/.venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# SIGTERM drains running requests (--shutdown-timeout, 30 s) and exits 0: stop with `docker stop -t 40`.
ENTRYPOINT ["/app/.venv/bin/python", "-m", "pesc_serve"]
CMD ["--model", "camelidae", "--host", "0.0.0.0", "--port", "8000"]
