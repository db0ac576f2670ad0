#!/usr/bin/env bash
# The GPU checks and benchmarks in one run (a lent GPU machine's time is short):
#   bash benchmarks/gpu.sh [MODEL]          MODEL: a model name or folder (default: the embedded SmolLM2)
#   RANDOM_WEIGHTS_FROM=DIR bash benchmarks/gpu.sh   the architecture and tokenizer in DIR with random weights
#   GPU_PARTS=kernels bash benchmarks/gpu.sh         only the Triton kernels' tests and the side by side (issue 17)
# Runs the CUDA tests (tests/core/test_cuda.py) and the library tests that must still pass on a GPU machine, then
# sae_step and train_e2e on the GPU; the rows go to benchmarks/RESULTS.md. Each part runs even if one fails.
#
# Issue 17's side by side: our torch step, our Triton step (--kernels triton, compiled: the kernel tests run
# first; the fused encode/decode backward and the fused decoder update, whose time sae_step prints as "update
# ms") and EleutherAI sparsify 1.3.3's step (benchmarks/sparsify_step.py) at the same shapes, dtypes and dead
# fractions, with peak memory; fp32 with TF32 (--tf32) for all three; the default optimizer's fused step; then
# end to end with --kernels triton. The GPU image has torch 2.11,
# transformers, pyarrow, triton and pytest but not sparsify's pure-Python wheels: carry them, uncommitted, in
# tmp/wheels (git ignores /tmp/) and pass SPARSIFY_WHEELS=tmp/wheels; made on any machine with
#   pip download --no-deps --python-version 3.12 --only-binary=:all: -d tmp/wheels eai-sparsify==1.3.3 \
#       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 simple-parsing==0.1.9 docstring-parser==0.18.0 \
#       gguf==0.19.0 schedulefree==1.4.1 natsort==8.4.0
# (1.3 MB; multiprocess's wheel is per Python version). eai-sparsify and datasets also need accelerate, einops,
# xxhash, pandas and fsspec: the import check below names any the image lacks.
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

if [ -n "${SPARSIFY_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps "$SPARSIFY_WHEELS"/*.whl || echo "!!! could not install $SPARSIFY_WHEELS"
fi
$PY -c "import sparsify" 2>&1 | tail -1 | sed 's/^/sparsify import: /'

MODEL=${1:-smollm2-135m}
if [ -n "${RANDOM_WEIGHTS_FROM:-}" ]; then
    MODEL=$(mktemp -d)/random-weights
    step $PY benchmarks/random_weights.py "$RANDOM_WEIGHTS_FROM" "$MODEL"
fi

kernels() {  # issue 17: the same shapes, dtypes and dead fractions for the three steps
    step $PY -m pytest -q -p no:cacheprovider tests/core/test_triton_kernels.py
    local small="--n 4096 --d 576 --expansion 32 --k 32 --dead 0 0.05 0.3"
    local big="--n 8192 --d 4096 --expansion 32 --k 32 64 192 --dead 0 0.05 0.3 --repeat 2"
    for impl in "sae_step.py --kernels torch" "sae_step.py --kernels triton" "sparsify_step.py"; do
        step $PY benchmarks/$impl $small
        step $PY benchmarks/$impl $big
        step $PY benchmarks/$impl --n 4096 --d 576 --expansion 32 --k 32 --dtypes fp32 --tf32  # --tf32
    done
    # The default optimizer's fused decoder step (the rows above use Adam, as sparsify's step does): its
    # "update ms" against the torch passes'.
    for impl in "sae_step.py --kernels torch" "sae_step.py --kernels triton"; do
        step $PY benchmarks/$impl $small --optimizer schedule_free_adam
    done
    step $PY benchmarks/train_e2e.py --device cuda --model "$MODEL" --tokens 262144 --extra --kernels triton
}
if [ "${GPU_PARTS:-all}" = kernels ]; then
    kernels
    exit $status
fi

step $PY -m pytest -q -p no:cacheprovider tests/core/test_cuda.py
step $PY -m pytest -q -p no:cacheprovider tests/core/test_sae.py tests/core/test_trainer.py tests/core/test_evaluate.py \
    tests/core/test_autocast.py tests/core/test_optim.py
step $PY benchmarks/sae_step.py --device cuda --profile
step $PY benchmarks/sae_step.py --device cuda --grad_w index_add
step $PY benchmarks/sae_step.py --device cuda --n 32768
step $PY benchmarks/train_e2e.py --device cuda --model "$MODEL" --tokens 262144
step $PY benchmarks/train_e2e.py --device cuda --model "$MODEL" --tokens 262144 --batch_size 32 --extra --dtype bfloat16 --autocast bfloat16
kernels
exit $status
