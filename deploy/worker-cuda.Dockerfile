# spindle worker for NVIDIA GPUs, with flash-attn (built here: PyPI has only its sdist).
#   docker build -f deploy/worker-cuda.Dockerfile -t spindle-worker-cuda:0.1.0 .
# The model comes from a volume: SPINDLE_MODEL names a Hugging Face folder or .gguf inside it.
FROM nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04 AS build

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
        python3.11-dev git && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/spindle
ENV PATH=/opt/spindle/bin:$PATH
RUN pip install torch==2.13.0 packaging==26.4 ninja==1.13.0 wheel
# flash-attn compiles against the torch above; MAX_JOBS bounds the build's memory.
RUN MAX_JOBS=4 pip install --no-build-isolation flash-attn==2.8.3.post2

WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY gateway ./gateway
COPY worker ./worker
RUN pip install . && rm -rf /app/common /app/gateway /app/worker

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 \
        && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/spindle /opt/spindle
ENV PATH=/opt/spindle/bin:$PATH

RUN useradd --create-home --uid 10001 spindle
USER spindle

ENV SPINDLE_DEVICE=cuda \
    SPINDLE_METRICS_PORT=9400
EXPOSE 9400

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['SPINDLE_METRICS_PORT'], timeout=4)"]

CMD ["python", "-m", "worker"]
