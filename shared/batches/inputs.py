"""Reading a batch's input a chunk at a time, from where the last step stopped, never whole: JSONL bytes (inline
requests or an upload held in Redis, an upload or manifest in S3) or the objects under an S3 prefix.

A position says where reading stands: lines read so far, the byte offset of the next line (JSONL), or the listing
page to read next (prefix). Each entry a chunk yields carries the position just after it, from which reading again
can only repeat entries already admitted (they are found again by custom_id), never skip one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from shared.batches.lines import LINE_TOO_LONG, TOO_MANY_ITEMS
from shared.images.uploads import CHUNK_BYTES
from shared.outbound.s3 import error_code
from shared.store.batches import BatchStore, Refusal

S3_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
UPLOAD_REF = re.compile(rb"upload://([A-Za-z0-9_-]{16,64})")
REF_OVERLAP = 128  # bytes each scan window reads past its end, so that no ref is cut in two


@dataclass(frozen=True)
class Position:
    """Where reading stands: lines (or objects) read, the next line's byte offset, the next listing page."""

    lines: int = 0
    offset: int = 0
    token: str = ""


@dataclass
class Chunk:
    """What one read gave: entries (line number, the raw line or object key, the position after it), refusals of
    lines that could not even be read (too long), the position after all of it, and whether the input ended."""

    entries: list[tuple[int, bytes | str, Position]] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    end: Position = Position()
    done: bool = False


class InputError(Exception):
    """The input cannot be read: a stable code, and whether a later try may succeed."""

    def __init__(self, code: str, message: str, retryable: bool = False):
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable


class ByteSource(Protocol):
    size: int

    def read(self, offset: int, length: int) -> bytes: ...


class RedisChunks:
    """JSONL held in Redis as a list of CHUNK_BYTES pieces (inline requests, or an upload the batch took over)."""

    def __init__(self, store: BatchStore, batch_id: str, size: int):
        self.store, self.batch_id, self.size = store, batch_id, size

    def read(self, offset: int, length: int) -> bytes:
        first, last = offset // CHUNK_BYTES, (offset + length - 1) // CHUNK_BYTES
        pieces = [self.store.input_chunk(self.batch_id, index) or b"" for index in range(first, last + 1)]
        start = offset - first * CHUNK_BYTES
        return b"".join(pieces)[start:start + length]


class S3Object:
    """JSONL in an S3 object, read by ranges."""

    def __init__(self, client, bucket: str, key: str, max_bytes: int):
        self.client, self.bucket, self.key = client, bucket, key
        self.size = self._size(max_bytes)

    def _size(self, max_bytes: int) -> int:
        try:
            size = int(self.client.head_object(Bucket=self.bucket, Key=self.key)["ContentLength"])
        except Exception as exc:  # botocore's errors
            raise _s3_error(exc, f"s3://{self.bucket}/{self.key}") from None
        if size > max_bytes:
            raise InputError("input_too_large", f"the input is {size} bytes, over {max_bytes}")
        return size

    def read(self, offset: int, length: int) -> bytes:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key,
                                          Range=f"bytes={offset}-{offset + length - 1}")["Body"]
            return body.read()
        except Exception as exc:
            raise _s3_error(exc, f"s3://{self.bucket}/{self.key}") from None


def _s3_error(exc: Exception, uri: str) -> InputError:
    if error_code(exc) in S3_MISSING:
        return InputError("input_not_found", f"{uri} does not exist")
    if error_code(exc) in ("403", "AccessDenied"):
        return InputError("input_unreadable", f"{uri} may not be read with the server's credentials")
    return InputError("input_unreadable", f"{uri} could not be read ({type(exc).__name__})", retryable=True)


def read_lines(source: ByteSource, start: Position, max_lines: int, max_line_bytes: int, max_items: int) -> Chunk:
    """Up to `max_lines` lines from `start` (blank lines are skipped, but counted); a line over `max_line_bytes`
    is refused and skipped without being held whole; the line past `max_items` is refused and ends the input."""
    return _LineReader(source, max_lines, max_line_bytes, max_items).read(start)


@dataclass
class _LineReader:
    source: ByteSource
    max_lines: int
    max_line_bytes: int
    max_items: int
    chunk: Chunk = field(default_factory=Chunk)

    def read(self, position: Position) -> Chunk:
        window = max(CHUNK_BYTES, self.max_line_bytes + 1)
        while not self._stop() and position.offset < self.source.size:
            data = self.source.read(position.offset, min(window, self.source.size - position.offset))
            position = self._take(data, position)
        self.chunk.end = position
        self.chunk.done = self.chunk.done or position.offset >= self.source.size
        return self.chunk

    def _stop(self) -> bool:
        return self.chunk.done or len(self.chunk.entries) + len(self.chunk.refusals) >= self.max_lines

    def _take(self, data: bytes, position: Position) -> Position:
        """Cut `data` (read at position.offset) into lines; the position after the last one taken."""
        base, lines, start = position.offset, position.lines, 0
        last = base + len(data) >= self.source.size
        while not self._stop() and start < len(data):
            end = data.find(b"\n", start)
            if end < 0 and not last:
                if len(data) - start <= self.max_line_bytes:
                    break  # the line goes on past this read: the next read starts with it
                self._refuse(lines + 1, LINE_TOO_LONG, f"the line is over {self.max_line_bytes} bytes")
                return Position(lines + 1, self._next_line(base + len(data)))
            end = len(data) if end < 0 else end
            lines += 1
            after = Position(lines, min(base + end + 1, self.source.size))
            self._add(data[start:end], lines, after)
            start = end + 1
        return Position(lines, min(base + start, self.source.size))

    def _add(self, raw: bytes, line: int, after: Position) -> None:
        if line > self.max_items:
            self._refuse(line, TOO_MANY_ITEMS, f"a batch holds at most {self.max_items} lines: this line and the "
                         "rest were not read")
            self.chunk.done = True
        elif len(raw) > self.max_line_bytes:
            self._refuse(line, LINE_TOO_LONG, f"the line is over {self.max_line_bytes} bytes")
        elif raw.strip():
            self.chunk.entries.append((line, raw, after))

    def _refuse(self, line: int, code: str, message: str) -> None:
        self.chunk.refusals.append(Refusal(line, code, message))

    def _next_line(self, offset: int) -> int:
        """The offset just after the next newline from `offset` (or the end): a line too long is skipped."""
        while offset < self.source.size:
            data = self.source.read(offset, min(CHUNK_BYTES, self.source.size - offset))
            end = data.find(b"\n")
            if end >= 0:
                return offset + end + 1
            offset += len(data)
        return self.source.size


def upload_ids(source: ByteSource) -> Iterator[set[str]]:
    """The upload ids the input names (its lines' image refs), a window at a time: a plain scan, no line parsed,
    so that a batch can keep its uploads alive before it reaches the lines that use them."""
    offset = 0
    while offset < source.size:
        data = source.read(offset, min(CHUNK_BYTES + REF_OVERLAP, source.size - offset))
        limit = len(data) if offset + len(data) >= source.size else CHUNK_BYTES
        yield {match.group(1).decode() for match in UPLOAD_REF.finditer(data) if match.start() < limit}
        offset += limit


class S3Prefix:
    """The objects under an S3 prefix, a listing page at a time (position.token: the page to read next)."""

    def __init__(self, client, bucket: str, prefix: str):
        self.client, self.bucket, self.prefix = client, bucket, prefix

    def read(self, start: Position, max_lines: int, max_items: int) -> Chunk:
        """One page of keys from `start`; each entry's position is the page's start (reading it again repeats
        only admitted items), the last one's the next page's."""
        page = self._list(start.token, min(max_lines, 1000))
        keys = [item["Key"] for item in page.get("Contents", []) if not item["Key"].endswith("/")]
        next_token = page.get("NextContinuationToken", "")
        chunk, lines = Chunk(), start.lines
        for index, key in enumerate(keys):
            lines += 1
            if lines > max_items:
                chunk.refusals.append(Refusal(lines, TOO_MANY_ITEMS, f"a batch holds at most {max_items} "
                                              "objects: this one and the rest were not read", key))
                chunk.end, chunk.done = Position(lines), True
                return chunk
            after = Position(lines, 0, next_token) if index == len(keys) - 1 else start
            chunk.entries.append((lines, key, after))
        chunk.end, chunk.done = Position(lines, 0, next_token), not page.get("IsTruncated")
        return chunk

    def _list(self, token: str, max_keys: int) -> dict:
        options = {"Bucket": self.bucket, "Prefix": self.prefix, "MaxKeys": max_keys,
                   **({"ContinuationToken": token} if token else {})}
        try:
            return self.client.list_objects_v2(**options)
        except Exception as exc:  # botocore's errors
            raise _s3_error(exc, f"s3://{self.bucket}/{self.prefix}") from None
