"""model_registry_sensor: registered models become partitions, and get tokenized.

Every tick reads the registry. Models that are not partitions yet are added to the `models` partition set, and
each model gets a tokenize run keyed by its tokenization settings: Dagster launches a run key only once, so a
model is tokenized when it first appears and again whenever its dataset, ctx_len, ... change in the registry.
Models removed from the registry keep their partitions (and history); delete those in the UI.
"""

import hashlib
import json

import dagster as dg

from .jobs import tokenize_job
from .partitions import model_partitions
from .registry import ModelEntry
from .resources import ModelRegistry


def tokenize_run_key(entry: ModelEntry) -> str:
    settings = json.dumps(entry.tokenization_settings(), sort_keys=True)
    return f"tokenize:{entry.name}:{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


@dg.sensor(
    job=tokenize_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds the registry's models as partitions and requests their tokenization.",
)
def model_registry_sensor(context: dg.SensorEvaluationContext, registry: ModelRegistry) -> dg.SensorResult:
    # A malformed registry raises here: the tick fails and shows the message (file, entry, field) in the UI.
    entries = list(registry.load())
    known = set(context.instance.get_dynamic_partitions(model_partitions.name))
    new = [e.name for e in entries if e.name not in known]
    if new:
        context.log.info(f"adding model partitions {new} from {registry.resolved_path}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=e.name, run_key=tokenize_run_key(e)) for e in entries],
        dynamic_partitions_requests=[model_partitions.build_add_request(new)] if new else [],
    )
