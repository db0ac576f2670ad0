"""retrain_schedule: retrain, evaluate and publish every registered model at every stride, on a cron.

Off by default (a full retraining costs hours of GPU time): turn it on in the UI. The cron comes from
$SAE_PIPELINE_RETRAIN_CRON (default: Sundays at 03:00 UTC).
"""

import os

import dagster as dg

from .jobs import train_job
from .partitions import ModelStride, model_partitions, stride_partitions
from .resources import ModelRegistry

RETRAIN_CRON_ENV = "SAE_PIPELINE_RETRAIN_CRON"
DEFAULT_RETRAIN_CRON = "0 3 * * 0"


@dg.schedule(
    job=train_job,
    cron_schedule=os.environ.get(RETRAIN_CRON_ENV) or DEFAULT_RETRAIN_CRON,
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="One train -> evaluate -> publish run per registered model x stride.",
)
def retrain_schedule(context: dg.ScheduleEvaluationContext, registry: ModelRegistry):
    partitions = set(context.instance.get_dynamic_partitions(model_partitions.name))
    strides = [int(s) for s in stride_partitions.get_partition_keys()]
    tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
    requests = []
    for entry in registry.load():
        if entry.name not in partitions:
            # The sensor adds it (and tokenizes it) on its next tick; training before that would have no data.
            context.log.warning(f"{entry.name} is in the registry but not a partition yet: skipped this time")
            continue
        for stride in strides:
            if entry.strides is None or stride in entry.strides:
                key = ModelStride(entry.name, stride)
                run_key = f"retrain:{key.partition_key}:{tick}"
                requests.append(dg.RunRequest(partition_key=key.partition_key, run_key=run_key))
    if not requests:
        return dg.SkipReason("no registered model is a partition yet (the model_registry_sensor adds them)")
    return requests
