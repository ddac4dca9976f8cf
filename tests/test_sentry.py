"""What an error tracker sees of kickq runs: the real sentry-sdk with its Celery integration reports
the final failure of a job once (the handler's own exception and stack), and nothing for a failed run
that runs again (Retry), a success, or a message that starts no run (Ignore).

Sentry runs in a subprocess (:func:`child`): ``sentry_sdk.init`` patches Celery for good (its
tracer, ``Task.apply_async``, kombu's ``Producer.publish``), and it must come before
``celery.worker.consumer`` is imported (by :mod:`kickq_celery.harness`): the consumer builds each
task's tracer with the ``build_tracer`` it imported, and Sentry only replaces the one in
``celery.app.trace``. The child prints what the SDK handed its (in-memory) transport as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("sentry_sdk", reason="sentry-sdk is in the dev extra")

if TYPE_CHECKING:
    from kickq_celery import Kickq

ROOT = Path(__file__).resolve().parent.parent
DSN = "https://public@example.invalid/1"  # never reached: the transport keeps the envelopes
MARK = "SENTRY-RESULT "


def child(redis_url: str, namespace: str) -> None:
    """In a fresh interpreter: Sentry, then a kickq worker, then the jobs; prints the result."""
    import socket

    # nothing may look up the DSN's host (urllib3, http.client and redis all resolve through this)
    refused: list[str] = []
    getaddrinfo = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        if "example.invalid" in str(host):
            refused.append(str(host))
            raise socket.gaierror(socket.EAI_NONAME, "no network in this test")
        return getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = guarded  # type: ignore[assignment]

    assert "celery.worker.consumer.consumer" not in sys.modules, "sentry_sdk.init must come first"
    import sentry_sdk
    from sentry_sdk.envelope import Envelope
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.dedupe import DedupeIntegration
    from sentry_sdk.transport import Transport

    class Collect(Transport):
        """Keeps every envelope the SDK sends."""

        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()
            self.envelopes: list[Envelope] = []

        def capture_envelope(self, envelope: Envelope) -> None:
            with self.lock:
                self.envelopes.append(envelope)

    collect = Collect()
    # the default integrations too (logging among them: an error kickq logged would be an event),
    # but not dedupe, which would hide the same exception captured twice
    sentry_sdk.init(dsn=DSN, integrations=[CeleryIntegration()], disabled_integrations=[DedupeIntegration()],
                    transport=collect)
    assert sentry_sdk.get_client().transport is collect

    from celery import signals

    from kickq_celery import Kickq
    from kickq_celery.harness import make_app, wait_for, worker
    from kickq_celery.plan import Message

    states: dict[str, list[str]] = {}
    lock = threading.Lock()

    def postrun(task_id: str, state: str, **_: Any) -> None:
        with lock:
            states.setdefault(task_id, []).append(state)

    def seen(task_id: str) -> list[str]:
        with lock:
            return list(states.get(task_id, []))

    signals.task_postrun.connect(postrun, weak=False)
    app = make_app(redis_url)
    kq = Kickq(app, redis=redis_url, redis_namespace=namespace, poll_interval=0.1, lock_timeout=2)

    @kq.process("fails")
    def explode(job: Any) -> Any:
        raise ValueError("boom")

    @kq.process("works")
    def works(job: Any) -> Any:
        return {"ran": job.data}

    gone = kq.create("works", "gone")  # deleted while its message waits for a worker
    assert gone is not None and kq.delete(gone.id)
    with worker(app):
        failed = kq.create("fails", None, retry=True, retry_count=1, retry_interval=0)
        ok = kq.create("works", "ok")
        assert failed is not None and ok is not None
        # the two runs of `failed` in either order: run 2 may end on another thread before run 1's
        # Retry reaches Celery
        wait_for(lambda: sorted(seen(failed.id)) == ["FAILURE", "RETRY"] and seen(ok.id) == ["SUCCESS"]
                 and seen(gone.id) == ["IGNORED"], 10, 0.05, f"the runs, so far {states}")
        # the same message again (a duplicate): the run guard drops it
        kq.publisher.publish(kq.queue("works"), kq.task_name("works"), None, [Message(ok.id, 1)])
        wait_for(lambda: seen(ok.id) == ["SUCCESS", "IGNORED"], 10, 0.05, f"the duplicate, so far {states}")
        time.sleep(0.3)  # anything the SDK would still send after the last run
    client = sentry_sdk.get_client()
    client.close(timeout=2)  # flushes, then drops (and kills) the transport
    sent = len(collect.envelopes)
    sentry_sdk.init()  # no DSN: a client with no transport; Celery's patches stay, and do nothing
    sentry_sdk.capture_message("after close")  # reaches no transport
    signals.task_postrun.disconnect(postrun)
    Kickq.reset()

    events = []
    types = []
    for envelope in collect.envelopes:
        for item in envelope.items:
            types.append(item.type)
            if item.type == "event":
                events.append(item.payload.json)
    result = {
        "ids": {"failed": failed.id, "ok": ok.id, "gone": gone.id},
        "states": states,
        "item_types": types,
        "events": [summary(event) for event in events],
        "refused": refused,
        "closed": client.transport is None and sentry_sdk.get_client().transport is None,
        "sent_after_close": len(collect.envelopes) - sent,
    }
    print(MARK + json.dumps(result), flush=True)


def summary(event: dict[str, Any]) -> dict[str, Any]:
    """The parts of a Sentry event the test looks at."""
    values = event.get("exception", {}).get("values", [])
    return {
        "level": event.get("level"),
        "logger": event.get("logger"),
        "message": event.get("message") or event.get("logentry"),
        "tags": event.get("tags", {}),
        "celery_job": event.get("extra", {}).get("celery-job"),
        "exceptions": [{
            "type": value.get("type"),
            "value": value.get("value"),
            "mechanism": value.get("mechanism"),
            "frames": [{key: frame.get(key) for key in ("function", "module", "filename", "context_line")}
                       for frame in value.get("stacktrace", {}).get("frames", [])],
        } for value in values],
    }


def run_child(redis_url: str, namespace: str) -> dict[str, Any]:
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from tests.test_sentry import child; child(*sys.argv[1:])",
         redis_url, namespace], cwd=ROOT, env=env, capture_output=True, text=True, timeout=45)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    assert proc.returncode == 0 and len(lines) == 1, (proc.stdout + proc.stderr)[-4000:]
    result: dict[str, Any] = json.loads(lines[0][len(MARK):])
    return result


def test_sentry_gets_one_event_per_failed_job_and_none_for_retries_successes_or_ignores(
        kickq: Kickq, kickq_redis_url: str) -> None:
    result = run_child(kickq_redis_url, kickq.options["redis_namespace"])
    ids = result["ids"]
    assert result["refused"] == [] and result["closed"] is True and result["sent_after_close"] == 0
    # Celery saw each message as what it was (postrun states), with Sentry in the worker
    states = {task_id: sorted(seen) for task_id, seen in result["states"].items()}
    assert states == {ids["failed"]: ["FAILURE", "RETRY"], ids["ok"]: ["IGNORED", "SUCCESS"],
                      ids["gone"]: ["IGNORED"]}
    assert result["states"][ids["ok"]] == ["SUCCESS", "IGNORED"]  # the duplicate came after the run
    assert [run.state for run in kickq.get(ids["failed"]).runs] == ["fail", "fail"]

    # one event in all: the final failure; not the first failed run (a Retry), the success, the ignores
    events = result["events"]
    assert len(events) == 1, json.dumps({"sent": result["item_types"], "events": events}, indent=1)
    event = events[0]
    assert event["level"] == "error"
    assert event["tags"]["celery_task_id"] == ids["failed"]
    assert event["celery_job"]["task_name"] == kickq.task_name("fails")
    [exception] = event["exceptions"]
    assert exception["type"] == "ValueError" and exception["value"] == "boom"
    assert exception["mechanism"]["type"] == "celery" and exception["mechanism"]["handled"] is False
    # the handler's own stack: its frame is the innermost, where it raised
    frames = exception["frames"]
    assert frames[-1]["function"] == "explode" and frames[-1]["filename"].endswith("test_sentry.py")
    assert frames[-1]["context_line"].strip() == 'raise ValueError("boom")'
    assert "run_job" in [frame["function"] for frame in frames]
