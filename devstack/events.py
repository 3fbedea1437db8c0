"""S3 event notifications as AWS delivers them.

moto's notifications are thinner than S3's: no userIdentity, requestParameters,
responseElements, bucket ownerIdentity or object sequencer, an eventTime in local time
without a zone, and keys encoded with quote_plus *including* '/' ("uploads%2Fa+b.jpg"; S3
sends "uploads/a+b.jpg"). `normalize_s3_event` fills those in so handlers see the shape of
https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html
(versionId only for versioned buckets, as S3 does).
"""
from __future__ import annotations

import base64
import copy
import itertools
import os
import secrets
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote_plus, unquote_plus

OWNER_ID = "A3NL1KOZZKEXAMPLE"
PRINCIPAL_ID = "AWS:AIDAEXAMPLEDEVSTACK"
_sequence = itertools.count()


def encode_key(key: str) -> str:
    """An object key as S3 writes it into event notifications (URL-encoded, space as '+',
    '/' kept)."""
    return quote_plus(key, safe="/")


def _sequencer() -> str:
    return f"{time.time_ns() // 1000:014X}{next(_sequence) % 0x10000:04X}"


def _event_time(value: str | None) -> str:
    if value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:  # moto: datetime.now() of the server, a naive local time
                parsed = parsed.astimezone()
            moment = parsed.astimezone(timezone.utc)
        except ValueError:
            moment = datetime.now(timezone.utc)
    else:
        moment = datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _request_ids() -> dict:
    return {"x-amz-request-id": secrets.token_hex(8).upper(),
            "x-amz-id-2": base64.b64encode(os.urandom(48)).decode()}


def is_test_event(body: Any) -> bool:
    return isinstance(body, dict) and body.get("Event") == "s3:TestEvent"


def normalize_s3_event(event: dict, source_ip: str = "127.0.0.1") -> dict:
    """A copy of `event` (an S3 notification with "Records") in the shape S3 sends."""
    event = copy.deepcopy(event)
    records = []
    for record in event.get("Records", []):
        if record.get("eventSource") != "aws:s3":
            records.append(record)
            continue
        s3 = record.get("s3", {})
        bucket = dict(s3.get("bucket", {}))
        if "name" in bucket:
            bucket = {"name": bucket["name"],
                      "ownerIdentity": bucket.get("ownerIdentity") or {"principalId": OWNER_ID},
                      "arn": bucket.get("arn") or f"arn:aws:s3:::{bucket['name']}"}
        obj = dict(s3.get("object", {}))
        if "key" in obj:
            obj["key"] = encode_key(unquote_plus(obj["key"]))
        if obj.get("versionId") in (None, "null", ""):
            obj.pop("versionId", None)
        obj.setdefault("sequencer", _sequencer())
        normalized = {
            "eventVersion": record.get("eventVersion", "2.1"),
            "eventSource": "aws:s3",
            "awsRegion": record.get("awsRegion", "us-east-1"),
            "eventTime": _event_time(record.get("eventTime")),
            "eventName": record.get("eventName", ""),
            "userIdentity": record.get("userIdentity") or {"principalId": PRINCIPAL_ID},
            "requestParameters": record.get("requestParameters") or {"sourceIPAddress": source_ip},
            "responseElements": record.get("responseElements") or _request_ids(),
            "s3": {**s3, "bucket": bucket, "object": obj},
        }
        for extra, value in record.items():  # anything else moto adds, kept
            normalized.setdefault(extra, value)
        records.append(normalized)
    event["Records"] = records
    return event


def s3_event(bucket: str, key: str, *, size: int, etag: str, version_id: str | None = None,
             event_name: str = "ObjectCreated:Put", region: str = "us-east-1",
             configuration_id: str = "faceflow-uploads", source_ip: str = "127.0.0.1") -> dict:
    """One S3 event notification (the Lambda event of an S3 trigger) for an object."""
    obj: dict[str, Any] = {"key": encode_key(key), "size": size, "eTag": etag.strip('"')}
    if version_id and version_id != "null":
        obj["versionId"] = version_id
    obj["sequencer"] = _sequencer()
    return {"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": region,
        "eventTime": _event_time(None),
        "eventName": event_name,
        "userIdentity": {"principalId": PRINCIPAL_ID},
        "requestParameters": {"sourceIPAddress": source_ip},
        "responseElements": _request_ids(),
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": configuration_id,
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": OWNER_ID}, "arn": f"arn:aws:s3:::{bucket}"},
            "object": obj,
        },
    }]}
