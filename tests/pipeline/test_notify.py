"""The run-failure sensor reports a failed run through the `notifier` resource: here a WebhookNotifier
posting to a real HTTP server on 127.0.0.1. The failed run is a real one (training with no tokenized
dataset), in a real instance."""

import http.server
import json
import threading

import dagster as dg
import pytest

from sae_pipeline.assets import sae_checkpoints
from sae_pipeline.notify import WebhookNotifier
from sae_pipeline.sensors import notify_on_run_failure
from tests.support.pipeline import MODEL, materialize, resources_for, tiny_entry, write_registry


class Webhook:
    """An HTTP server on 127.0.0.1 that records the JSON bodies POSTed to it and answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the name http.server calls)
                owner.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-path"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def failed_run(tmp_path, tiny_model_dir, corpus_file):
    """A real failed run of tiny|2 (no tokenized dataset) in a real instance: (instance, run, its failure
    event)."""
    registry = write_registry(tmp_path / "models.yaml", tiny_entry(tiny_model_dir, corpus_file))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("models", [MODEL])
        result = materialize(
            [sae_checkpoints], f"{MODEL}|2", instance, resources_for(tmp_path / "artefacts", registry)
        )
        assert not result.success
        [failure] = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        yield instance, instance.get_run_by_id(result.run_id), failure.dagster_event


def sensor_context(failed_run, notifier) -> dg.RunFailureSensorContext:
    instance, run, event = failed_run
    return dg.build_run_status_sensor_context(
        sensor_name="notify_on_run_failure",
        dagster_event=event,
        dagster_instance=instance,
        dagster_run=run,
        resources={"notifier": notifier},
    ).for_run_failure()


def test_a_failed_run_is_reported_to_the_webhook_with_its_partition_and_reason(failed_run):
    webhook = Webhook()
    try:
        notify_on_run_failure(sensor_context(failed_run, WebhookNotifier(url=webhook.url)))
    finally:
        webhook.close()
    [body] = webhook.bodies
    run = failed_run[1]
    lines = body["text"].splitlines()
    assert lines[0] == f"sae_pipeline: run {run.run_id} of {run.job_name} failed ({MODEL}|2)"
    assert lines[1].startswith(f"- sae_checkpoints: no tokenized dataset for {MODEL} at "), lines


def test_a_webhook_that_fails_fails_the_tick_without_showing_its_url(failed_run):
    webhook = Webhook(status=500)
    try:
        with pytest.raises(RuntimeError, match="^the failure webhook answered HTTP 500$"):
            notify_on_run_failure(sensor_context(failed_run, WebhookNotifier(url=webhook.url)))
    finally:
        webhook.close()
    assert len(webhook.bodies) == 1
