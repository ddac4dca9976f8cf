"""Cron schedules kept in Redis and fired by the workers themselves (no beat).

croniter parses the expressions: five fields, or six with seconds last.
Every worker looks at the latest tick of each schedule; one atomic claim per
tick makes exactly one worker create its job (``worker.loops.fire_due``).
Ticks missed while no worker ran are skipped: only the latest one fires, and
only while it is recent.
Ticks from before a schedule was created never fire.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from .connection import redis_errors, redis_now
from .exceptions import InvalidJobOptions
from .options import validate_flags
from .plan import check_name, dumps
from .records import from_timestamp

if TYPE_CHECKING:
    from .store import JobStore

#: A tick older than this when a worker first sees it is skipped.
MISSED_TICK_GRACE = 60.0


def check_cron(expression: Any, tz: Any) -> ZoneInfo:
    """Validate a cron expression and time zone; returns the zone."""
    if not isinstance(expression, str) or len(expression.split()) not in (5, 6):
        raise InvalidJobOptions(f"a cron expression has 5 or 6 fields, got {expression!r}")
    if not croniter.is_valid(expression):
        raise InvalidJobOptions(f"invalid cron expression {expression!r}")
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise InvalidJobOptions(f"unknown time zone {tz!r}") from None
    try:
        # valid syntax may still never match ("0 0 31 2 *"); such a schedule would never fire
        next_tick(expression, zone, datetime.now(tz=zone).timestamp())
    except CroniterError:
        raise InvalidJobOptions(f"cron expression {expression!r} never matches a date") from None
    return zone


def latest_tick(expression: str, zone: ZoneInfo, now: float) -> float:
    """The latest tick at or before ``now`` (epoch seconds)."""
    # ticks fall on whole seconds and get_prev() is strictly before its start
    start = datetime.fromtimestamp(math.floor(now) + 1, tz=zone)
    return float(croniter(expression, start).get_prev(float))


def next_tick(expression: str, zone: ZoneInfo, now: float) -> float:
    return float(croniter(expression, datetime.fromtimestamp(now, tz=zone)).get_next(float))


def schedule(store: JobStore, name: str, cron: str, data: Any, opts: Any, tz: str) -> str:
    """Store a schedule (validated first); the same definition again gives the same key."""
    check_name(name)
    check_cron(cron, tz)
    flags = validate_flags(opts or {})
    if callable(flags.get("retry_interval")):
        raise InvalidJobOptions("a schedule's retry_interval must be seconds or a list, not a callable")
    definition = {"name": name, "cron": cron, "tz": tz, "data": data, "opts": flags}
    text = dumps(definition, "schedule data")
    key = f"{name}:{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    client = store.client
    with redis_errors(client):
        # "since": ticks before the schedule existed never fire; scheduling the same
        # definition again (same key) keeps the original
        stored = json.dumps({**definition, "key": key, "since": redis_now(client, store.keys.schedules)})
        client.hsetnx(store.keys.schedules, key, stored)
    return key


def unschedule(store: JobStore, key: str) -> bool:
    with redis_errors(store.client):
        pipe = store.client.pipeline(transaction=False)
        pipe.hdel(store.keys.schedules, key)
        pipe.hdel(store.keys.schedule_ticks, key)
        return bool(pipe.execute()[0])


def definitions(store: JobStore) -> tuple[list[dict[str, Any]], dict[str, float], float]:
    """Every schedule's definition, the last tick claimed of each, and the Redis clock."""
    with redis_errors(store.client):
        pipe = store.client.pipeline(transaction=False)
        pipe.hgetall(store.keys.schedules)
        pipe.hgetall(store.keys.schedule_ticks)
        defs, ticks = pipe.execute()
        now = redis_now(store.client, store.keys.schedules)
    parsed = [json.loads(v) for v in defs.values()]
    last = {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in ticks.items()}
    return parsed, last, now


def schedules(store: JobStore) -> list[dict[str, Any]]:
    defs, last, now = definitions(store)
    listing = []
    for d in sorted(defs, key=lambda d: d["key"]):
        zone = ZoneInfo(d["tz"])
        listing.append({
            "key": d["key"], "name": d["name"], "cron": d["cron"], "tz": d["tz"],
            "next_run": from_timestamp(next_tick(d["cron"], zone, now)),
            "last_run": from_timestamp(last.get(d["key"])),
        })
    return listing
