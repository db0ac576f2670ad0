"""Notifiers: where the run-failure sensor (sae_pipeline.sensors) reports a failed run.

A notifier is a resource with a `send(text, log)` method. Two come with the pipeline: `LogNotifier` (the
default: the sensor's tick log, nothing leaves the machine) and `WebhookNotifier` (POSTs {"text": ...}, which
Slack, Mattermost and most chat "incoming webhooks" accept). Another channel is a subclass with its own
`send`, set as the `notifier` resource in sae_pipeline.definitions.
"""

import json
import logging
import urllib.error
import urllib.request

import dagster as dg
from pydantic import Field

WEBHOOK_ENV = "SAE_PIPELINE_FAILURE_WEBHOOK"


class Notifier(dg.ConfigurableResource):
    """Reports a failed run somewhere. Subclass and override `send` for another channel."""

    def send(self, text: str, log: logging.Logger | dg.DagsterLogManager) -> None:
        raise NotImplementedError


class LogNotifier(Notifier):
    """Writes the report to the sensor's log (the UI shows it on the sensor's tick)."""

    def send(self, text: str, log: logging.Logger | dg.DagsterLogManager) -> None:
        log.warning(text)


class WebhookNotifier(Notifier):
    """POSTs {"text": report} as JSON to a webhook URL (Slack, Mattermost, a chat bridge)."""

    url: str = Field(description=f"The webhook URL; a secret: set it from the environment ({WEBHOOK_ENV}).")
    timeout_s: float = Field(
        default=10.0, gt=0, description="Give up on the webhook after this many seconds."
    )

    def send(self, text: str, log: logging.Logger | dg.DagsterLogManager) -> None:
        body = json.dumps({"text": text}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as error:
            # Not the URL: a webhook URL holds its secret. The tick fails, so the sensor tries again.
            raise RuntimeError(f"the failure webhook answered HTTP {error.code}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise RuntimeError(f"the failure webhook is unreachable: {reason}") from None
        log.info("run failure reported to the webhook")
