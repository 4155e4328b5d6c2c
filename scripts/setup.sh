#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with the CPU build of torch and the workbench
# (editable, with test extras), and Debian's chromium + chromedriver for the browser tests.
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
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"

if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: chromium + chromedriver are missing; the browser tests need them (apt-get install chromium chromium-driver)" >&2
  fi
fi
echo "setup done: .venv ready"
