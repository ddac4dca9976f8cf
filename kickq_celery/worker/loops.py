"""What every worker does besides running jobs: promote parked jobs, reap dead runs,
publish lost messages again, fire cron ticks, follow up finished runs, and announce
the names it handles.

Leaderless: each step is one atomic claim in Redis, so running them in many
workers at once never does anything twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from ..connection import redis_errors
from ..cron import MISSED_TICK_GRACE, definitions, latest_tick
from ..exceptions import JobFailed, RedisUnavailable
from ..options import resolve_flags
from ..plan import Message, chunked, plan_create, shown
from ..scripts import REAP_LIMIT, Claimed, Ended
from ..tombstones import settle

if TYPE_CHECKING:
    from ..client import Kickq

logger = logging.getLogger("kickq_celery")


def publish_claims(kq: Kickq, claims: Sequence[Claimed]) -> None:
    """Publish the messages of claimed jobs (grouped per name; those due now ``chunk_size`` to a
    message, by the name's flags in this worker's options), then drop their leases."""
    groups: dict[tuple[str, float | None], list[Message]] = {}
    for claim in claims:
        groups.setdefault((claim.name, claim.process_timeout), []).append(
            Message(claim.job_id, claim.attempt, claim.countdown, shown(claim.name, claim.data)))
    for (name, process_timeout), messages in groups.items():
        size = resolve_flags(kq.options, name, {})["chunk_size"]
        kq.publisher.publish(kq.queue(name), kq.task_name(name), process_timeout, chunked(messages, size))
    kq.store.unpark(claims)


def promote(kq: Kickq) -> float | None:
    """Publish the parked jobs that came within the horizon; returns how many seconds until
    the next parked job is due (None: none is parked)."""
    while True:
        # the lease must outlast the horizon, or another promoter re-claims the job meanwhile
        claims, next_due = kq.store.promote(kq.horizon, lease=kq.horizon + 30.0)
        if not claims:
            return next_due
        publish_claims(kq, claims)


def redelivery_grace(kq: Kickq) -> float:
    """How long a due job may wait before its message is presumed lost."""
    return 2 * float(kq.options["lock_timeout"]) + kq.horizon


def redeliver(kq: Kickq) -> int:
    """Publish again the messages of due jobs that seem lost; returns how many.

    A Redis broker loses a message now and then: one a worker had reserved when
    it died comes back only after the ``visibility_timeout`` (an hour by default),
    and one in flight when a consumer's connection drops may not come back.
    A job overdue by :func:`redelivery_grace` whose queue is empty gets a new
    message; should the old one turn up after all, the run guard drops it.
    Other brokers give unacknowledged messages back themselves.
    """
    broker = kq.publisher.broker
    if broker is None:
        return 0
    by_name: dict[str, list[Claimed]] = {}
    for claim in kq.store.overdue(redelivery_grace(kq)):
        by_name.setdefault(claim.name, []).append(claim)
    sent = 0
    for name, claims in by_name.items():
        with redis_errors(broker):
            if broker.llen(kq.queue(name).name):
                continue  # a backlog: the job waits its turn
        for claim in claims:
            kq.publisher.publish(kq.queue(name), kq.task_name(name), claim.process_timeout,
                                 [Message(claim.job_id, claim.attempt, 0.0, shown(name, claim.data))])
        sent += len(claims)
    return sent


def after_run(kq: Kickq, ended: Ended, result: Any = None) -> None:
    """Follow-up of a finished or reaped run: settle waiters, hand on due jobs."""
    if ended.final and ended.tombstone:
        if ended.verdict == "success":
            settle(kq.app, kq.store, kq.options, ended.job_id, result)
        else:
            settle(kq.app, kq.store, kq.options, ended.job_id, JobFailed(
                f"job {ended.job_id} failed: {ended.last_error}", ended.job_id, ended.last_error))
    if ended.released or (ended.verdict in ("retry", "ghost") and ended.due_in <= kq.horizon):
        promote(kq)


def reap(kq: Kickq) -> int:
    """Turn the runs whose heartbeat lock lapsed into ghost runs; returns how many."""
    options = kq.options
    purge = options["purge_timeout"] if options["purge_jobs"] else 0
    total = 0
    while True:
        reaped = kq.store.reap(purge)
        for ended in reaped:
            logger.warning("kickq: run of job %s lost its heartbeat -> %s", ended.job_id, ended.verdict)
            after_run(kq, ended)
        total += len(reaped)
        if len(reaped) < REAP_LIMIT:
            return total


def fire_due(kq: Kickq) -> int:
    """Create the job of each schedule's latest tick, if this worker claims it."""
    defs, last, now = definitions(kq.store)
    fired = 0
    for d in defs:
        try:
            tick = latest_tick(d["cron"], ZoneInfo(d["tz"]), now)
            if (tick <= last.get(d["key"], 0) or tick < d.get("since", 0)
                    or now - tick > MISSED_TICK_GRACE):
                continue
            planned = plan_create(kq.options, kq.horizon, d["name"], [d["data"]], d["opts"], {})
            # claiming the tick creates its job too (parked as due): a worker that dies
            # between the two cannot lose the tick
            if kq.store.run(planned.tick_call(d["key"], tick)):
                fired += 1
        except RedisUnavailable:
            raise
        except Exception:  # one broken schedule must not stop the others
            logger.exception("kickq: schedule %s could not fire", d.get("key"))
    return fired


def worker_ttl(kq: Kickq) -> float:
    """How long a worker counts as live after it last announced itself."""
    return 3 * float(kq.options["lock_timeout"])


def announce(kq: Kickq, member: str, names: Sequence[str], withdrawn: Sequence[str] = ()) -> None:
    """Worker ``member`` handles ``names`` for :func:`worker_ttl` more (the worker step
    refreshes it every lock_timeout / 2), and no longer handles ``withdrawn``."""
    kq.store.announce(member, names, worker_ttl(kq), withdrawn)


def tick(kq: Kickq, sweep: bool = False) -> float | None:
    """One pass of the loops for one Kickq instance (and of the redelivery sweep if asked);
    returns how many seconds until its next parked job is due (None: none is parked)."""
    reap(kq)
    fire_due(kq)
    if sweep:
        sent = redeliver(kq)
        if sent:
            logger.warning("kickq: published the messages of %d overdue job(s) again", sent)
    # last, so that it publishes what the others parked as due (retries, cron jobs)
    return promote(kq)
