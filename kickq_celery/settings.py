"""The global configuration behind ``Kickq.config()``, and the options of one instance.

``Kickq.config()`` merges into one process-wide layer; every instance resolves its
options from the app's ``kickq_*`` settings, that layer and its own overrides, and
resolves them again whenever the layer changes (so config applies at run time).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from . import options as opts
from .exceptions import ConfigError

_lock = threading.Lock()
_config: dict[str, Any] = {}
_version = 0


def merge(*args: Any, **kwargs: Any) -> None:
    """``config(mapping)``, ``config(key=value)`` or ``config("key", value)``: validate all, then merge."""
    global _config, _version
    if len(args) == 2 and isinstance(args[0], str):
        values: dict[str, Any] = {args[0]: args[1]}
    elif len(args) == 1 and isinstance(args[0], Mapping):
        values = dict(args[0])
    elif args:
        raise ConfigError("Kickq.config takes a mapping, a key and a value, or keywords")
    else:
        values = {}
    values.update(kwargs)
    validated = opts.validate_options(values)
    with _lock:
        if "job_flags" in validated:
            merged = {k: dict(v) for k, v in _config.get("job_flags", {}).items()}
            for job, flags in validated["job_flags"].items():
                merged.setdefault(job, {}).update(flags)
            validated["job_flags"] = merged
        _config = {**_config, **validated}
        _version += 1


def clear() -> None:
    """Back to the defaults."""
    global _config, _version
    with _lock:
        _config = {}
        _version += 1


def snapshot() -> dict[str, Any]:
    """A snake_case copy of the global config, defaults included."""
    return opts.layer(_config)


def broker_redis(conf: Any) -> str | None:
    """The Celery broker as a kickq ``redis`` URL, when it is a Redis (a Sentinel service too)."""
    broker = conf.broker_url
    if not isinstance(broker, str):
        return None
    if broker.startswith(("redis://", "rediss://")):
        return broker
    if broker.startswith("redis+socket://"):
        return "unix://" + broker[len("redis+socket://"):]
    if broker.startswith("sentinel://"):
        service = (conf.broker_transport_options or {}).get("master_name")
        if not service:
            return None
        # kombu: "sentinel://[:password@]host:port[;sentinel://host:port...][/db]"
        urls = [part.strip() for part in broker.split(";") if part.strip()]
        auth, hosts, db = "", [], "0"
        for url in urls:
            rest = url.split("://", 1)[1]
            rest, _, path = rest.partition("/")
            db = path or db
            creds, _, hostport = rest.rpartition("@")
            auth = auth or (creds + "@" if creds else "")
            hosts.append(hostport)
        return f"redis+sentinel://{auth}{','.join(hosts)}/{service}/{db}"
    return None


class InstanceOptions:
    """The options of one Kickq instance, re-resolved when the global config changes."""

    def __init__(self, app: Any, overrides: Mapping[str, Any]) -> None:
        self.app = app
        self.overrides = opts.validate_options(overrides)
        self._resolved: dict[str, Any] = {}
        self._version = -1

    def get(self) -> dict[str, Any]:
        if self._version != _version:
            version = _version
            layered = opts.layer(opts.app_options(self.app), _config, self.overrides)
            if layered["redis"] is None:
                layered["redis"] = broker_redis(self.app.conf) or "redis://localhost:6379/0"
            self._resolved, self._version = layered, version
        return self._resolved
