# AIBox production image: web (uvicorn), Celery workers and beat all run from it.
#
# CPU image (the default):
#   docker build -t aibox .
# GPU image: build on an NVIDIA CUDA *devel* base (nvcc and the CUDA headers are needed
# to compile llama.cpp's CUDA backend) and turn that backend on:
#   docker build -t aibox-gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-devel-ubuntu22.04 \
#     --build-arg CMAKE_ARGS=-DGGML_CUDA=on .
# docker-compose.yml does this for the worker-gpu service.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Extra CMake flags for llama-cpp-python's source build (e.g. -DGGML_CUDA=on).
ARG CMAKE_ARGS=""
# ARG, not ENV: only the build needs a non-interactive apt.
ARG DEBIAN_FRONTEND=noninteractive

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# build-essential + cmake: llama-cpp-python compiles llama.cpp from source.
# libgomp1: llama.cpp's CPU backend uses OpenMP at run time.
# The python:3.11 base ships Python 3.11; a CUDA (Ubuntu) base does not, so it gets
# Python 3.11 from the deadsnakes PPA (Ubuntu's own 3.11 is missing or a release candidate).
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake libgomp1 \
    && if ! command -v python3.11 >/dev/null 2>&1; then \
         apt-get install -y --no-install-recommends software-properties-common gpg-agent \
         && add-apt-repository -y ppa:deadsnakes/ppa \
         && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev; \
       fi \
    && rm -rf /var/lib/apt/lists/*

# A virtual environment keeps the same layout on both bases.
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app

# Dependencies first, in their own layer, so that a code change does not recompile
# llama.cpp (about 10 minutes). GGML_NATIVE=off: the image is built on one machine and
# runs on others, so target a portable CPU baseline (AVX2/FMA) and, with CUDA, ggml's
# list of GPU architectures instead of whatever the build machine has (a Docker build
# sees no GPU at all). A later -DGGML_NATIVE=on in CMAKE_ARGS overrides this.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --upgrade pip \
    && CMAKE_ARGS="-DGGML_NATIVE=off ${CMAKE_ARGS}" pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code, path by path: never the developer's .env (a secret key), .venv or var/.
COPY manage.py ./
COPY aibox/ aibox/
COPY apps/ apps/
COPY workers/ workers/
COPY templates/ templates/
COPY static/ static/
RUN pip install .

# Processes run from /app (settings.BASE_DIR: templates/, static/ and var/ live here).
# The throwaway key only satisfies settings for this one step; it is not in the
# image's environment and no running process uses it.
ARG COLLECTSTATIC_SECRET_KEY=collectstatic-build-step-only-not-a-runtime-secret
RUN AIBOX_SECRET_KEY="${COLLECTSTATIC_SECRET_KEY}" python manage.py collectstatic --no-input -v 0

# Non-root at run time. It may write var/ (first-run admin credentials, the beat
# schedule) and the artifact root; the code and the virtual environment stay root-owned.
# A fixed uid and gid (999, what --system gave on both bases), so that Kubernetes'
# runAsUser and the owners of existing volumes agree (deploy/kubernetes/).
RUN groupadd --system --gid 999 aibox \
    && useradd --system --uid 999 --gid aibox --home-dir /app --no-create-home --shell /usr/sbin/nologin aibox \
    && mkdir -p /app/var /var/lib/aibox/artifacts /var/lib/aibox/model-cache /var/lib/aibox/keys /var/lib/aibox/audit \
    && chown aibox:aibox /app/var /var/lib/aibox/artifacts /var/lib/aibox/model-cache /var/lib/aibox/keys /var/lib/aibox/audit
USER aibox

EXPOSE 8000
CMD ["uvicorn", "aibox.asgi:application", "--host", "0.0.0.0", "--port", "8000"]
