"""The data classes users get back: Job, JobRecord and Run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .exceptions import InvalidJobData, KickqError
from .keys import FINAL_STATES
from .options import read_flags

if TYPE_CHECKING:
    from .promise import Promise


def from_timestamp(value: Any) -> datetime | None:
    """A timezone-aware UTC datetime from epoch seconds ('' or None -> None)."""
    if value in (None, ""):
        return None
    return datetime.fromtimestamp(float(value), tz=timezone.utc)


@dataclass(frozen=True)
class Run:
    """One run of a job: ``state`` is success, fail or ghost; a failed run keeps the handler's
    ``traceback`` (its last 4,000 characters)."""

    number: int
    started_at: datetime | None
    duration: float
    state: str
    error: str | None = None
    traceback: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Run:
        return cls(int(raw["number"]), from_timestamp(raw["started_at"]),
                   float(raw["duration"]), raw["state"], raw.get("error"), raw.get("traceback"))


def runs_of(raw: dict[str, str]) -> list[Run]:
    """The runs of a record's hash. A job whose one run succeeded keeps no runs JSON (it would
    make the hash a full hashtable): that run is its start and its process time."""
    if "runs" in raw:
        return [Run.from_dict(run) for run in json.loads(raw["runs"])]
    if raw["state"] == "success" and raw.get("started_at"):
        return [Run(1, from_timestamp(raw["started_at"]), float(raw.get("total_process_time") or 0),
                    "success")]
    return []


@dataclass
class Job:
    """A job: what ``create()`` returns, and what a handler receives.

    ``create()`` fills ``id``, ``name``, ``state``, ``data`` (as stored: its JSON
    decoded), ``created_at`` (the Redis clock, UTC), ``created`` (True: a new job;
    False: a ``job_id`` that existed, and this is that job) and ``promise``
    (tombstoned jobs only); a handler's job also has ``run`` (1 for the first run),
    ``runs`` (the earlier runs), :meth:`progress`, and ``deleted`` (True once the job
    was deleted while it runs: a handler may stop then, its result is discarded).
    """

    id: str
    name: str
    state: str = "queued"
    promise: Promise | None = None
    data: Any = None
    run: int = 0
    runs: tuple[Run, ...] = ()
    created_at: datetime | None = None
    created: bool = True
    deleted: bool = False
    #: records a progress value of the running job (set by the worker); True when recorded
    recorder: Callable[[str], bool] | None = field(default=None, repr=False, compare=False)

    def progress(self, value: Any) -> bool:
        """Record ``value`` (JSON-serializable) as the job's progress (``get(id).progress``).

        Returns False, recording nothing, when this run no longer holds the job (it was
        reaped, or the job deleted). Raises InvalidJobData for a value that is not JSON.
        """
        if self.recorder is None:
            raise KickqError("progress() records the progress of a running job, in its handler")
        try:
            value_json = json.dumps(value, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise InvalidJobData(f"progress value is not JSON-serializable: {exc}") from None
        return self.recorder(value_json)


@dataclass(frozen=True)
class JobRecord:
    """A job record as kept in Redis (see ``Kickq.get``)."""

    id: str
    name: str
    state: str
    data: Any
    flags: dict[str, Any]
    created_at: datetime | None
    updated_at: datetime | None
    scheduled_for: datetime | None
    finished_at: datetime | None
    complete: bool
    success: bool
    result: Any
    last_error: str | None
    total_process_time: float
    runs: list[Run] = field(default_factory=list)
    progress: Any = None
    priority: int = 0
    concurrency_key: str | None = None

    @classmethod
    def from_hash(cls, job_id: str, raw: dict[str, str]) -> JobRecord:
        """The record of job ``job_id`` from its hash (which keeps no id: it is the key's)."""
        result = raw.get("result", "")
        return cls(
            id=job_id,
            name=raw["name"],
            state=raw["state"],
            data=json.loads(raw["data"]),
            flags=read_flags(json.loads(raw.get("flags") or "{}")),
            created_at=from_timestamp(raw.get("created_at")),
            updated_at=from_timestamp(raw.get("updated_at") or raw.get("created_at")),
            scheduled_for=from_timestamp(raw.get("scheduled_for") or raw.get("created_at")),
            finished_at=from_timestamp(raw.get("finished_at")),
            complete=raw["state"] in FINAL_STATES,
            success=raw["state"] == "success",
            result=json.loads(result) if result else None,
            last_error=raw.get("last_error") or None,
            total_process_time=float(raw.get("total_process_time") or 0),
            runs=runs_of(raw),
            progress=json.loads(raw["progress"]) if raw.get("progress") else None,
            priority=int(raw.get("priority") or 0),
            concurrency_key=raw.get("ckey") or None,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy (timestamps as ISO 8601)."""
        def iso(value: datetime | None) -> str | None:
            return value.isoformat() if value else None

        return {
            "id": self.id, "name": self.name, "state": self.state, "data": self.data,
            "flags": self.flags, "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at), "scheduled_for": iso(self.scheduled_for),
            "finished_at": iso(self.finished_at), "complete": self.complete,
            "success": self.success, "result": self.result, "last_error": self.last_error,
            "total_process_time": self.total_process_time, "progress": self.progress,
            "priority": self.priority, "concurrency_key": self.concurrency_key,
            "runs": [{"number": r.number, "started_at": iso(r.started_at),
                      "duration": r.duration, "state": r.state, "error": r.error,
                      "traceback": r.traceback}
                     for r in self.runs],
        }
