"""Aggregate stats from the counters the Lua scripts keep (no record scans)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

COUNTERS = ("created", "succeeded", "failed", "retried", "ghosts", "deleted")
GAUGES = ("queued", "delayed", "processing")


def summary(samples: list[float]) -> dict[str, float | None]:
    """avg / p50 / p95 / max of a sample (None when empty)."""
    if not samples:
        return {"avg": None, "p50": None, "p95": None, "max": None}
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]

    return {"avg": sum(ordered) / len(ordered), "p50": pct(0.50), "p95": pct(0.95),
            "max": ordered[-1]}


@dataclass(frozen=True)
class NameStats:
    """Stats of one job name (or the total)."""

    queued: int = 0
    delayed: int = 0
    processing: int = 0
    created: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    ghosts: int = 0
    deleted: int = 0
    process_time: dict[str, float | None] = field(default_factory=lambda: summary([]))
    wait_time: dict[str, float | None] = field(default_factory=lambda: summary([]))
    completed_last_minute: int = 0
    completed_last_hour: int = 0
    #: live workers that handle the name (in the total: distinct workers across the names)
    workers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _of(counters: dict[str, int], ptimes: list[float], wtimes: list[float],
        completions: dict[int, int], recent: dict[int, int], now: float, workers: int) -> NameStats:
    minute = int(now // 60)
    return NameStats(
        # retry and ghost re-runs wait on a timer: they count as delayed
        queued=counters.get("queued", 0),
        delayed=counters.get("delayed", 0) + counters.get("retry", 0) + counters.get("ghost", 0),
        processing=counters.get("processing", 0),
        **{name: counters.get(name, 0) for name in COUNTERS},
        process_time=summary(ptimes),
        wait_time=summary(wtimes),
        # per-second buckets for the last minute, per-minute ones (this and the 59 before) for the hour
        completed_last_minute=sum(n for sec, n in recent.items() if sec > now - 60),
        completed_last_hour=sum(n for m, n in completions.items() if m > minute - 60),
        workers=workers,
    )


@dataclass(frozen=True)
class Stats:
    """Stats per job name (``names``) and in total (``total``)."""

    names: dict[str, NameStats]
    total: NameStats

    @classmethod
    def from_raw(cls, raw: dict[str, dict[str, Any]]) -> Stats:
        names = {name: _of(r["counters"], r["process_times"], r["wait_times"],
                           r["completions"], r.get("recent", {}), r["now"], len(set(r.get("workers", ()))))
                 for name, r in raw.items()}
        counters: dict[str, int] = {}
        completions: dict[int, int] = {}
        recent: dict[int, int] = {}
        ptimes: list[float] = []
        wtimes: list[float] = []
        workers: set[str] = set()
        now = 0.0
        for r in raw.values():
            for key, value in r["counters"].items():
                counters[key] = counters.get(key, 0) + value
            for key, value in r["completions"].items():
                completions[key] = completions.get(key, 0) + value
            for key, value in r.get("recent", {}).items():
                recent[key] = recent.get(key, 0) + value
            ptimes += r["process_times"]
            wtimes += r["wait_times"]
            workers.update(r.get("workers", ()))
            now = r["now"]
        return cls(names, _of(counters, ptimes, wtimes, completions, recent, now, len(workers)))

    def __getitem__(self, name: str) -> NameStats:
        return self.names[name]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable copy."""
        return {"names": {n: s.to_dict() for n, s in self.names.items()},
                "total": self.total.to_dict()}
