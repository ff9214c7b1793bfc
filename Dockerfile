# syntax=docker/dockerfile:1
# One image for the Ray head, its fetch-model init container and the GPU workers (see k8s/README.md).
#   docker build -t registry.example.com/your-team/framescribe:0.1.0 .
# RAY_VERSION must equal `rayVersion` in the k8s/ manifests (tests/test_k8s_manifests.py checks it).
# No separate submitter image: the RayJobs use HTTPMode (the KubeRay operator submits over HTTP, no
# submitter pod), and the nightly launcher only needs kubectl (k8s/base/cronjob-rayjob.yaml).
ARG RAY_VERSION=2.52.0
# CUDA of the base image; torch below is installed from the wheel index of the same CUDA, so that
# pip cannot pull a torch built for another CUDA (or replace the image's). It also runs on CPU-only
# nodes (k8s/overlays/dev-cpu).
ARG CUDA=cu121
FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA}

ARG RAY_VERSION
ARG CUDA
ARG TORCH_VERSION=2.5.1
ARG TORCHVISION_VERSION=0.20.1
# Ray images run as the non-root user `ray` (uid 1000, group users/100, HOME=/home/ray) with
# Python in /home/ray/anaconda3, which that user owns: pip needs no root.
USER ray
WORKDIR /home/ray/framescribe

# 1. Dependencies only (a layer that changes when pyproject.toml does, not on every source edit).
#    Ray is pinned to the base image's version so that pip cannot swap the Ray that KubeRay expects.
COPY --chown=1000:100 pyproject.toml ./
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        --index-url "https://download.pytorch.org/whl/${CUDA}" \
 && python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
open('/tmp/requirements.txt', 'w').write('\n'.join(deps))" \
 && pip install --no-cache-dir -r /tmp/requirements.txt "ray[data,default]==${RAY_VERSION}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && rm /tmp/requirements.txt

# 2. The source (.dockerignore keeps outputs, caches and .git out); no dependency resolution here.
COPY --chown=1000:100 . .
RUN pip install --no-cache-dir --no-deps .

# Model cache; the k8s manifests mount the shared model volume at /models and point both here.
ENV HF_HOME=/models/huggingface \
    FRAMESCRIBE_CACHE=/models/framescribe \
    PYTHONUNBUFFERED=1
