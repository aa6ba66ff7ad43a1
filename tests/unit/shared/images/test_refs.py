"""Image references: parsing and bounds (the API's check) and hardened decoding (the worker's) of local refs:
data URIs and paths. Remote refs and the bad-input matrix are in test_image_matrix.py."""

from __future__ import annotations

import base64

import pytest

from shared.config import Settings
from shared.errors import ImageError, ImageTooLarge, InvalidImageRef
from shared.images.refs import load_image, load_images, validate_ref
from tests.images import animated_gif, bomb_png, cmyk_jpeg, png, png_16bit, rotated_jpeg, transparent_palette_png


def data_uri(data: bytes, subtype="png") -> str:
    return f"data:image/{subtype};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def local(tmp_path) -> Settings:
    (tmp_path / "ok.png").write_bytes(png())
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "dir.png").mkdir()
    return Settings(image_root=tmp_path, max_image_bytes=10_000, max_image_pixels=10_000)


def test_path_under_root_decodes(local):
    assert load_image("ok.png", local).size == (8, 6)


@pytest.mark.parametrize(("ref", "error"), [
    ("data:image/png;base64,%%%not-base64", InvalidImageRef),
    ("data:text/plain;base64,aGVsbG8=", InvalidImageRef),
    ("../outside.png", InvalidImageRef),
    ("/etc/passwd", InvalidImageRef),
    ("ftp://example.com/a.png", InvalidImageRef),
    ("http://example.com/a.png", InvalidImageRef),  # https only by default
    ("upload://abc", InvalidImageRef),  # no upload store here
])
def test_malformed_or_forbidden_refs_are_refused_before_any_read(local, ref, error):
    with pytest.raises(error):
        validate_ref(ref, local)


def test_inline_image_over_the_byte_bound_is_refused(local):
    with pytest.raises(ImageTooLarge):
        validate_ref(data_uri(b"\0" * 20_000), local)


@pytest.mark.parametrize(("ref", "code"), [
    ("missing.png", "image_not_found"),
    ("text.png", "image_unsupported_format"),
    ("empty.png", "image_unreadable"),
    ("dir.png", "image_unreadable"),
])
def test_unreadable_files_fail_with_a_stable_code(local, ref, code):
    with pytest.raises(ImageError) as info:
        load_image(ref, local)
    assert info.value.code == code


def test_a_link_inside_the_root_cannot_lead_outside_it(local, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes(png())
    (local.image_root / "link.png").symlink_to(outside)
    with pytest.raises(InvalidImageRef):
        load_image("link.png", local)


# --- decoding: what becomes of odd but valid images -----------------------------------------------------------


def decoded(data: bytes, subtype: str = "png"):
    return load_image(data_uri(data, subtype), Settings())


def test_animated_gif_gives_its_first_frame():
    image = decoded(animated_gif(), "gif")
    assert image.mode == "RGB" and image.getpixel((5, 5)) == (255, 0, 0)


def test_cmyk_jpeg_becomes_rgb():
    image = decoded(cmyk_jpeg(), "jpeg")
    red, green, blue = image.getpixel((8, 8))
    assert image.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_16_bit_png_is_scaled_not_clipped():
    image = decoded(png_16bit(32_896))  # half of 65535: a plain convert would clip it to white
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (128, 128, 128)


def test_transparency_is_composited_over_white():
    image = decoded(transparent_palette_png())
    assert image.mode == "RGB" and image.getpixel((2, 2)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    assert decoded(rotated_jpeg(), "jpeg").size == (20, 40)


def test_a_decompression_bomb_is_refused_with_default_bounds():
    data = bomb_png(12_000)  # 144 million pixels in about 18 KB
    assert len(data) < 50_000
    with pytest.raises(ImageError) as info:
        decoded(data)
    assert info.value.code == "image_decompression_bomb"


def test_images_of_a_job_are_bounded_together(local):
    settings = local.model_copy(update={"max_job_image_pixels": 100})
    with pytest.raises(ImageTooLarge, match="together"):
        load_images(["ok.png", "ok.png", "ok.png"], settings)  # 48 pixels each
    assert [image.size for image in load_images(["ok.png", "ok.png"], settings)] == [(8, 6), (8, 6)]
