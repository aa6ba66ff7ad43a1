"""The results file's copy in S3 (moto): written in parts, each at least the part size but the last, never held
whole; an upload that fails half-way is aborted."""

from __future__ import annotations

import boto3
import pytest

from shared.batches.results import write_s3
from shared.outbound.s3 import S3Location

BUCKET = "unit-batch-results"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3(s3_server):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    return client


def test_a_large_file_goes_up_in_parts(s3):
    lines = [b'{"custom_id": "%d", "pad": "%s"}\n' % (i, b"x" * 1000) for i in range(11 * 1024)]  # about 11 MiB
    location = S3Location(BUCKET, "parts/results.jsonl")
    written = write_s3(s3, location, iter(lines), part_bytes=5 * MiB)
    assert written == sum(len(line) for line in lines)
    assert s3.head_object(Bucket=BUCKET, Key=location.key)["ETag"].endswith('-3"')  # S3's mark of 3 parts
    assert s3.get_object(Bucket=BUCKET, Key=location.key)["Body"].read() == b"".join(lines)


def test_an_empty_file_is_an_empty_object(s3):
    location = S3Location(BUCKET, "parts/empty.jsonl")
    assert write_s3(s3, location, iter([]), part_bytes=5 * MiB) == 0
    assert s3.get_object(Bucket=BUCKET, Key=location.key)["Body"].read() == b""


def test_a_failure_half_way_leaves_no_object_and_no_open_upload(s3):
    def lines():
        yield b"x" * (5 * MiB)
        raise RuntimeError("Redis went away")

    location = S3Location(BUCKET, "parts/broken.jsonl")
    with pytest.raises(RuntimeError):
        write_s3(s3, location, lines(), part_bytes=5 * MiB)
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=location.key).get("KeyCount") == 0
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
