"""Jobs created with an edited report (faceflow.review): the API keeps the report in the job
record (`review`, JSON text), and the stills or split function renders exactly its faces
instead of detecting them."""
from __future__ import annotations

import json
from typing import Any

REVIEW_FIELD = "review"
# An edited report rides in the job record (Redis) and in the job request (API Gateway's
# payload limit is 10 MB): a video's per-frame faces stay well under this for hours of video.
MAX_REVIEW_BYTES = 4 * 1024 * 1024


def review_fields(report: dict[str, Any] | None) -> dict[str, str]:
    """The job record's fields for an edited report (none without one)."""
    if report is None:
        return {}
    return {REVIEW_FIELD: json.dumps(report, separators=(",", ":"))}


def edited_report(job: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job's edited report, or None; faceflow.review.ReportError (a BadInput: the job
    fails with it) when it is not a JSON object."""
    text = (job or {}).get(REVIEW_FIELD)
    if not text:
        return None
    from faceflow import review
    return review.load(text)
