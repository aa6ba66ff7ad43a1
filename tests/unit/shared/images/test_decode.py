"""The bad-input matrix of image references: each case asserts its stable code, against real servers (the test
HTTP server on 127.0.0.5, moto's S3 server, the session's Redis for uploads). "submit" cases are refused by the
API's check (validate_ref); "worker" cases pass it, or cannot be seen by it, and fail when the worker loads them."""

from __future__ import annotations

import base64
import gzip
import time
from collections.abc import Callable
from dataclasses import dataclass

import boto3
import pytest

from shared.config import Settings
from shared.errors import ImageError, VisionqError
from shared.images.refs import Access, load_images, validate_ref
from shared.images.uploads import UploadStore, upload_id_of
from shared.store.keys import upload_key
from tests.http_server import NETWORK, LocalHttpServer, Route
from tests.images import animated_gif, bomb_png, cmyk_jpeg, encode, png, png_16bit

OWNER, OTHER = "key-owner", "key-other"
BUCKET, FORBIDDEN_BUCKET = "tenant-images", "someone-elses"


@dataclass
class Env:
    server: LocalHttpServer
    s3: object
    uploads: UploadStore
    settings: Settings

    def serve(self, name: str, body: bytes = b"", **route) -> str:
        return self.server.add(f"/matrix/{name}", Route(body, **route))

    def redirect(self, name: str, location: str) -> str:
        return self.server.redirect(f"/matrix/{name}", location)

    def put_s3(self, bucket: str, key: str, body: bytes) -> str:
        self.s3.put_object(Bucket=bucket, Key=key, Body=body)
        return f"s3://{bucket}/{key}"

    def expired_upload(self) -> str:
        ref = self.uploads.put(OWNER, png()).ref
        key = upload_key(upload_id_of(ref))
        self.uploads.redis.pexpire(key, 1)
        deadline = time.monotonic() + 5
        while self.uploads.redis.exists(key) and time.monotonic() < deadline:
            time.sleep(0.005)  # Redis expires it within milliseconds; poll, with a deadline
        return ref


@pytest.fixture(scope="module")
def env(http_server, s3_server, redis_server, image_root) -> Env:
    settings = Settings(
        redis_url=redis_server.url, image_root=image_root, allow_http=True, url_allowed_networks=[NETWORK],
        s3_endpoint_url=s3_server, max_image_bytes=200_000, max_job_image_bytes=300_000,
        max_image_pixels=4_000_000, max_image_side=4096, url_connect_timeout_s=1, url_read_timeout_s=0.5,
        url_total_timeout_s=1.0, url_max_redirects=3)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for bucket in (BUCKET, FORBIDDEN_BUCKET):
        s3.create_bucket(Bucket=bucket)
    return Env(http_server, s3, UploadStore(settings), settings)


def data_uri(data: bytes, subtype: str = "png") -> str:
    return f"data:image/{subtype};base64,{base64.b64encode(data).decode()}"


Make = Callable[[Env], str]
CASES: list[tuple[str, str, Make, str]] = [
    # --- decoding ---------------------------------------------------------------------------------------------
    ("bomb-png", "worker", lambda e: e.serve("bomb.png", bomb_png(3000)), "image_decompression_bomb"),
    ("truncated-jpeg", "worker",
     lambda e: e.serve("cut.jpg", encode(png_image(64), "JPEG")[:300], content_type="image/jpeg"),
     "image_unreadable"),
    ("text-named-png", "worker", lambda e: "not_an_image.png", "image_unsupported_format"),
    ("text-served-as-png", "worker", lambda e: e.serve("text.png", b"just text"), "image_unsupported_format"),
    ("zero-bytes", "worker", lambda e: e.serve("empty.png", b""), "image_unreadable"),
    ("huge-dimensions", "worker", lambda e: data_uri(encode(png_image(5000, 1), "PNG")), "image_too_large"),
    ("format-not-allowed", "worker", lambda e: data_uri(encode(png_image(8), "PPM")), "image_unsupported_format"),
    ("pdf-as-image", "worker", lambda e: data_uri(b"%PDF-1.4\n%\xe2\xe3\n1 0 obj\n<<>>\nendobj\n"),
     "image_unsupported_format"),
    ("data-uri-not-base64", "submit", lambda e: "data:image/png;base64,@@@", "invalid_image_ref"),
    ("data-uri-over-bound", "submit", lambda e: data_uri(b"\0" * 300_000), "image_too_large"),
    # --- https (http allowed in these settings) and the SSRF guard --------------------------------------------
    ("redirect-to-127.0.0.1", "worker", lambda e: e.redirect("r1", "http://127.0.0.1:9/a.png"),
     "image_forbidden_address"),
    ("redirect-to-metadata", "worker",
     lambda e: e.redirect("r2", "http://169.254.169.254/latest/meta-data/"), "image_forbidden_address"),
    ("redirect-to-ipv6-loopback", "worker", lambda e: e.redirect("r3", "http://[::1]/a.png"),
     "image_forbidden_address"),
    ("redirect-to-private-ipv6", "worker", lambda e: e.redirect("r4", "http://[fd00:ec2::254]/a.png"),
     "image_forbidden_address"),
    ("redirect-to-decimal-ipv4", "worker", lambda e: e.redirect("r5", "http://2130706433/a.png"),
     "invalid_image_ref"),
    ("url-decimal-ipv4", "submit", lambda e: "http://2130706433/a.png", "invalid_image_ref"),
    ("url-hex-ipv4", "submit", lambda e: "http://0x7f.0.0.1/a.png", "invalid_image_ref"),
    ("url-localhost", "submit", lambda e: e.server.url("/matrix/ok.png", host="localhost"),
     "image_forbidden_address"),
    ("url-metadata", "submit", lambda e: "http://169.254.169.254/latest/meta-data/", "image_forbidden_address"),
    ("url-cgnat", "submit", lambda e: "https://100.64.1.1/a.png", "image_forbidden_address"),
    ("url-ipv4-mapped-ipv6", "submit", lambda e: "https://[::ffff:10.0.0.1]/a.png", "image_forbidden_address"),
    ("url-with-credentials", "submit", lambda e: "https://user:pw@8.8.8.8/a.png", "invalid_image_ref"),
    ("wrong-content-type", "worker", lambda e: e.serve("page.png", png(), content_type="text/html"),
     "image_unsupported_format"),
    ("declared-body-over-bound", "worker", lambda e: e.serve("big.png", b"\0" * 250_000), "image_too_large"),
    ("streamed-body-over-bound", "worker",
     lambda e: e.serve("endless.png", b"\0" * 65_536, chunk=65_536, repeat=10_000), "image_too_large"),
    ("slow-body-past-total-timeout", "worker",
     lambda e: e.serve("drip.png", png() * 40, chunk=100, delay_s=0.1), "image_fetch_failed"),
    ("no-answer-past-read-timeout", "worker",
     lambda e: e.serve("stall.png", png(), chunk=10_000, delay_s=2.0), "image_fetch_failed"),
    ("slow-redirect-hops-past-total-timeout", "worker", lambda e: slow_chain(e), "image_fetch_failed"),
    ("http-404", "worker", lambda e: e.serve("gone.png", b"nope", status=404), "image_not_found"),
    ("http-500", "worker", lambda e: e.serve("err.png", b"oops", status=500), "image_fetch_failed"),
    ("redirect-loop", "worker", lambda e: e.redirect("loop", e.server.url("/matrix/loop")), "image_fetch_failed"),
    ("connection-refused", "worker", lambda e: f"http://{e.server.host}:9/a.png", "image_fetch_failed"),
    ("gzip-encoded-body", "worker",
     lambda e: e.serve("gz.png", gzip.compress(png()), headers={"Content-Encoding": "gzip"}), "image_fetch_failed"),
    ("unknown-host", "worker", lambda e: "https://images.invalid/a.png", "image_fetch_failed"),
    # --- s3:// ------------------------------------------------------------------------------------------------
    ("s3-bucket-not-allowed", "submit", lambda e: e.put_s3(FORBIDDEN_BUCKET, "a.png", png()),
     "image_bucket_not_allowed"),
    ("s3-missing-key", "worker", lambda e: f"s3://{BUCKET}/no/such/key.png", "image_not_found"),
    ("s3-object-over-bound", "worker", lambda e: e.put_s3(BUCKET, "big.png", b"\0" * 250_000), "image_too_large"),
    ("s3-malformed-uri", "submit", lambda e: "s3://Not_A_Bucket/a.png", "invalid_image_ref"),
    ("s3-not-an-image", "worker", lambda e: e.put_s3(BUCKET, "notes.txt", b"hello"), "image_unsupported_format"),
    # --- upload:// --------------------------------------------------------------------------------------------
    ("upload-of-another-key", "submit", lambda e: e.uploads.put(OTHER, png()).ref, "image_not_found"),
    ("upload-expired", "submit", lambda e: e.expired_upload(), "image_not_found"),
    ("upload-malformed-id", "submit", lambda e: "upload://../../etc", "invalid_image_ref"),
    ("scheme-unknown", "submit", lambda e: "gopher://example.com/a.png", "invalid_image_ref"),
]


def slow_chain(env: Env) -> str:
    """Three redirects then the image, each answer 0.4 s late: every hop is within the 0.5 s read timeout, the
    whole is not within the 1 s total."""
    target = env.serve("chain-end.png", png(), header_delay_s=0.4)
    for hop in range(3):
        target = env.server.add(f"/matrix/chain{hop}", Route(b"", "text/plain", 302, {"Location": target},
                                                             header_delay_s=0.4))
    return target


def png_image(width: int, height: int | None = None):
    from PIL import Image

    return Image.new("RGB", (width, height or width), (10, 20, 30))


ACCESS_BUCKETS = frozenset({BUCKET})


@pytest.mark.parametrize(("stage", "make", "code"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_gets_its_code(env, stage, make, code):
    ref = make(env)
    access = Access(OWNER, ACCESS_BUCKETS, env.uploads)
    started = time.monotonic()
    with pytest.raises(VisionqError) as info:
        if stage == "submit":
            validate_ref(ref, env.settings, access)
        else:
            validate_ref(ref, env.settings, access)  # the API lets it through; the worker finds out
            load_images([ref], env.settings, access)
    assert info.value.code == code, info.value.message
    assert time.monotonic() - started < 3  # bounds cut every case short


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 30


def test_the_same_images_load_from_every_source(env):
    """The good path of each source, and odd-but-valid images: every one becomes RGB."""
    access = Access(OWNER, ACCESS_BUCKETS, env.uploads)
    refs = [
        env.serve("ok.png", png(10, 10)),
        env.redirect("hop", env.serve("ok2.png", png(10, 10))),
        env.serve("anim.gif", animated_gif(), content_type="image/gif"),
        env.put_s3(BUCKET, "cmyk.jpg", cmyk_jpeg()),
        env.uploads.put(OWNER, png_16bit()).ref,
        data_uri(png(10, 10)),
    ]
    for ref in refs:
        validate_ref(ref, env.settings, access)
    images = load_images(refs, env.settings, access)
    assert [image.mode for image in images] == ["RGB"] * 6
    assert images[2].getpixel((5, 5)) == (255, 0, 0)  # the GIF's first frame


def test_with_default_settings_the_test_server_is_refused(env):
    url = env.serve("ok.png", png())
    defaults = Settings(allow_http=True)  # only the address rule differs from env.settings
    with pytest.raises(ImageError) as info:
        validate_ref(url, defaults)
    assert info.value.code == "image_forbidden_address"
    with pytest.raises(ImageError) as info:
        load_images([url], defaults)
    assert info.value.code == "image_forbidden_address"


def test_images_of_a_job_are_fetched_at_once(env):
    """Four images that each take 0.3 s to serve load in well under 4 x 0.3 s."""
    refs = [env.serve(f"slow{i}.png", png(), chunk=50_000, delay_s=0.3) for i in range(4)]
    started = time.monotonic()
    assert len(load_images(refs, env.settings, Access(OWNER))) == 4
    assert time.monotonic() - started < 0.9


def test_the_first_failing_image_in_order_is_the_error(env):
    refs = [env.serve("fine.png", png()), env.serve("missing-ok.png", b"x", status=404),
            "http://2130706433/a.png"]
    with pytest.raises(VisionqError) as info:
        load_images(refs, env.settings, Access(OWNER))
    assert info.value.code == "image_not_found"


def test_the_job_byte_bound_spans_its_images(env):
    big = png(10, 10) + b"\0" * 150_000  # a valid PNG with trailing bytes: under the 200 kB bound alone
    refs = [env.serve("part1.png", big), env.serve("part2.png", big)]
    with pytest.raises(VisionqError) as info:
        load_images(refs, env.settings, Access(OWNER))
    assert info.value.code == "image_too_large" and "together" in info.value.message


def test_a_bucket_allowed_in_settings_needs_no_key_grant(env):
    ref = env.put_s3(FORBIDDEN_BUCKET, "shared.png", png())
    everyone = env.settings.model_copy(update={"s3_allowed_buckets": [FORBIDDEN_BUCKET]})
    validate_ref(ref, everyone, Access(OWNER))
    assert load_images([ref], everyone, Access(OWNER))[0].size == (8, 6)


def test_the_total_timeout_spans_redirect_hops(env):
    """Each hop gets only what is left of the total: the fetch gives up at about 1 s, not after 4 x 0.4 s."""
    started = time.monotonic()
    with pytest.raises(VisionqError) as info:
        load_images([slow_chain(env)], env.settings, Access(OWNER))
    assert info.value.code == "image_fetch_failed"
    assert time.monotonic() - started < 1.3
