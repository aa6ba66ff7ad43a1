"""Image references: parsing and bounds (the API's check) and decoding (the worker's)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from shared.config import Settings
from shared.errors import ImageNotFound, ImageTooLarge, ImageUnreadable, InvalidImageRef
from shared.images import load_image, validate_ref


def png_bytes(size=(8, 6), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, subtype="png") -> str:
    return f"data:image/{subtype};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def local(tmp_path) -> Settings:
    (tmp_path / "ok.png").write_bytes(png_bytes())
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "dir.png").mkdir()
    return Settings(image_root=tmp_path, max_image_bytes=10_000, max_image_pixels=10_000)


def test_data_uri_decodes_to_rgb(local):
    image = load_image(data_uri(png_bytes(mode="RGBA")), local)
    assert image.mode == "RGB" and image.size == (8, 6)


def test_path_under_root_decodes(local):
    assert load_image("ok.png", local).size == (8, 6)


@pytest.mark.parametrize(("ref", "error"), [
    ("data:image/png;base64,%%%not-base64", InvalidImageRef),
    ("data:text/plain;base64,aGVsbG8=", InvalidImageRef),
    ("../outside.png", InvalidImageRef),
    ("/etc/passwd", InvalidImageRef),
    ("https://example.com/a.png", InvalidImageRef),
    ("s3://bucket/key.png", InvalidImageRef),
])
def test_malformed_or_forbidden_refs_are_refused_before_any_read(local, ref, error):
    with pytest.raises(error):
        validate_ref(ref, local)


def test_inline_image_over_the_byte_bound_is_refused(local):
    with pytest.raises(ImageTooLarge):
        validate_ref(data_uri(b"\0" * 20_000), local)


@pytest.mark.parametrize(("ref", "code"), [
    ("missing.png", "image_not_found"),
    ("text.png", "image_unreadable"),
    ("dir.png", "image_unreadable"),
])
def test_unreadable_files_fail_with_a_stable_code(local, ref, code):
    with pytest.raises((ImageNotFound, ImageUnreadable)) as info:
        load_image(ref, local)
    assert info.value.code == code


def test_image_over_the_pixel_bound_is_refused(local):
    with pytest.raises(ImageTooLarge):
        load_image(data_uri(png_bytes(size=(200, 200))), local)


def test_truncated_image_is_unreadable(local):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="JPEG")
    with pytest.raises(ImageUnreadable):
        load_image(data_uri(buffer.getvalue()[:200], "jpeg"), local)


def test_a_link_inside_the_root_cannot_lead_outside_it(local, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes(png_bytes())
    (local.image_root / "link.png").symlink_to(outside)
    with pytest.raises(InvalidImageRef):
        load_image("link.png", local)
