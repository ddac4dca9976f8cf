"""The command line: ``kickq --redis URL --namespace NS <command>`` and ``celery -A proj kickq <command>``.

Commands: ``stats [NAME]``, ``jobs [--state S] [--name N] [--offset O] [--limit L]``,
``get ID``, ``delete ID``, ``schedules`` and ``metrics --port N``. Each prints a
table, or JSON with ``--json`` (before or after the command). An empty listing says
which Redis and namespace it looked at (on stderr with ``--json``, which still prints
``[]``). Errors print one line on stderr and exit with 1.

The stand-alone ``kickq`` reads ``--redis`` / ``$KICKQ_REDIS`` (default
``redis://localhost:6379/0``) and ``--namespace`` / ``$KICKQ_NAMESPACE`` (default
``kickq``). The Celery plugin uses the Kickq settings of the ``-A`` app: the
first Kickq instance the app module created, else ``Kickq(app)``; its
``--redis`` / ``--namespace`` options pick or override them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import click
import redis

from .connection import masked_url
from .exceptions import JobNotFound, KickqError
from .keys import STATES

if TYPE_CHECKING:
    from celery import Celery

    from .client import Kickq
    from .records import JobRecord
    from .stats import NameStats

DEFAULT_REDIS = "redis://localhost:6379/0"
DEFAULT_NAMESPACE = "kickq"


class _Source:
    """Makes the Kickq of the invoked command on first use (so --help needs no Redis)."""

    def __init__(self, factory: Callable[[], Kickq], as_json: bool = False) -> None:
        self._factory = factory
        self._kickq: Kickq | None = None
        self.as_json = as_json  # --json given before the command

    @property
    def kickq(self) -> Kickq:
        if self._kickq is None:
            self._kickq = self._factory()
        return self._kickq


class _Group(click.Group):
    """Turns kickq and Redis errors into a one-line message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KickqError, redis.RedisError) as exc:
            text = " ".join(str(exc).split()) or "(no details)"
            raise click.ClickException(f"{type(exc).__name__}: {text}") from exc


# --- output -------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=_json_default))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    lines = [headers, ["-" * w for w in widths], *cells]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _short(text: Any, width: int = 60) -> Any:
    if isinstance(text, str):
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 3] + "..."
    return text


def _compact(value: Any) -> str:
    return _short(json.dumps(value, default=_json_default), 200)  # type: ignore[no-any-return]


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _say_empty(kq: Kickq, what: str, as_json: bool) -> None:
    """The line of an empty listing: which Redis and namespace were looked at (stderr with --json)."""
    click.echo(f"no {what} in namespace {kq.options['redis_namespace']!r} at {masked_url(kq.redis)}",
               err=as_json)


# `--state` also takes the words `kickq stats` prints (SUCCEEDED, FAILED).
STATE_ALIASES = {"succeeded": "success", "failed": "fail"}
_STATES_TEXT = (f"{', '.join(STATES)} "
                f"(or {', '.join(f'{alias} = {state}' for alias, state in STATE_ALIASES.items())})")


def _state_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None or value in STATES:
        return value
    if value in STATE_ALIASES:
        return STATE_ALIASES[value]
    raise click.ClickException(f"unknown state {value!r} for --state; one of {_STATES_TEXT}")


def _stats_row(label: str, s: NameStats) -> list[Any]:
    return [label, s.queued, s.delayed, s.processing, s.created, s.succeeded, s.failed, s.retried,
            s.ghosts, s.deleted, s.process_time["p50"], s.process_time["p95"], s.wait_time["avg"],
            s.completed_last_minute, s.completed_last_hour, s.workers]


_STATS_HEADERS = ["NAME", "QUEUED", "DELAYED", "PROCESSING", "CREATED", "SUCCEEDED", "FAILED", "RETRIED",
                  "GHOSTS", "DELETED", "RUN_P50_S", "RUN_P95_S", "WAIT_AVG_S", "DONE_1M", "DONE_1H",
                  "WORKERS"]


# --- commands -----------------------------------------------------------------


@click.command()
@click.argument("name", required=False)
@json_option
@click.pass_obj
def stats(source: _Source, name: str | None, as_json: bool) -> None:
    """Counts, gauges and timings per job name (or of NAME), and in total."""
    as_json = as_json or source.as_json
    result = source.kickq.stats(name)
    if as_json:
        _echo_json(result.to_dict())
    empty = name is None and not result.names
    if empty:
        _say_empty(source.kickq, "jobs", as_json)
    if as_json or empty:
        return
    rows = [_stats_row(n, s) for n, s in sorted(result.names.items())]
    if name is None:
        rows.append(_stats_row("(total)", result.total))
    click.echo(_table(_STATS_HEADERS, rows))


@click.command()
@click.option("--state", callback=_state_option, metavar="STATE",
              help=f"Only jobs in this state: {_STATES_TEXT}.")
@click.option("--name", help="Only jobs of this name.")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True, help="Skip this many.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most this many.")
@json_option
@click.pass_obj
def jobs(source: _Source, state: str | None, name: str | None, offset: int, limit: int,
         as_json: bool) -> None:
    """Job records, oldest first within each state."""
    as_json = as_json or source.as_json
    records = source.kickq.jobs(state, name, offset, limit)
    if as_json:
        _echo_json([record.to_dict() for record in records])
    if not records:
        what = " ".join(["jobs", *([f"named {name!r}"] if name else []),
                         *([f"in state {state!r}"] if state else []),
                         *([f"after the first {offset}"] if offset else [])])
        _say_empty(source.kickq, what, as_json)
    if as_json or not records:
        return
    click.echo(_table(["ID", "NAME", "STATE", "CREATED", "RUNS", "LAST_ERROR"],
                      [[r.id, r.name, r.state, r.created_at, len(r.runs), _short(r.last_error)]
                       for r in records]))


def _record_table(record: JobRecord) -> str:
    fields = [
        ("id", record.id), ("name", record.name), ("state", record.state),
        ("data", _compact(record.data)), ("created_at", record.created_at),
        ("updated_at", record.updated_at), ("scheduled_for", record.scheduled_for),
        ("finished_at", record.finished_at), ("complete", record.complete),
        ("success", record.success), ("result", _compact(record.result)),
        ("last_error", _short(record.last_error, 200)),
        ("total_process_time", record.total_process_time), ("progress", _compact(record.progress)),
        ("priority", record.priority), ("concurrency_key", record.concurrency_key),
        ("flags", _compact(record.flags)),
    ]
    text = _table(["FIELD", "VALUE"], fields)
    if record.runs:
        text += "\n\n" + _table(["RUN", "STARTED", "DURATION_S", "STATE", "ERROR"],
                                [[r.number, r.started_at, r.duration, r.state, _short(r.error)]
                                 for r in record.runs])
    last = next(((r.number, r.traceback) for r in reversed(record.runs) if r.traceback), None)
    if last is not None:
        text += f"\n\ntraceback of run {last[0]}:\n{last[1].rstrip()}"
    return text


@click.command()
@click.argument("job_id", metavar="ID")
@json_option
@click.pass_obj
def get(source: _Source, job_id: str, as_json: bool) -> None:
    """The record of job ID, with its runs."""
    record = source.kickq.get(job_id)
    if as_json or source.as_json:
        _echo_json(record.to_dict())
    else:
        click.echo(_record_table(record))


@click.command()
@click.argument("job_id", metavar="ID")
@json_option
@click.pass_obj
def delete(source: _Source, job_id: str, as_json: bool) -> None:
    """Delete job ID for good (a running job finishes its run, without retries)."""
    kq = source.kickq
    if not kq.delete(job_id):
        raise JobNotFound(f"no job {job_id!r} in namespace {kq.options['redis_namespace']!r}")
    if as_json or source.as_json:
        _echo_json({"id": job_id, "deleted": True})
    else:
        click.echo(f"deleted {job_id}")


@click.command()
@json_option
@click.pass_obj
def schedules(source: _Source, as_json: bool) -> None:
    """Cron schedules, with their next and last run."""
    as_json = as_json or source.as_json
    listing = source.kickq.schedules()
    if as_json:
        _echo_json(listing)
    if not listing:
        _say_empty(source.kickq, "schedules", as_json)
    if as_json or not listing:
        return
    click.echo(_table(["KEY", "NAME", "CRON", "TZ", "NEXT_RUN", "LAST_RUN"],
                      [[s["key"], s["name"], s["cron"], s["tz"], s["next_run"], s["last_run"]]
                       for s in listing]))


@click.command()
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="The port to listen on.")
@click.option("--addr", default="0.0.0.0", show_default=True, help="The address to listen on.")
@click.pass_obj
def metrics(source: _Source, port: int, addr: str) -> None:
    """Serve the Prometheus metrics of the namespace over HTTP until interrupted."""
    from .prometheus import make_metrics_server

    kq = source.kickq
    try:
        server = make_metrics_server(kq, port, addr)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {addr}:{port}: {exc.strerror or exc}") from exc
    click.echo(f"serving kickq metrics of namespace {kq.options['redis_namespace']!r} "
               f"on http://{addr}:{server.server_port}/metrics", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


COMMANDS = (stats, jobs, get, delete, schedules, metrics)


# --- the stand-alone `kickq` ------------------------------------------------------


def _standalone_kickq(redis_url: str, namespace: str) -> Kickq:
    from celery import Celery

    from .client import Kickq

    app = Celery("kickq-cli", set_as_current=False)
    return Kickq(app, redis=redis_url, redis_namespace=namespace)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--redis", "redis_url", envvar="KICKQ_REDIS", default=DEFAULT_REDIS, show_default=True,
              help="kickq's Redis URL (env KICKQ_REDIS).")
@click.option("--namespace", envvar="KICKQ_NAMESPACE", default=DEFAULT_NAMESPACE, show_default=True,
              help="kickq's Redis namespace (env KICKQ_NAMESPACE).")
@json_option
@click.pass_context
def cli(ctx: click.Context, redis_url: str, namespace: str, as_json: bool) -> None:
    """Inspect and manage kickq jobs in Redis."""
    ctx.obj = _Source(lambda: _standalone_kickq(redis_url, namespace), as_json)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``kickq`` console script."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="kickq")


# --- the `celery kickq` plugin ------------------------------------------------


def _app_kickq(app: Celery, redis_url: str | None, namespace: str | None) -> Kickq:
    from .client import Kickq
    from .registry import instances

    app.loader.import_default_modules()  # like `celery worker`: modules may create Kickq instances
    if redis_url is None:
        for kq in instances(app):
            if namespace is None or kq.options["redis_namespace"] == namespace:
                return kq
    overrides = {key: value for key, value in (("redis", redis_url), ("redis_namespace", namespace))
                 if value is not None}
    return Kickq(app, **overrides)


@click.group(name="kickq", cls=_Group)
@click.option("--redis", "redis_url", default=None,
              help="kickq's Redis URL (default: the app's Kickq settings).")
@click.option("--namespace", default=None, help="kickq's Redis namespace (default: the app's).")
@json_option
@click.pass_context
def celery_command(ctx: click.Context, /, redis_url: str | None, namespace: str | None,
                   as_json: bool, **_: Any) -> None:
    """Inspect and manage the kickq jobs of this app."""
    app = ctx.obj.app  # celery's CLIContext, made from -A
    ctx.obj = _Source(lambda: _app_kickq(app, redis_url, namespace), as_json)


for _command in COMMANDS:
    cli.add_command(_command)
    celery_command.add_command(_command)


if __name__ == "__main__":
    main()
