"""The upload store against the session's Redis and moto's S3: bytes in Redis or in S3, reads only by the owner,
gone after the TTL."""

from __future__ import annotations

import boto3
import pytest

from shared.config import Settings
from shared.errors import ImageNotFound, UploadQuotaExceeded
from shared.images.uploads import UploadStore, upload_id_of
from shared.store.keys import upload_key

UPLOADS_BUCKET = "visionq-uploads"


@pytest.fixture(scope="module", params=["redis", "s3"])
def uploads(request, redis_server, s3_server) -> UploadStore:
    s3_uri = ""
    if request.param == "s3":
        boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=UPLOADS_BUCKET)
        s3_uri = f"s3://{UPLOADS_BUCKET}/uploads"
    return UploadStore(Settings(redis_url=redis_server.url, s3_endpoint_url=s3_server, uploads_s3_uri=s3_uri,
                                upload_ttl_s=120))


def test_the_owner_reads_its_upload_and_no_one_else(uploads):
    upload = uploads.put("owner-1", b"\x89PNG fake bytes")
    upload_id = upload_id_of(upload.ref)
    assert uploads.get(upload_id, "owner-1") == b"\x89PNG fake bytes"
    assert uploads.size_for(upload_id, "owner-1") == len(b"\x89PNG fake bytes") == upload.size
    for owner in ("owner-2", None):
        with pytest.raises(ImageNotFound):
            uploads.get(upload_id, owner)
        with pytest.raises(ImageNotFound):
            uploads.size_for(upload_id, owner)


def test_the_record_expires_and_the_bytes_live_where_configured(uploads, s3_server):
    upload_id = upload_id_of(uploads.put("owner-1", b"abc").ref)
    key = upload_key(upload_id)
    assert 0 < uploads.redis.ttl(key) <= 120
    in_redis = uploads.redis.hget(key, "data")
    if uploads.settings.uploads_s3_uri:
        assert in_redis is None
        body = boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=UPLOADS_BUCKET,
                                                                      Key=f"uploads/{upload_id}")["Body"].read()
        assert body == b"abc"
    else:
        assert in_redis == b"abc"


def test_a_key_stores_at_most_its_quota(redis_server):
    small = UploadStore(Settings(redis_url=redis_server.url, max_upload_bytes_per_key=1000))
    small.put("quota-owner", b"x" * 600)
    with pytest.raises(UploadQuotaExceeded):
        small.put("quota-owner", b"x" * 500)
    small.put("quota-owner", b"x" * 400)  # the refused upload was not counted
    small.put("another-owner", b"x" * 1000)  # quotas are per key


def test_a_jsonl_file_is_stored_in_chunks_as_it_streams_and_is_no_image(uploads, s3_server):
    import io

    from shared.errors import ImageUnsupportedFormat
    from shared.images.uploads import CHUNK_BYTES
    from shared.outbound.s3 import parse_s3_uri
    from shared.store.keys import upload_chunks_key

    data = b"".join(b'{"custom_id": "%d"}\n' % i for i in range(150_000))
    assert len(data) > 2 * CHUNK_BYTES
    upload = uploads.put_stream("owner-j", io.BytesIO(data), max_bytes=len(data))
    upload_id = upload_id_of(upload.ref)
    assert upload.size == len(data)
    fields = uploads.redis.hgetall(upload_key(upload_id))
    assert fields[b"kind"] == b"jsonl" and b"data" not in fields
    if uploads.settings.uploads_s3_uri:
        location = parse_s3_uri(f"{uploads.settings.uploads_s3_uri}/{upload_id}")
        stored = boto3.client("s3", endpoint_url=s3_server).get_object(Bucket=location.bucket, Key=location.key)
        assert stored["Body"].read() == data
    else:
        chunks = uploads.redis.lrange(upload_chunks_key(upload_id), 0, -1)
        assert b"".join(chunks) == data and {len(chunk) for chunk in chunks[:-1]} == {CHUNK_BYTES}
        assert 0 < uploads.redis.ttl(upload_chunks_key(upload_id)) <= 120
    with pytest.raises(ImageUnsupportedFormat):
        uploads.size_for(upload_id, "owner-j")


def test_a_jsonl_file_over_the_bound_is_refused_and_leaves_nothing(uploads):
    import io

    from shared.errors import PayloadTooLarge
    from shared.store.keys import upload_chunks_key

    chunk_keys = set(uploads.redis.scan_iter(upload_chunks_key("*")))
    with pytest.raises(PayloadTooLarge):
        uploads.put_stream("owner-k", io.BytesIO(b"x" * (3 * 1024 * 1024)), max_bytes=2 * 1024 * 1024)
    assert set(uploads.redis.scan_iter(upload_chunks_key("*"))) == chunk_keys
