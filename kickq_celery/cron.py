"""Cron schedules kept in Redis and fired by the workers themselves (no beat).

croniter parses the expressions: five fields, or six with seconds last.
Every worker looks at the latest tick of each schedule; one atomic claim per
tick makes exactly one worker create its job. Ticks missed while no worker
ran are skipped: only the latest one fires, and only while it is recent.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from .exceptions import InvalidJobOptions
from .records import from_timestamp
from .store import redis_errors

if TYPE_CHECKING:
    from .client import Kickq

#: A tick older than this when a worker first sees it is skipped.
MISSED_TICK_GRACE = 60.0


def check_cron(expression: Any, tz: Any) -> ZoneInfo:
    """Validate a cron expression and time zone; returns the zone."""
    if not isinstance(expression, str) or len(expression.split()) not in (5, 6):
        raise InvalidJobOptions(f"a cron expression has 5 or 6 fields, got {expression!r}")
    if not croniter.is_valid(expression):
        raise InvalidJobOptions(f"invalid cron expression {expression!r}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise InvalidJobOptions(f"unknown time zone {tz!r}") from None


def latest_tick(expression: str, zone: ZoneInfo, now: float) -> float:
    """The latest tick at or before ``now`` (epoch seconds)."""
    start = datetime.fromtimestamp(now, tz=zone)
    itr = croniter(expression, start)
    if itr.match(expression, start) and start.microsecond == 0:
        return now
    return float(itr.get_prev(float))


def next_tick(expression: str, zone: ZoneInfo, now: float) -> float:
    return float(croniter(expression, datetime.fromtimestamp(now, tz=zone)).get_next(float))


def schedule(kq: Kickq, name: str, cron: str, data: Any, opts: Any, tz: str) -> str:
    from .client import _check_name, _dumps
    from .options import validate_flags

    _check_name(name)
    check_cron(cron, tz)
    flags = validate_flags(opts or {})
    if callable(flags.get("retry_interval")):
        raise InvalidJobOptions("a schedule's retry_interval must be seconds or a list, not a callable")
    definition = {"name": name, "cron": cron, "tz": tz, "data": data, "opts": flags}
    text = _dumps(definition, "schedule data")
    key = f"{name}:{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    with redis_errors(kq.redis):
        kq.redis.hset(kq.keys.schedules, key, json.dumps({**definition, "key": key}))
    return key


def unschedule(kq: Kickq, key: str) -> bool:
    with redis_errors(kq.redis):
        pipe = kq.redis.pipeline()
        pipe.hdel(kq.keys.schedules, key)
        pipe.hdel(kq.keys.schedule_ticks, key)
        return bool(pipe.execute()[0])


def _definitions(kq: Kickq) -> tuple[list[dict[str, Any]], dict[str, float], float]:
    with redis_errors(kq.redis):
        pipe = kq.redis.pipeline(transaction=False)
        pipe.hgetall(kq.keys.schedules)
        pipe.hgetall(kq.keys.schedule_ticks)
        pipe.time()
        defs, ticks, (sec, micros) = pipe.execute()
    parsed = [json.loads(v) for v in defs.values()]
    last = {k.decode() if isinstance(k, bytes) else k: float(v) for k, v in ticks.items()}
    return parsed, last, sec + micros / 1e6


def schedules(kq: Kickq) -> list[dict[str, Any]]:
    defs, last, now = _definitions(kq)
    listing = []
    for d in sorted(defs, key=lambda d: d["key"]):
        zone = ZoneInfo(d["tz"])
        listing.append({
            "key": d["key"], "name": d["name"], "cron": d["cron"], "tz": d["tz"],
            "next_run": from_timestamp(next_tick(d["cron"], zone, now)),
            "last_run": from_timestamp(last.get(d["key"])),
        })
    return listing


def fire_due(kq: Kickq) -> int:
    """Create the job of each schedule's latest tick, if this worker claims it."""
    defs, last, now = _definitions(kq)
    fired = 0
    for d in defs:
        tick = latest_tick(d["cron"], ZoneInfo(d["tz"]), now)
        if tick <= last.get(d["key"], 0) or now - tick > MISSED_TICK_GRACE:
            continue
        if kq.store.claim_tick(d["key"], tick):
            kq.create(d["name"], d["data"], d["opts"])
            fired += 1
    return fired

