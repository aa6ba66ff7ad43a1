"""Reading a batch's JSONL input a chunk at a time: lines cut right across reads, positions from which reading on
gives exactly the rest, long lines refused without being held, the item bound."""

from __future__ import annotations

import json

from shared.batches.inputs import Position, read_lines, upload_ids
from shared.images.uploads import CHUNK_BYTES


class Bytes:
    """A byte source in memory that counts what it was asked to read."""

    def __init__(self, data: bytes):
        self.data, self.size, self.largest_read = data, len(data), 0

    def read(self, offset: int, length: int) -> bytes:
        self.largest_read = max(self.largest_read, length)
        return self.data[offset:offset + length]


def jsonl(count: int, pad: int = 0) -> bytes:
    return b"".join(json.dumps({"custom_id": f"c{i}", "pad": "x" * pad}).encode() + b"\n" for i in range(count))


def read_all(source: Bytes, per_chunk: int, max_line: int = 1 << 20, max_items: int = 10**6):
    position, entries, refusals, chunks = Position(), [], [], 0
    while True:
        chunk = read_lines(source, position, per_chunk, max_line, max_items)
        entries += chunk.entries
        refusals += chunk.refusals
        position, chunks = chunk.end, chunks + 1
        if chunk.done:
            return entries, refusals, chunks


def test_every_line_once_in_order_across_reads_larger_than_a_chunk():
    data = jsonl(6000, pad=500)  # about 3 MiB: lines cross the reads' edges
    assert len(data) > 2 * CHUNK_BYTES
    entries, refusals, chunks = read_all(Bytes(data), per_chunk=700)
    assert [json.loads(raw)["custom_id"] for _, raw, _ in entries] == [f"c{i}" for i in range(6000)]
    assert [line for line, _, _ in entries] == list(range(1, 6001)) and not refusals and chunks == 9


def test_reading_on_from_any_entry_s_position_gives_exactly_the_rest():
    data = jsonl(50)
    first = read_lines(Bytes(data), Position(), 50, 1 << 20, 100)
    for index in (0, 17, 48):
        _, _, after = first.entries[index]
        rest = read_lines(Bytes(data), after, 50, 1 << 20, 100)
        assert [line for line, _, _ in rest.entries] == list(range(index + 2, 51))


def test_blank_lines_count_and_the_last_line_needs_no_newline():
    data = b'{"a": 1}\n\n   \n{"a": 2}\n{"a": 3}'
    entries, refusals, _ = read_all(Bytes(data), per_chunk=10)
    assert [(line, raw) for line, raw, _ in entries] == [(1, b'{"a": 1}'), (4, b'{"a": 2}'), (5, b'{"a": 3}')]


def test_a_line_over_the_bound_is_refused_and_never_read_whole():
    huge = b'{"custom_id": "big", "pad": "' + b"x" * (5 * CHUNK_BYTES) + b'"}\n'
    source = Bytes(jsonl(2) + huge + jsonl(2) + b"{}" * 1000 + b"\n")
    entries, refusals, _ = read_all(source, per_chunk=100, max_line=1000)
    assert [line for line, _, _ in entries] == [1, 2, 4, 5]
    assert [(r.line, r.code) for r in refusals] == [(3, "line_too_long"), (6, "line_too_long")]
    assert source.largest_read <= CHUNK_BYTES


def test_the_line_past_the_item_bound_is_refused_and_ends_the_input():
    entries, refusals, _ = read_all(Bytes(jsonl(30)), per_chunk=4, max_items=10)
    assert len(entries) == 10
    assert [(r.line, r.code) for r in refusals] == [(11, "too_many_items")]


def test_every_upload_ref_is_found_even_across_the_scan_s_windows():
    ids = [f"{i:02d}" + "A" * 20 for i in range(40)]
    data = b"".join(json.dumps({"custom_id": i, "images": [f"upload://{id_}"], "pad": "x" * 50_000}).encode()
                    + b"\n" for i, id_ in enumerate(ids))
    assert len(data) > 1.5 * CHUNK_BYTES
    found = set().union(*upload_ids(Bytes(data)))
    assert found == set(ids)
