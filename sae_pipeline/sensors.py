"""Sensors. model_registry_sensor: registered models become partitions, and get tokenized.
notify_on_run_failure: every failed run of the code location is reported through the `notifier` resource.

Every tick reads the registry. Models that are not partitions yet are added to the `models` partition set, and
each model gets a tokenize run keyed by its tokenization settings: Dagster launches a run key only once, so a
model is tokenized when it first appears and again whenever its dataset, ctx_len, ... change in the registry.
Models removed from the registry keep their partitions (and history); delete those in the UI.
"""

import hashlib
import json

import dagster as dg

from .assets import published_saes, sae_checkpoints, sae_evaluation
from .jobs import tokenize_job
from .notify import Notifier
from .partitions import model_partitions
from .registry import ModelEntry
from .resources import ModelRegistry

_FAILURE_LINES = 3

# Declarative automation of the training assets (their `on_missing` conditions): a newly registered model's
# strides are trained, evaluated and published once, as soon as its tokenized dataset exists. Runs go through
# the instance's queue and the `gpu` pool like any other.
train_new_models = dg.AutomationConditionSensorDefinition(
    "train_new_models",
    target=dg.AssetSelection.assets(sae_checkpoints, sae_evaluation, published_saes),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Trains, evaluates and publishes the strides of a newly registered model once tokenized.",
)


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


@dg.run_failure_sensor(
    name="notify_on_run_failure",
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Reports every failed run (job, partition, the failed steps' first lines) through the "
    "`notifier` resource.",
)
def notify_on_run_failure(context: dg.RunFailureSensorContext, notifier: Notifier) -> None:
    # An error here (the webhook is down) fails the tick; the sensor's cursor stays, so the failure is
    # reported again on the next tick.
    notifier.send(failure_report(context), context.log)


def failure_report(context: dg.RunFailureSensorContext) -> str:
    """A few lines: which run failed, which partition, and why (the first lines of each failed step's
    error)."""
    run = context.dagster_run
    partition = run.tags.get("dagster/partition")
    where = f" ({partition})" if partition else ""
    lines = [f"sae_pipeline: run {run.run_id} of {run.job_name} failed{where}"]
    for event in context.get_step_failure_events():
        data = event.step_failure_data
        description = data.user_failure_data.description if data.user_failure_data else None
        message = description or (data.error.message if data.error else "") or "failed"
        first = message.strip().splitlines()[:_FAILURE_LINES]
        lines.append(f"- {event.step_key}: " + " / ".join(line.strip() for line in first))
    if len(lines) == 1 and context.failure_event.message:
        lines.append(f"- {context.failure_event.message.strip().splitlines()[0]}")
    return "\n".join(lines)
