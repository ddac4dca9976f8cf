"""Cron schedules kept in Redis and fired by the workers themselves (no beat).

croniter parses the expressions: five fields, or six with seconds last.
Every worker looks at the latest tick of each schedule; one atomic claim per
tick makes exactly one worker create its job. Ticks missed while no worker
ran are skipped: only the latest one fires, and only while it is recent.
Ticks from before a schedule was created never fire.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from .exceptions import InvalidJobOptions, RedisUnavailable
from .records import from_timestamp
from .store import redis_errors, redis_now

if TYPE_CHECKING:
    from .client import Kickq

logger = logging.getLogger("kickq_celery")

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
        # "since": ticks before the schedule existed never fire; scheduling the same
        # definition again (same key) keeps the original
        stored = json.dumps({**definition, "key": key, "since": redis_now(kq.redis)})
        kq.redis.hsetnx(kq.keys.schedules, key, stored)
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
        try:
            tick = latest_tick(d["cron"], ZoneInfo(d["tz"]), now)
            if (tick <= last.get(d["key"], 0) or tick < d.get("since", 0)
                    or now - tick > MISSED_TICK_GRACE):
                continue
            if kq.store.claim_tick(d["key"], tick):
                kq.create(d["name"], d["data"], d["opts"])
                fired += 1
        except RedisUnavailable:
            raise
        except Exception:  # one broken schedule must not stop the others
            logger.exception("kickq: schedule %s could not fire", d.get("key"))
    return fired

