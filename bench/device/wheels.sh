#!/usr/bin/env bash
# Run HERE (not on the device): downloads the wheels the device image lacks into .cache/whl (ignored), for
# `carry: [".cache/whl"]`. The device has jax 0.11.2, flax, numpy, tokenizers, jinja2, ...; not these.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .cache/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .cache/whl \
  gguf platformdirs fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection openai \
  distro jiter sniffio
du -sh .cache/whl
