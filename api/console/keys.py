"""The console's admin view: every API key (never a secret), each with a link to its jobs. Only for a key made
with `visionq keys create --admin`; to any other it is not there."""

from __future__ import annotations

from flask import g

from api.auth import charge_now
from api.console.blueprint import bp, page
from api.context import services
from shared.errors import NotFound


@bp.get("/keys")
def key_list():
    charge_now()
    if not g.key.admin:
        raise NotFound("no such page")
    return page("keys.html", keys=services().key_cache.keys.list())
