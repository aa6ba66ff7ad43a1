"""The optional archive of results in S3 (VISIONQ_RESULTS_S3_URI): each succeeded job as `<prefix>/<id>.json`.

Best effort: the job's outcome is already stored in Redis, and an archive that fails is logged, never raised.
"""

from __future__ import annotations

import logging

from shared.config import Settings
from shared.jobs import Job
from shared.outbound.s3 import parse_s3_uri, s3_client

log = logging.getLogger(__name__)


def archive_result(job: Job, settings: Settings) -> None:
    """Write the job, as GET /v1/jobs/<id> shows it, to the results archive (when one is configured)."""
    if not settings.results_s3_uri:
        return
    location = parse_s3_uri(f"{settings.results_s3_uri.rstrip('/')}/{job.id}.json")
    try:
        s3_client(settings).put_object(Bucket=location.bucket, Key=location.key, Body=job.public_json().encode(),
                                       ContentType="application/json")
    except Exception:  # botocore's errors, whatever they are
        log.warning("job %s: result not archived to %s", job.id, settings.results_s3_uri, exc_info=True)
