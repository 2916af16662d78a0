#!/usr/bin/env bash
# Pack the Python packages a GPU machine without network lacks (ray, diffusers, pydantic, the Serve stack, redis)
# into one xz tarball that travels with the working tree: each wheel unzipped into one site folder, less what no
# role of this project imports (Ray's Java jar, RLlib, Ray LLM), so that it fits a 64 MiB transfer.
#
#   bash benchmarks/device_site.sh WHEEL_DIR OUT.tar.xz      # WHEEL_DIR: `pip download --no-deps` of the list below
#   (there)  mkdir -p /tmp/site && tar xJf OUT.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
#
# The list (versions of this repo's CI): ray==2.60.0 diffusers==0.42.1 pydantic==2.13.4 pydantic_core==2.46.4
# annotated-types typing-inspection fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 redis==8.1.0
# jsonschema==4.26.0 jsonschema-specifications referencing rpds-py importlib-metadata
set -euo pipefail
wheels=$1 out=$2
ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "no wheels in $wheels" >&2; exit 1; }
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$site"; done
rm -rf "$site"/ray/jars "$site"/ray/rllib "$site"/ray/llm
find "$site" -name __pycache__ -prune -exec rm -rf {} +
chmod +x "$site"/ray/core/src/ray/raylet/raylet "$site"/ray/core/src/ray/gcs/gcs_server  # zip drops the mode bits
tar cJf "$out" -C "$site" .
ls -la "$out"
