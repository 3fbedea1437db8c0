"""A whole video's merge on its own, for replays (events/merge.json: `{"job_id", "force"}`):
normally the chunk worker that completes the last chunk merges (functions.common.videojobs).
Without "force" a merged job is left as it is; with it, the merge runs again and rewrites the
same bytes.
"""
from __future__ import annotations

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.utilities.typing import LambdaContext

from faceflow.media import JOB_ID
from functions.common.aws import make_tracer
from functions.common.videojobs import replay_merge

logger = Logger(service="faceflow-video")
tracer = make_tracer("faceflow-video")
metrics = Metrics(namespace="faceflow")


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # results name objects: not into traces
@metrics.log_metrics
def merge_handler(event: dict, context: LambdaContext) -> dict:
    job_id = event.get("job_id")
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise ValueError("event must be {\"job_id\": <32 hex>}")
    logger.append_keys(job_id=job_id)
    return replay_merge(job_id, context, force=bool(event.get("force")))
