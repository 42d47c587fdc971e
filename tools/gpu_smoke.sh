#!/usr/bin/env bash
# Smoke run of training on every GPU torchrun is given (FSDP2, bf16), then save, resume and export;
# the options and what it prints: tools/gpu_smoke.py. Run from a clone after `make install`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" tools/gpu_smoke.py "$@"
