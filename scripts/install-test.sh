#!/usr/bin/env bash
# Creates .venv with the CPU build of torch (pinned: an unpinned torch pulls CUDA packages)
# and the package with its test-only reference implementations, and installs Debian's
# chromium and its WebDriver for the browser test of the web page (tests/test_browser.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        chromium chromium-driver fonts-liberation
fi
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[test,server]'
