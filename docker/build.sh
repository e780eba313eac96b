#!/bin/sh
# Build the Portal image: the project's wheels outside (pip wheel, which may use PyPI), then the image
# with `pip install --no-index` inside (no PyPI needed). Extra arguments go to `build`, for example
#   docker/build.sh --build-arg BASE=localhost/debian-python:bookworm
# ENGINE (podman or docker), IMAGE (default portal:latest) and PYTHON (default python3, the same minor
# version as the base image's Python) may be set.
set -eu
cd "$(dirname "$0")/.."
ENGINE="${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}"
IMAGE="${IMAGE:-portal:latest}"
PYTHON="${PYTHON:-python3}"
rm -rf docker/wheels
"$PYTHON" -m pip wheel --quiet --wheel-dir docker/wheels .
rm -rf build
# HEALTHCHECK is part of the docker image format only (podman builds OCI by default).
format=""
[ "$(basename "$ENGINE")" = podman ] && format="--format=docker"
exec "$ENGINE" build $format --file docker/Dockerfile --tag "$IMAGE" "$@" docker
