# The loraplex image: one image, two commands. Default: `loraplex serve` (the GPU
# backend: gRPC on 50051, /metrics on 9400); `loraplex gateway ...` for the
# OpenAI-compatible gateway (the Helm chart sets the command of each pod).
#
#   podman build -t loraplex:0.1.0 .        # or: buildah bud / docker build
#   podman run --device nvidia.com/gpu=all -p 50051:50051 -p 9400:9400 loraplex:0.1.0
#
# The Helm chart's default image is loraplex:<appVersion>; push to your registry
# and set image.repository.
ARG CUDA_IMAGE=docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04

# -- the wheel --------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS wheel
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python3 -m venv /build && /build/bin/pip wheel --no-cache-dir --no-deps -w /dist .

# -- the runtime ------------------------------------------------------------------
FROM ${CUDA_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/loraplex PATH=/opt/loraplex/bin:$PATH
COPY --from=wheel /dist/ /tmp/dist/
# server extras (torch, transformers, ...), the gateway's (same image) and triton for the GPU kernels
RUN python3 -m venv "$VIRTUAL_ENV" \
 && pip install --no-cache-dir "$(ls /tmp/dist/loraplex-*.whl)[server,gateway,gpu]" \
 && rm -rf /tmp/dist \
 && loraplex --help >/dev/null
# a non-root user owning the model cache and the adapters directory
RUN useradd --create-home --uid 10001 --user-group loraplex \
 && mkdir -p /models /adapters && chown loraplex:loraplex /models /adapters
USER 10001:10001
ENV HF_HOME=/models PYTHONUNBUFFERED=1
WORKDIR /home/loraplex
EXPOSE 50051 9400 8000
ENTRYPOINT ["loraplex"]
CMD ["serve"]
