"""A whole video uploaded under `uploads/` in the input bucket (events/video_upload.json): routed
to the GPU endpoint, or cut into chunks for the chunk workers (functions.common.splitting); one
under `analyze/`: analysed, its report written; a face swap's manifest under `swap/`
(events/s3_swap_manifest.json): functions.common.swapjobs. The job id comes from the key, as for
photos.
"""
from __future__ import annotations

from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import S3Event, event_source
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.common.aws import make_tracer, object_identity, operation_for_key
from functions.common.settings import SWAP
from functions.common.splitting import split_upload
from functions.common.swapjobs import is_manifest_key, run_manifest
from functions.common.videoruntime import runtime

logger = Logger(service="faceflow-video")
tracer = make_tracer("faceflow-video")
metrics = Metrics(namespace="faceflow")


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # results name objects: not into traces
@metrics.log_metrics(capture_cold_start_metric=True)
@event_source(data_class=S3Event)
def split_handler(event: S3Event, context: LambdaContext) -> dict:
    results = []
    for record in event.records:
        # S3's request id of the upload ties these lines to S3's own logs and CloudTrail
        logger.set_correlation_id((record.get("responseElements") or {}).get("x-amz-request-id"))
        obj = record.s3.get_object
        key = unquote_plus(obj["key"])
        operation = operation_for_key(key)
        # under swap/ only a manifest starts work: a target or source photo never does by itself
        if record.s3.bucket.name != runtime.settings.input_bucket or operation is None or \
                operation == SWAP and not is_manifest_key(key):
            logger.error("event from outside the input bucket's upload prefixes (or a swap upload that is not "
                         "a manifest); ignored")
            metrics.add_metric(name="EventsIgnored", unit=MetricUnit.Count, value=1)
            results.append({"status": "ignored"})
            continue
        upload = object_identity(record.s3.bucket.name, obj["key"], obj.version_id, obj.etag)
        results.append(run_manifest(upload) if is_manifest_key(upload["key"]) else split_upload(upload))
    return {"results": results}
