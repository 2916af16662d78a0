#!/usr/bin/env bash
# Pack the Python packages a GPU machine without network lacks (ray, diffusers, pydantic, the Serve stack, redis)
# into one xz tarball that travels with the working tree: each wheel unzipped into one site folder, less what no
# role of this project imports (Ray's Java jar, RLlib, Ray LLM), so that it fits a 64 MiB transfer (42 MB).
#
#   bash benchmarks/device_site.sh /tmp/w312 .whl/site.tar.xz   # downloads the wheels first when the folder has none
#   (there)  mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
#
# PACKAGES: the versions of this repo's CI; the ones the H200 image lacked on 2026-12-04 (it has torch 2.11,
# transformers 5.17, peft 0.21, accelerate, aiohttp, numpy …), plus grpcio and protobuf at the versions Ray and
# grpcio-reflection were tested with. PY: the machine's Python (3.12 there).
set -euo pipefail
wheels=$1 out=$2
PACKAGES="ray==2.60.0 diffusers==0.42.1 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.8.0
typing-inspection==0.4.5 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 redis==8.1.0 jsonschema==4.26.0
jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 importlib-metadata==10.2.0
opentelemetry-api==1.45.2 grpcio-reflection==1.85.1 grpcio==1.85.3 protobuf==7.36.2"
if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
  mkdir -p "$wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PY:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$wheels" $PACKAGES
fi
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$site"; done
rm -rf "$site"/ray/jars "$site"/ray/rllib "$site"/ray/llm
find "$site" -name __pycache__ -prune -exec rm -rf {} +
chmod +x "$site"/ray/core/src/ray/raylet/raylet "$site"/ray/core/src/ray/gcs/gcs_server  # zip drops the mode bits
tar cJf "$out" -C "$site" .
ls -la "$out"
