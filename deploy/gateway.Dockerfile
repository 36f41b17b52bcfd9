# spindle gateway: FastAPI + Redis client + tokenizers. No torch: transformers is used only for
# its tokenizer classes, which work without it. Build from the repository root:
#   docker build -f deploy/gateway.Dockerfile -t spindle-gateway:0.1.0 .
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The gateway's real dependencies, pinned (the versions the test suite runs with); its own
# package goes in with --no-deps below, so torch and the weight loaders never enter the image.
RUN pip install \
        fastapi==0.165.0 \
        starlette==1.10.0 \
        uvicorn==0.54.0 \
        sse-starlette==3.7.0 \
        pydantic==2.14.4 \
        redis==5.3.1 \
        hiredis==3.5.0 \
        prometheus-client==0.26.0 \
        transformers==5.24.0 \
        tokenizers==0.23.3 \
        jinja2==3.1.6

WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY gateway ./gateway
COPY worker ./worker
RUN pip install --no-deps . && rm -rf /app/common /app/gateway /app/worker

RUN useradd --create-home --uid 10001 spindle
USER spindle

ENV SPINDLE_HOST=0.0.0.0 \
    SPINDLE_PORT=8000
EXPOSE 8000

# /health is 200 only when Redis answers and some worker is alive.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SPINDLE_PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "gateway"]
