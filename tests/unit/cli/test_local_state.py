"""The local stack's address book: what `up` writes, and the demo's key kept without an address."""

from __future__ import annotations

import stat

from cli.local_state import STATE_FILE, read_state, remember_key, write_state


def test_remember_key_keeps_what_up_wrote_and_only_the_owner_reads_it(tmp_path):
    write_state(tmp_path, api_url="http://127.0.0.1:8000", redis_url="redis://127.0.0.1:1/0", key="vq_old")
    remember_key(tmp_path, "vq_new")
    assert read_state(tmp_path) == {"api_url": "http://127.0.0.1:8000", "redis_url": "redis://127.0.0.1:1/0",
                                    "key": "vq_new"}
    assert stat.S_IMODE((tmp_path / STATE_FILE).stat().st_mode) == 0o600


def test_remember_key_in_an_empty_folder_records_only_the_key(tmp_path):
    remember_key(tmp_path / "new", "vq_a")
    assert read_state(tmp_path / "new") == {"key": "vq_a"}
    assert read_state(tmp_path / "missing") == {}
