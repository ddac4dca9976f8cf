"""examples/celery_tasks.py (one Celery task before and after `@kq.task`) runs as a user
would run it."""

from __future__ import annotations

import pytest
import redis

from tests.test_examples_tombstone_retries import run_example


@pytest.mark.timeout(90)
def test_celery_tasks_example(kickq_redis_url):
    lines, namespace = run_example("celery_tasks.py", kickq_redis_url)
    assert lines == [
        "before: Celery task ran, outbox [(7, 'reset')]",
        "after: delay -> sent 'reset' to user 7",
        "after: countdown=1 is PENDING at first, then -> sent 'digest' to user 7",
        "after: eta -> sent 'welcome' to user 8",
        "after: retried -> sent 'welcome' to user 13",
        "after: runs ['fail', 'success']",
        "after: failed for good -> ValueError: user -1 has no email address",
        "after: revoked -> JobDeleted, state REVOKED",
        "after: user 9 got []",
        "after: plain call -> sent 'welcome' to user 10",
        "after: job emails.send_email data {'args': [7], 'kwargs': {'template': 'reset'}} state success",
        "stats: 6 created, 4 succeeded, 1 failed, 3 retried, 1 deleted",
        "outbox: [(7, 'reset'), (7, 'reset'), (7, 'digest'), (8, 'welcome'), (13, 'welcome'), "
        "(10, 'welcome')]",
        "done",
    ]
    # its Celery queue went with the namespace too
    assert list(redis.Redis.from_url(kickq_redis_url).scan_iter(match=f"*{namespace}.*")) == []
