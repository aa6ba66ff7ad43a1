"""A batch's results file (one JSON line per item, in the order its lines were admitted: custom_id, the job of
its latest attempt, its status, and its result or error) and its errors file (one line per refused line), read
from Redis a page at a time, so that neither the API nor the batch worker ever holds a whole file; and the copy of
both in S3, written in parts (a multipart upload) when VISIONQ_RESULTS_S3_URI is set."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from shared.outbound.s3 import S3Location
from shared.store.batches import BatchStore

PAGE = 500  # items read per round trip
JOB_FIELDS = ("status", "result", "error")


def result_lines(batches: BatchStore, batch_id: str) -> Iterator[bytes]:
    """The results file, line by line."""
    start = 0
    while custom_ids := batches.custom_ids(batch_id, start, PAGE):
        items = [item for item in batches.items(batch_id, custom_ids) if item is not None]
        for item, fields in zip(items, batches.job_fields([i.job_id for i in items], JOB_FIELDS), strict=True):
            yield _line(item.custom_id, item.job_id, fields)
        start += len(custom_ids)


def _line(custom_id: str, job_id: str, fields: dict[str, str | None]) -> bytes:
    head = f'{{"custom_id":{json.dumps(custom_id)},"id":"{job_id}"'
    if fields["status"] is None:  # expired: its batch outlived it (the batch extends its items' lifetime)
        return f'{head},"status":"expired"}}\n'.encode()
    outcome = "".join(f',"{name}":{fields[name]}' for name in ("result", "error") if fields[name])
    return f'{head},"status":"{fields["status"]}"{outcome}}}\n'.encode()  # result and error are stored as JSON


def error_lines(batches: BatchStore, batch_id: str) -> Iterator[bytes]:
    """The errors file (refused lines, by line number), line by line."""
    start = 0
    while refusals := batches.refusals(batch_id, start, PAGE):
        for refusal in refusals:
            yield refusal.encode() + b"\n"
        start += len(refusals)


def item_job_ids(batches: BatchStore, batch_id: str) -> Iterator[list[str]]:
    """The jobs of the batch's items' latest attempts, a page at a time."""
    start = 0
    while custom_ids := batches.custom_ids(batch_id, start, PAGE):
        yield [item.job_id for item in batches.items(batch_id, custom_ids) if item is not None]
        start += len(custom_ids)


def write_s3(client, location: S3Location, lines: Iterable[bytes], part_bytes: int) -> int:
    """Write the lines to one S3 object in parts of at least `part_bytes` (S3's multipart upload: nothing holds
    more than a part); the bytes written. An upload that fails half-way is aborted."""
    upload = client.create_multipart_upload(Bucket=location.bucket, Key=location.key,
                                            ContentType="application/jsonl")["UploadId"]
    parts, buffer, size = [], bytearray(), 0
    try:
        for line in lines:
            buffer += line
            if len(buffer) >= part_bytes:
                parts.append(_part(client, location, upload, len(parts) + 1, bytes(buffer)))
                size, buffer = size + len(buffer), bytearray()
        if buffer or not parts:  # the last part may be small; an empty file is one empty part
            parts.append(_part(client, location, upload, len(parts) + 1, bytes(buffer)))
            size += len(buffer)
        client.complete_multipart_upload(Bucket=location.bucket, Key=location.key, UploadId=upload,
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        client.abort_multipart_upload(Bucket=location.bucket, Key=location.key, UploadId=upload)
        raise
    return size


def _part(client, location: S3Location, upload: str, number: int, body: bytes) -> dict:
    answer = client.upload_part(Bucket=location.bucket, Key=location.key, UploadId=upload, PartNumber=number,
                                Body=body)
    return {"ETag": answer["ETag"], "PartNumber": number}
