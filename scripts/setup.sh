#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with the CPU build of torch and the workbench
# (editable, with the test and distributed (Ray) extras), Debian's chromium + chromedriver for the browser tests, and a C
# compiler (gcc) for the exact attention pass's fused CPU loop (kernels/csrc; torch ops without it).
# Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# The CPU wheel of exactly this version is what installs here; a looser range would pull CUDA builds.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,distributed]"

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "note: missing ${missing[*]}: the browser tests need chromium + chromedriver, and the fast CPU" \
         "exact pass needs gcc (apt-get install ${missing[*]})" >&2
  fi
fi
echo "setup done: .venv ready"
