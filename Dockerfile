# The editor's image: uvicorn serving server.boot:app (which imports server.app:app in the background), weights mounted read-only at /app/weights.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

# A C++ compiler: the server compiles its decoders with AOTInductor in a child process (server/compiled.py,
# FACE_EDITOR_COMPILE=auto); without one they stay eager.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
# torch/torchvision pinned as in .ci/setup.sh; facenet-pytorch without its (torch<2.3) pins.
RUN pip install "torch==2.14.1" "torchvision==0.29.1" \
 && pip install --no-deps "facenet-pytorch==2.6.0"
# The serving image holds what serving needs: the project's dependencies (not the `train` extra) and
# the packages the app imports (models, server, frontend), not training/ (tests/test_deploy.py checks).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY models ./models
COPY server ./server
COPY frontend ./frontend
ENV PYTHONPATH=/app
RUN useradd --create-home --uid 10001 editor \
 && mkdir -p /app/weights /cache/decoders && chown editor /app/weights /cache/decoders
USER editor

ENV FACE_EDITOR_HOST=0.0.0.0 FACE_EDITOR_PORT=8000 FACE_EDITOR_WEIGHTS_DIR=/app/weights \
    FACE_EDITOR_COMPILE_CACHE_DIR=/cache/decoders
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"
CMD ["python", "-m", "uvicorn", "server.boot:app", "--host", "0.0.0.0", "--port", "8000"]
