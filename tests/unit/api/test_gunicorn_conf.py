"""The gunicorn hooks: gunicorn ignores a misnamed one silently, so the names are checked against its settings."""

from __future__ import annotations

import gc
import inspect

from gunicorn.config import KNOWN_SETTINGS

from api import gunicorn_conf


def test_every_hook_is_one_gunicorn_knows():
    hooks = [name for name, value in vars(gunicorn_conf).items()
             if inspect.isfunction(value) and value.__module__ == gunicorn_conf.__name__ and not name.startswith("_")]
    assert "post_worker_init" in hooks
    assert set(hooks) <= {setting.name for setting in KNOWN_SETTINGS}


def test_a_worker_freezes_its_import_time_heap():
    assert gc.get_freeze_count() == 0
    try:
        gunicorn_conf.post_worker_init(worker=None)
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
