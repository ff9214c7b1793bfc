# syntax=docker/dockerfile:1
# One image for the Ray head, the GPU workers and the RayJob submitter (see k8s/README.md).
#   docker build -t registry.example.com/your-team/framescribe:0.1.0 .
# RAY_VERSION must equal `rayVersion` in the k8s/ manifests (tests/test_k8s_manifests.py checks it).
ARG RAY_VERSION=2.52.0
# The -gpu variant carries CUDA; it also runs on CPU-only nodes (k8s/overlays/dev-cpu).
FROM rayproject/ray:${RAY_VERSION}-py311-gpu

ARG RAY_VERSION
# Ray images run as the non-root user `ray` (uid 1000, group users/100, HOME=/home/ray) with
# Python in /home/ray/anaconda3, which that user owns: pip needs no root.
USER ray
WORKDIR /home/ray/framescribe
COPY --chown=1000:100 . .
# Pin Ray to the base image's version so that pip cannot swap the Ray that KubeRay expects.
RUN pip install --no-cache-dir . "ray[data,default]==${RAY_VERSION}"

# Model cache; the k8s manifests mount a volume here.
ENV HF_HOME=/home/ray/.cache/huggingface \
    PYTHONUNBUFFERED=1
