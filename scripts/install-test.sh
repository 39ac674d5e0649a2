#!/usr/bin/env bash
# Creates .venv with the CPU build of torch (pinned: an unpinned torch pulls CUDA packages)
# and the package with its test-only reference implementations.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test,server]'
