#!/usr/bin/env bash
# The GPU checks and benchmarks in one run (a lent GPU machine's time is short):
#   bash benchmarks/gpu.sh [MODEL]          MODEL: a model name or folder (default: the embedded SmolLM2)
#   RANDOM_WEIGHTS_FROM=DIR bash benchmarks/gpu.sh   the architecture and tokenizer in DIR with random weights
# Runs the CUDA tests (tests/core/test_cuda.py) and the library tests that must still pass on a GPU machine, then
# sae_step and train_e2e on the GPU; the rows go to benchmarks/RESULTS.md. Each part runs even if one fails.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ==="; "$@" || { echo "!!! failed ($?): $*"; status=1; }; }

$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "benchmarks/gpu.sh: no CUDA GPU visible to torch; run it on a GPU machine" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'cuda', torch.version.cuda)"

MODEL=${1:-smollm2-135m}
if [ -n "${RANDOM_WEIGHTS_FROM:-}" ]; then
    MODEL=$(mktemp -d)/random-weights
    step $PY benchmarks/random_weights.py "$RANDOM_WEIGHTS_FROM" "$MODEL"
fi

step $PY -m pytest -q -p no:cacheprovider tests/core/test_cuda.py
step $PY -m pytest -q -p no:cacheprovider tests/core/test_sae.py tests/core/test_trainer.py tests/core/test_evaluate.py \
    tests/core/test_autocast.py tests/core/test_optim.py
step $PY benchmarks/sae_step.py --device cuda --profile
step $PY benchmarks/sae_step.py --device cuda --grad_w index_add
step $PY benchmarks/sae_step.py --device cuda --n 32768
step $PY benchmarks/train_e2e.py --device cuda --model "$MODEL" --tokens 262144
step $PY benchmarks/train_e2e.py --device cuda --model "$MODEL" --tokens 262144 --batch_size 32 --extra --dtype bfloat16 --autocast bfloat16
exit $status
