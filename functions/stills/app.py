"""S3 upload of a photo → anonymised photo + JSON sidecar in the output bucket; under the
analysis prefix (analyze/) the JSON report alone, with each face's attributes
(faceflow.analysis.DEFAULT_ATTRIBUTES).

Idempotent per upload (bucket + key + version/etag) through Powertools' Redis persistence
layer: S3 delivers events at least once, and a repeat returns the first result without
writing again. If Redis is unreachable the invocation fails (Lambda retries) rather than
running without that guarantee.
"""
from __future__ import annotations

import json
import time

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import S3Event, event_source
from aws_lambda_powertools.utilities.idempotency import idempotent_function
from aws_lambda_powertools.utilities.typing import LambdaContext

from faceflow import media, review
from faceflow.engine import Engine
from faceflow.images import BadInput
from faceflow.analysis import DEFAULT_ATTRIBUTES
from functions.common.aws import Adapters, job_for_key, make_tracer, object_identity, operation_for_key, result_keys
from functions.common.jobs import DONE, FAILED, RUNNING
from functions.common.review import edited_report
from functions.common.settings import ANALYZE, SWAP

logger = Logger(service="faceflow-stills")
tracer = make_tracer("faceflow-stills")
metrics = Metrics(namespace="faceflow", service="faceflow-stills")

adapters = Adapters()
engine = Engine()  # models load once per execution environment, at init



@idempotent_function(data_keyword_argument="upload", config=adapters.idempotency_config,
                     persistence_store=adapters.idempotency_store)
def process_upload(upload: dict, size: int | None) -> dict:
    job_id, name = job_for_key(upload["bucket"], upload["key"], upload["version"])
    logger.append_keys(job_id=job_id)  # ids only: no keys, faces or pixels in logs
    jobs, settings = adapters.jobs, adapters.settings
    operation = operation_for_key(upload["key"])
    jobs.put(job_id, RUNNING, input=f"s3://{upload['bucket']}/{upload['key']}", operation=operation)
    start = time.perf_counter()
    try:
        data = _read(upload, size, settings.max_upload_bytes)
        edited = edited_report(jobs.get(job_id))
        if edited is not None and operation != ANALYZE:  # reviewed: exactly its faces, no detection
            result = review.render_photo(data, edited, source=name, memory_bytes=settings.memory_bytes)
            report = result.report
        elif operation == ANALYZE:
            result = None
            report = engine.analyze_bytes(data, source=name, attributes=DEFAULT_ATTRIBUTES,
                                          memory_bytes=settings.memory_bytes)
        else:
            result = engine.anonymize_bytes(data, source=name, memory_bytes=settings.memory_bytes)
            report = result.report
    except BadInput as exc:
        jobs.put(job_id, FAILED, error=str(exc))
        metrics.add_metric(name="JobsFailed", unit=MetricUnit.Count, value=1)
        logger.warning("upload refused", extra={"reason": str(exc)})
        return {"job_id": job_id, "status": FAILED, "error": str(exc)}
    image_key, sidecar_key = result_keys(job_id, name)
    report = {"job_id": job_id, **report, "source": name}
    s3 = adapters.s3
    outputs = {}
    if result is not None:  # analysis writes no media
        s3.put_object(Bucket=settings.output_bucket, Key=image_key, Body=result.data,
                      ContentType=media.image_media_type(result.format))
        outputs["image"] = f"s3://{settings.output_bucket}/{image_key}"
    s3.put_object(Bucket=settings.output_bucket, Key=sidecar_key, Body=json.dumps(report).encode(),
                  ContentType="application/json")
    outputs["report"] = f"s3://{settings.output_bucket}/{sidecar_key}"
    ms = round((time.perf_counter() - start) * 1000, 1)
    faces = report.get("masked", len(report["faces"]))
    jobs.put(job_id, DONE, outputs=outputs, faces=faces, ms=ms)
    metrics.add_metric(name="FacesFound", unit=MetricUnit.Count, value=faces)
    metrics.add_metric(name="ProcessingMs", unit=MetricUnit.Milliseconds, value=ms)
    metrics.add_metric(name="JobsDone", unit=MetricUnit.Count, value=1)
    logger.info("job done", extra={"faces": faces, "ms": ms, "operation": operation})
    return {"job_id": job_id, "status": DONE, "outputs": outputs}


def _read(upload: dict, size: int | None, limit: int) -> bytes:
    """The upload's bytes, size-checked before any of them is read: the event's size, else a
    HEAD; the GET's ContentLength is checked again (the object may have been replaced)."""
    args = {"Bucket": upload["bucket"], "Key": upload["key"]}
    if size is None:
        size = adapters.s3.head_object(**args)["ContentLength"]
    if size > limit:
        raise BadInput(f"upload too large: {size} bytes (limit {limit})")
    obj = adapters.s3.get_object(**args)
    if obj["ContentLength"] > limit:
        obj["Body"].close()
        raise BadInput(f"upload too large: {obj['ContentLength']} bytes (limit {limit})")
    return obj["Body"].read()


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False)  # results name objects: not into traces
@metrics.log_metrics(capture_cold_start_metric=True)
@event_source(data_class=S3Event)
def handler(event: S3Event, context: LambdaContext) -> dict:
    adapters.idempotency_config.register_lambda_context(context)
    results = []
    for record in event.records:
        # S3's request id of the upload ties these lines to S3's own logs and CloudTrail
        logger.set_correlation_id((record.get("responseElements") or {}).get("x-amz-request-id"))
        if record.s3.bucket.name != adapters.settings.input_bucket:
            # Only the input bucket may trigger work: a result must never be processed again.
            logger.error("event from a bucket that is not the input bucket; ignored")
            results.append({"status": "ignored"})
            continue
        obj = record.s3.get_object
        upload = object_identity(record.s3.bucket.name, obj.key, obj.version_id, obj.etag)
        if operation_for_key(upload["key"]) == SWAP:
            # a swap's photos start nothing here: its manifest starts it, in the split function
            logger.error("a face swap upload; ignored (its manifest starts the swap)")
            results.append({"status": "ignored"})
            continue
        try:
            # S3Object.size raises when the event has none: _read then asks S3 (HEAD) instead
            results.append(process_upload(upload=upload, size=obj.get("size")))
        except Exception:
            # Not a bad upload (that is a "failed" result): Redis, S3 or the engine broke. Fail
            # the invocation so Lambda retries, with a structured line carrying the ids.
            logger.exception("upload not processed; failing the invocation so that it is retried")
            raise
    return {"results": results}
