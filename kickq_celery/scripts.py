"""The Lua scripts as data: their sources, the arguments of each call, and its reply parsed.

No I/O here: :class:`~kickq_celery.store.JobStore` sends a :class:`Call` and hands
the reply to its ``parse``, so every client of the scripts (sync today, asyncio
later) shares one definition of each transition.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Generic, TypeVar

from .keys import FINAL_STATES
from .options import FLAG_DEFAULTS, Limits
from .records import Run

T = TypeVar("T")

_LIB = (f"local FLAG_DEFAULTS = [[{json.dumps(FLAG_DEFAULTS)}]]\n"
        + resources.files(__package__).joinpath("lua/lib.lua").read_text())
#: where a top-level definition of lib.lua starts
_DEFINITION = re.compile(r"^local (?:function )?(\w+)", re.M)
_STARTS = [m.start() for m in _DEFINITION.finditer(_LIB)]
#: lib.lua cut at its top-level definitions: (the name defined, its text), in order
_PIECES = [(_DEFINITION.match(_LIB, a).group(1), _LIB[a:b])  # type: ignore[union-attr]
           for a, b in zip(_STARTS, [*_STARTS[1:], len(_LIB)], strict=True)]


def with_lib(body: str) -> str:
    """A script's body after the definitions of lib.lua it uses, directly or through others.
    Redis runs the whole text at every call, so each helper left out is work saved per call.
    (A definition only uses earlier ones: one pass from the last finds them all.)"""
    used = set(re.findall(r"\w+", body))
    kept = []
    for name, piece in reversed(_PIECES):
        if name in used:
            kept.append(piece)
            used.update(re.findall(r"\w+", piece))
    return "".join(reversed(kept)) + body


#: the scripts that take a call id and keep their reply (see ``replayed`` in lua/lib.lua)
REPLAYED = ("delete", "reap", "promote", "tick", "limit")
NAMES = ("create", "start", "finish", "reap", "heartbeat", "delete", "promote", "unpark", "tick",
         "overdue", "limit", "progress", "turn")
_BODIES = {name: resources.files(__package__).joinpath(f"lua/{name}.lua").read_text() for name in NAMES}
#: Each script with the shared helpers it uses (lua/lib.lua) before it: what EVALSHA runs.
SOURCES = {name: with_lib(body) for name, body in _BODIES.items()}


def _library() -> tuple[str, dict[str, str]]:
    """The scripts as one Redis 7 function library: lib.lua is run once, when the library is
    loaded, not at every call as a script's copy is. Its name and the functions' carry a digest of
    the sources, so that versions of kickq sharing a Redis each call their own. Each function sets
    the KEYS, ARGV and P the helpers read (upvalues: a library has no such globals), then runs
    its script's body. Returns the library's text and the function of each script."""
    lib = _LIB.replace("local P = KEYS[1]\n", "local KEYS, ARGV, P\n", 1)
    assert lib != _LIB, "lib.lua defines P from KEYS[1]"
    digest = hashlib.sha1((lib + "".join(_BODIES.values())).encode()).hexdigest()[:16]
    functions = {name: f"kickq_{digest}_{name}" for name in NAMES}
    registered = "".join(
        f"redis.register_function('{functions[name]}', function(keys, args)\n"
        f"KEYS, ARGV, P = keys, args, keys[1]\n{body}\nend)\n" for name, body in _BODIES.items())
    return f"#!lua name=kickq_{digest}\n{lib}\n{registered}", functions


#: what FUNCTION LOAD takes, and the name FCALL calls each script by (see store.py)
LIBRARY, FUNCTIONS = _library()


def call_id() -> str:
    """A fresh id for a call that must not be applied twice (see ``replayed`` in lua/lib.lua)."""
    return uuid.uuid4().hex


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _opt(value: float | None) -> str:
    return "" if value is None else repr(float(value))


@dataclass(frozen=True)
class Call(Generic[T]):
    """One script call: its ARGV, the keys it declares besides the namespace prefix (always
    KEYS[1]), and how to read the reply."""

    script: str
    args: tuple[Any, ...]
    parse: Callable[[Any], T]
    keys: tuple[str, ...] = ()

    @property
    def replays(self) -> bool:
        """Whether the script answers this call sent again as the first time (ARGV[1] is its id)."""
        return self.script in REPLAYED or (self.script == "create" and self.args[0] != "")

    @property
    def request(self) -> tuple[Any, ...]:
        """What the call asks, without its id: the same request made again matches it."""
        return (self.script, *self.args[1:]) if self.replays else (self.script, *self.args)


# --- replies -----------------------------------------------------------------


@dataclass(frozen=True)
class Created:
    """The reply of create: its time (the Redis clock), and the jobs whose id existed
    (id -> (state, created_at, data_json, name)): those were not written again."""

    created_at: float
    existing: dict[str, tuple[str, float, str, str]]

    @classmethod
    def parse(cls, reply: Sequence[Any]) -> Created:
        return cls(float(reply[0]), {text(r[0]): (text(r[1]), float(r[2]), text(r[3]), text(r[4]))
                                     for r in reply[1]})

    @classmethod
    def combine(cls, replies: Sequence[Created]) -> Created:
        """The replies of the calls of one create: its time is the first call's."""
        return cls(replies[0].created_at, {k: v for reply in replies for k, v in reply.existing.items()})


@dataclass(frozen=True)
class Started:
    """The reply of the run guard."""

    status: str  # run | gone | skip | wait | early
    data: Any = None
    runs: tuple[Run, ...] = ()
    created_at: float = 0.0
    started_at: float = 0.0
    wait: float = 0.0  # early: seconds until the job is due
    process_timeout: float | None = None

    @classmethod
    def parse(cls, reply: Sequence[Any]) -> Started:
        status = text(reply[0])
        if status == "early":
            return cls(status, wait=float(reply[1]))
        if status != "run":
            return cls(status)
        runs = tuple(Run.from_dict(run) for run in json.loads(reply[2] or "[]"))
        return cls(status, json.loads(reply[1]), runs, float(reply[3]), float(reply[4]),
                   process_timeout=float(reply[5]) if reply[5] else None)


@dataclass(frozen=True)
class Ended:
    """What a finished (or reaped) run led to."""

    job_id: str
    verdict: str  # success | fail | retry | ghost | deleted | stale
    released: str | None = None
    due_in: float = 0.0
    tombstone: bool = False
    attempt: int = 0
    last_error: str = ""
    terminated: bool = False  # deleted with terminate while it ran: its outcome is discarded

    @property
    def final(self) -> bool:
        return self.verdict in FINAL_STATES

    @classmethod
    def parse(cls, job_id: str, reply: Sequence[Any]) -> Ended:
        if text(reply[0]) == "stale":
            return cls(job_id, "stale")
        verdict, released, due_in, tombstone, attempt, error = (
            None if item is None else text(item) for item in reply[:6])
        return cls(job_id, verdict or "", released, float(due_in or 0), tombstone == "1",
                   int(attempt or 0), error or "", len(reply) > 6 and text(reply[6]) == "1")


@dataclass(frozen=True)
class Claimed:
    """A waiting job whose message is to be published (claimed by a promoter, or overdue)."""

    job_id: str
    name: str
    attempt: int
    countdown: float
    lease_until: str
    process_timeout: float | None
    data: str = ""  # the start of the data's JSON, to show in the message


@dataclass(frozen=True)
class Deleted:
    """The reply of delete: 0 unknown | 1 deleted | 2 marked while running."""

    status: int
    tombstone: bool = False
    final: bool = False

    @classmethod
    def parse(cls, reply: Sequence[Any]) -> Deleted:
        if not reply[0]:
            return cls(0)
        return cls(int(reply[0]), text(reply[1]) == "1", bool(reply[2]))


def _promoted(reply: Sequence[Any]) -> tuple[list[Claimed], float | None]:
    claims = [Claimed(text(r[0]), text(r[1]), int(r[2]), float(r[3]), text(r[4]),
                      float(r[5]) if r[5] else None, text(r[6] or "")) for r in reply[0]]
    return claims, float(reply[1]) if reply[1] else None


def _overdue(reply: Sequence[Any]) -> list[Claimed]:
    return [Claimed(text(r[0]), text(r[1]), int(r[2]), 0.0, "", float(r[3]) if r[3] else None,
                    text(r[4] or "")) for r in reply]


# --- calls -------------------------------------------------------------------


#: the create script's ARGV before its jobs: the calls of one name, flags and key that agree on
#: it can be merged into one (see store.merged)
CREATE_HEADER = 10
#: the most jobs one create call writes (a create_many is as many calls, pipelined): each call
#: holds Redis for about a millisecond, never long enough to keep other clients waiting
CREATE_CHUNK = 50
#: the most waiting jobs one limit call wakes (the store calls again until fewer are woken)
RELEASE_CAP = 200
#: the most runs one reap call ends, and jobs one promote call claims (callers loop until fewer)
REAP_LIMIT = 20
PROMOTE_LIMIT = 100


def create(name: str, flags_json: str, process_timeout: float | None, tombstone: bool, delay: float,
           park: bool, jobs: Sequence[tuple[str, str]], queue: str | None = None,
           messages: Sequence[tuple[int, str]] = (), priority: int = 0,
           concurrency_key: str | None = None, chosen_ids: bool = False,
           forget_prefix: str = "") -> Call[Created]:
    """Write job records (id, data_json pairs), and with ``queue`` (the broker's list on the same
    Redis) push the messages with them: (count, message) for the next ``count`` jobs in turn, each
    pushed when one of its jobs is new. With ``chosen_ids`` (the caller's own ids), the
    call takes an id so that, sent again, it answers as the first time; ``forget_prefix`` (their
    result backend's key prefix, in the same Redis) drops an outcome an earlier job of the id left."""
    header = (call_id() if chosen_ids else "", name, flags_json, _opt(process_timeout), int(tombstone),
              delay, int(park), priority, concurrency_key or "", forget_prefix)
    if queue is None:
        return Call("create", (*header, *(item for job in jobs for item in job)), Created.parse)
    if sum(count for count, _ in messages) != len(jobs):
        raise ValueError("the messages must cover the jobs")
    items: list[Any] = []
    rest = iter(jobs)
    for count, message in messages:
        items.append(count)
        for _ in range(count):
            items.extend(next(rest))
        items.append(message)
    return Call("create", (*header, *items), Created.parse, (queue,))


def start(job_id: str, attempt: int, token: str, lock_timeout: float) -> Call[Started]:
    """Start a run if the guard lets it."""
    return Call("start", (job_id, attempt, token, lock_timeout), Started.parse)


def finish(job_id: str, token: str, outcome: str, payload: str, purge: float,
           traceback: str = "") -> Call[Ended]:
    """End a run; a failed one keeps its traceback on the run."""
    return Call("finish", (job_id, token, outcome, payload, purge, traceback),
                lambda r: Ended.parse(job_id, r))


def turn(job_id: str, token: str, outcome: str, payload: str, purge: float, traceback: str,
         next_id: str, attempt: int, next_token: str, lock_timeout: float) -> Call[tuple[Ended, Started]]:
    """End a run (as :func:`finish`) and start the next job's (as :func:`start`) in one call."""
    return Call("turn", (job_id, token, outcome, payload, purge, traceback, next_id, attempt, next_token,
                         lock_timeout),
                lambda reply: (Ended.parse(job_id, reply[0]), Started.parse(reply[1])))


def reap(purge: float, limit: int = REAP_LIMIT) -> Call[list[Ended]]:
    return Call("reap", (call_id(), purge, limit),
                lambda reply: [Ended.parse(text(r[0]), r[1:]) for r in reply])


def heartbeat(lock_timeout: float, runs: Sequence[tuple[str, str]],
              ahead: Sequence[str] = ()) -> Call[list[tuple[str, str]]]:
    """Renew the locks of (id, token) runs, and hold the jobs ``ahead`` in running chunks as long;
    replies (id, 'lost' | 'deleted' | 'terminate') for the runs no longer held and the jobs
    deleted while they run."""
    pairs = [item for run in runs for item in run]
    return Call("heartbeat", (lock_timeout, len(ahead), *ahead, *pairs),
                lambda reply: [(text(i), text(s)) for i, s in reply])


def delete(job_id: str, terminate: bool = False) -> Call[Deleted]:
    return Call("delete", (call_id(), job_id, int(terminate)), Deleted.parse)


def progress(job_id: str, token: str, value_json: str) -> Call[bool]:
    """Record a running job's progress; replies whether the run still held the job."""
    return Call("progress", (job_id, token, value_json), bool)


def promote(horizon: float, lease: float,
            limit: int = PROMOTE_LIMIT) -> Call[tuple[list[Claimed], float | None]]:
    """Claim parked jobs due within ``horizon``; replies them, and how soon the next one is due."""
    return Call("promote", (call_id(), horizon, lease, limit), _promoted)


def overdue(grace: float, limit: int = 100) -> Call[list[Claimed]]:
    """Waiting jobs due for more than ``grace`` seconds that no promoter or slot holds."""
    return Call("overdue", (grace, limit), _overdue)


def unpark(claims: Sequence[Claimed]) -> Call[Any]:
    return Call("unpark", tuple(x for c in claims for x in (c.job_id, c.lease_until)), lambda r: r)


def tick(schedule_key: str, tick_at: float, name: str, flags_json: str, process_timeout: float | None,
         tombstone: bool, job: tuple[str, str], priority: int = 0,
         concurrency_key: str | None = None) -> Call[bool]:
    """Claim a cron tick for this caller alone and create its job (id, data_json), parked as due."""
    return Call("tick", (call_id(), schedule_key, repr(tick_at), name, flags_json, _opt(process_timeout),
                         int(tombstone), priority, concurrency_key or "", *job), bool)


def limit(name: str, limits: Limits) -> Call[int]:
    """Set a name's limits (all None: clear them); replies how many waiting jobs it woke."""
    def arg(value: Any) -> str:
        return "" if value is None else repr(value)

    rate_n, rate_window = limits.rate or (None, None)
    return Call("limit", (call_id(), name, arg(limits.max_jobs_num), arg(rate_n), arg(rate_window),
                          arg(limits.max_jobs_per_key), RELEASE_CAP), int)
