"""The uploads resource: POST /v1/uploads stores images (multipart, or one image as the raw body) for
settings.upload_ttl_s and answers their `upload://<id>` refs, usable only by jobs of the same API key; or one JSONL
file (Content-Type application/jsonl), the input_file of a batch of the same key."""

from __future__ import annotations

from flask import Blueprint, Response, g, request
from werkzeug.datastructures import FileStorage

from api.auth import authenticate, charge_now
from api.context import services
from api.schemas import UploadList
from shared.config import Settings
from shared.errors import ImageTooLarge, InvalidRequest, UnsupportedMediaType, WrongImageCount
from shared.images.decode import open_image
from shared.images.uploads import Upload

bp = Blueprint("uploads", __name__, url_prefix="/v1/uploads")
bp.before_request(authenticate)


JSONL_TYPES = frozenset({"application/jsonl", "application/x-ndjson", "application/json-lines",
                         "application/x-jsonlines"})


@bp.post("")
def create_uploads():
    """Store the images of the body, or one JSONL file (a batch's input_file); 201 with `{"uploads": [{"ref",
    "size", "expires_at"}]}`."""
    charge_now()
    settings = services().settings
    if request.mimetype in JSONL_TYPES:
        return jsonl_upload(settings)
    if request.mimetype == "multipart/form-data":
        images = read_files(settings)
    elif request.mimetype.startswith("image/") or request.mimetype == "application/octet-stream":
        images = [bounded(request.get_data(cache=False), settings)]
    else:
        raise UnsupportedMediaType("send multipart/form-data, or one image as the body with its image/* type")
    if not images:
        raise InvalidRequest("the request has no image")
    body = UploadList(uploads=store_images(images, settings)).model_dump_json()
    return Response(body, status=201, mimetype="application/json")


def jsonl_upload(settings: Settings) -> Response:
    """The body streamed into the store in chunks, up to settings.batch_max_input_bytes (not max_body_bytes: this
    one body is never held whole)."""
    request.max_content_length = settings.batch_max_input_bytes
    upload = services().uploads.put_stream(g.key.id, request.stream, settings.batch_max_input_bytes)
    return Response(UploadList(uploads=[upload]).model_dump_json(), status=201, mimetype="application/json")


def read_files(settings: Settings) -> list[bytes]:
    """Every file part of a multipart body, in order, each bounded; at most settings.max_images."""
    files: list[FileStorage] = [file for _, file in request.files.items(multi=True)]
    if len(files) > settings.max_images:
        raise WrongImageCount(f"at most {settings.max_images} images per request, got {len(files)}")
    return [bounded(file.stream.read(settings.max_image_bytes + 1), settings) for file in files]


def bounded(data: bytes, settings: Settings) -> bytes:
    """The bytes if they are a whole image within the bounds (its header is read, nothing decoded)."""
    if len(data) > settings.max_image_bytes:
        raise ImageTooLarge(f"an image is larger than {settings.max_image_bytes} bytes")
    open_image(data, settings)
    return data


def store_images(images: list[bytes], settings: Settings) -> list[Upload]:
    """Store checked images for the caller's key."""
    uploads = services().uploads
    return [uploads.put(g.key.id, data) for data in images]
