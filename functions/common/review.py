"""Jobs created with an edited report (faceflow.review): the API keeps the report in the job
record (`review`, JSON text), and the stills or split function renders exactly its faces
instead of detecting them."""
from __future__ import annotations

import json
from typing import Any

REVIEW_FIELD = "review"   # the job record's field (at most faceflow.web.api.MAX_REPORT_BYTES)


def review_fields(text: str | None) -> dict[str, str]:
    """The job record's fields for an edited report given as JSON text (none without one)."""
    return {} if text is None else {REVIEW_FIELD: text}


def edited_report(job: dict[str, Any] | None) -> dict[str, Any] | None:
    """The job's edited report, or None; faceflow.review.ReportError (a BadInput: the job
    fails with it) when it is not a JSON object."""
    text = (job or {}).get(REVIEW_FIELD)
    if not text:
        return None
    from faceflow import review
    return review.load(text)
