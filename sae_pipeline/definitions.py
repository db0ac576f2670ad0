"""The Dagster code location: every definition of sae_pipeline, built in one place.

    dagster dev                                   (finds this module through pyproject's [tool.dagster])
    dagster job execute -m sae_pipeline.definitions -j tokenize_job --tags '{"dagster/partition":
    "smollm2-135m"}'

Importing this module is cheap (no torch): the assets import sae_core when they run.
"""

import os

import dagster as dg

from .assets import ALL_ASSETS
from .jobs import tokenize_job, train_job
from .notify import WEBHOOK_ENV, LogNotifier, WebhookNotifier
from .orphaned_pods import NAMESPACE_ENV, delete_orphaned_pods
from .resources import ArtefactStore, HubPublisher, ModelRegistry, TorchrunLauncher
from .schedules import retrain_schedule
from .sensors import model_registry_sensor, notify_on_run_failure, train_new_models


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources with their defaults from the environment; run config (-c config.yaml) overrides any
    field."""
    return {
        "artefacts": ArtefactStore(),
        "registry": ModelRegistry(),
        "launcher": TorchrunLauncher(),
        # The token is read from the environment when the run starts; the UI and the run config only ever show
        # {"env": "HF_TOKEN"}. Without HF_TOKEN the field stays empty (an unset EnvVar fails every run, even
        # the ones publishing to a local folder).
        "hub": HubPublisher(token=dg.EnvVar("HF_TOKEN") if os.environ.get("HF_TOKEN") else None),
        # Failed runs: to a webhook when its URL (a secret, like the token) is in the environment, else to the
        # sensor's log.
        "notifier": WebhookNotifier(url=dg.EnvVar(WEBHOOK_ENV))
        if os.environ.get(WEBHOOK_ENV)
        else LogNotifier(),
    }


defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[tokenize_job, train_job],
    schedules=[retrain_schedule],
    sensors=[
        model_registry_sensor,
        notify_on_run_failure,
        train_new_models,
        # On Kubernetes only: the training pods of runs that ended are deleted.
        *([delete_orphaned_pods] if os.environ.get(NAMESPACE_ENV) else []),
    ],
    resources=default_resources(),
)
