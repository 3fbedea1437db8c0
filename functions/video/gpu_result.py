"""The GPU endpoint's answers (events/sns_gpu_result.json: SNS notifications from its success
and error topics) → job records: `done` with the outputs, or `failed` with the error
(functions.common.gpu reads them).

A record that is not such a notification, or names no job of ours, is logged and dropped (a
retry would not help); an S3 or Redis error raises, and Lambda retries the event (the
updates are idempotent).
"""
from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from faceflow.media import JOB_ID
from functions.common import gpu
from functions.common.aws import Adapters, make_tracer
from functions.common.jobs import DONE

logger = Logger(service="faceflow-video")
tracer = make_tracer("faceflow-video")
metrics = Metrics(namespace="faceflow")

adapters = Adapters()


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # results name objects: not into traces
@metrics.log_metrics
def gpu_result_handler(event: dict, context: LambdaContext) -> dict:
    results = []
    for record in event.get("Records") or []:
        try:
            update = gpu.update_from_notification(record, s3=adapters.s3)
        except gpu.GpuError as exc:
            results.append(_ignored("not a GPU endpoint notification; dropped", reason=str(exc)))
            continue
        job_id, status = update.pop("job_id", None), update.pop("status")
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            results.append(_ignored("GPU notification without a job id of ours; dropped"))
            continue
        logger.append_keys(job_id=job_id)
        adapters.jobs.put(job_id, status, **update)
        metrics.add_metric(name="JobsDone" if status == DONE else "JobsFailed", unit=MetricUnit.Count, value=1)
        logger.info("GPU result recorded", extra={"status": status})
        results.append({"job_id": job_id, "status": status})
    return {"results": results}


def _ignored(message: str, **extra) -> dict:
    logger.error(message, extra=extra)
    metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
    return {"status": "ignored"}
