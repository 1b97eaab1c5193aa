# cvserve for a CUDA GPU host.
#
# The torch wheels pinned in requirements/torch.txt carry their own CUDA runtime, so the
# image needs no CUDA base: the host's NVIDIA driver is mounted in by the NVIDIA
# Container Toolkit (`docker run --gpus all ...`). Without a GPU the same image runs on the CPU.
# The environment is installed by the project's own scripts/bootstrap.sh -- the same
# script `make serve` and `make test` use -- not by a second recipe.
#
#   docker build -t cvserve .
#   docker run --gpus all -p 8001:8001 -p 8002:8002 cvserve
#   docker run --gpus all -v $PWD/repo:/models -p 8001:8001 cvserve --models /models/models.yaml
#
# The default torch is the registry's CUDA 13 build (NVIDIA driver >= 580). For an older
# driver pick a CUDA 12 build (see README, "GPU hosts"):
#   docker build --build-arg CVSERVE_TORCH_VARIANT=cu126 -t cvserve .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHON=python3.11 \
    CVSERVE_EXTRAS=ray \
    CVSERVE_HOME=/var/lib/cvserve

# make: the README's commands; libglib2.0-0: OpenCV's one system dependency; gcc and
# libc6-dev: the install compiles cvserve's CPU RoIAlign and NMS kernels (models/instance/
# _roi_align.c, _nms.c, plain C; without them the install still succeeds and torchvision's
# kernels run instead).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make libglib2.0-0 ca-certificates gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin cvserve \
    && install -d -o cvserve -g cvserve /var/lib/cvserve

WORKDIR /opt/cvserve
COPY --chown=cvserve:cvserve . .
USER cvserve
# Passed to scripts/bootstrap.sh as environment variables (empty: the registry's build).
ARG CVSERVE_TORCH_VARIANT=""
ARG CVSERVE_TORCH_INDEX=""
ARG CVSERVE_TORCH_REQUIREMENTS=""
RUN bash scripts/bootstrap.sh

# The embedded demo models (built from synthetic data; a few minutes on a GPU, ~12 on a
# 2-core CPU). Build with --build-arg BUILD_DEMO=0 to serve only your own repository.
ARG BUILD_DEMO=1
RUN if [ "$BUILD_DEMO" = "1" ]; then .venv/bin/cvserve demo build; fi

# gRPC (cvserve.v1, Open Inference Protocol, health, reflection) and Prometheus metrics.
EXPOSE 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD [".venv/bin/cvserve", "health", "--server", "127.0.0.1:8001"]
ENTRYPOINT [".venv/bin/cvserve", "serve", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "8002"]
