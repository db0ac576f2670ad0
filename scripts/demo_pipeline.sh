#!/usr/bin/env bash
# The pipeline end to end from the command line, on the embedded SmolLM2-135M (no network, no UI, no daemon):
# register the model as a partition, tokenize the embedded corpus, train SAEs with torchrun (2 ranks on CPU),
# evaluate them against the registry's thresholds, publish them with a model card to a local folder.
#
#   bash scripts/install.sh && bash scripts/demo_pipeline.sh      # STRIDE=2 bash scripts/demo_pipeline.sh ...
#
# State goes to $DAGSTER_HOME (default ./.dagster_home) and artefacts to $SAE_PIPELINE_ROOT (default ./artefacts).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=smollm2-135m
STRIDE="${STRIDE:-4}"
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}"
export SAE_PIPELINE_ROOT="${SAE_PIPELINE_ROOT:-$PWD/artefacts}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
mkdir -p "$DAGSTER_HOME"
[[ -f "$DAGSTER_HOME/dagster.yaml" ]] || printf 'telemetry:\n  enabled: false\n' > "$DAGSTER_HOME/dagster.yaml"

python -m sae_pipeline register
dagster job execute -m sae_pipeline.definitions -j tokenize_job \
  --tags "{\"dagster/partition\": \"$MODEL\"}"
dagster job execute -m sae_pipeline.definitions -j train_evaluate_publish_job \
  -c sae_pipeline/configs/cpu_2ranks.yaml \
  --tags "{\"dagster/partition\": \"$MODEL|$STRIDE\", \"dagster/partition/model\": \"$MODEL\", \"dagster/partition/stride\": \"$STRIDE\"}"

published="$SAE_PIPELINE_ROOT/published/$MODEL/stride-$STRIDE"
echo
echo "published SAEs: $published"
echo "model card:     $published/README.md"
echo
cat "$published/README.md"
