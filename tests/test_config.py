"""The configuration facade: Kickq.config / reset / get_config, app.conf.kickq_*,
the precedence of option layers, and validation that changes nothing on error."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from types import ModuleType, SimpleNamespace

import pytest
import redis
from celery import Celery

import kickq_celery
from kickq_celery import ConfigError, Kickq
from kickq_celery import options as opts_module
from kickq_celery.options import OPTIONS
from kickq_celery.testing import make_app, purge_namespace, wait_for

DEFAULTS = {
    "redis": None,
    "redis_namespace": "kickq",
    "job_flags": {},
    "delay": None,
    "tombstone": False,
    "tombstone_timeout": 10,
    "retry": False,
    "retry_count": 3,
    "retry_interval": 1800,
    "process_timeout": None,
    "ghost_retry": True,
    "ghost_times": 1,
    "ghost_interval": 1800,
    "purge_jobs": True,
    "purge_timeout": 86400,
}


@pytest.fixture(autouse=True)
def clean_config() -> Iterator[None]:
    """The config is global: every test starts and ends with the defaults."""
    Kickq.reset()
    yield
    Kickq.reset()


def test_defaults_are_the_documented_ones():
    config = Kickq.get_config()
    for key, value in DEFAULTS.items():
        assert config[key] == value, key
    # every key is snake_case
    assert all(key == key.lower() for key in config)


@pytest.mark.parametrize("form", ["mapping", "keywords", "key_value", "module_alias"])
@pytest.mark.parametrize("style", ["camel", "snake"])
def test_config_forms_and_key_styles(form, style):
    key = "tombstoneTimeout" if style == "camel" else "tombstone_timeout"
    if form == "mapping":
        Kickq.config({key: 5, "redisNamespace" if style == "camel" else "redis_namespace": "myapp"})
    elif form == "keywords":
        Kickq.config(**{key: 5, "redisNamespace" if style == "camel" else "redis_namespace": "myapp"})
    elif form == "key_value":
        Kickq.config(key, 5)
        Kickq.config("redisNamespace" if style == "camel" else "redis_namespace", "myapp")
    else:
        kickq_celery.config({key: 5})
        kickq_celery.config("redisNamespace" if style == "camel" else "redis_namespace", "myapp")
    config = Kickq.get_config()
    assert config["tombstone_timeout"] == 5
    assert config["redis_namespace"] == "myapp"
    assert "tombstoneTimeout" not in config and "redisNamespace" not in config


def test_config_merges_and_timedelta_is_seconds():
    Kickq.config({"redis": "redis://127.0.0.1:6379/3", "retryCount": 7})
    Kickq.config(process_timeout=timedelta(minutes=1))
    Kickq.config("purgeJobs", False)
    config = Kickq.get_config()
    assert config["redis"] == "redis://127.0.0.1:6379/3"
    assert config["retry_count"] == 7
    assert config["process_timeout"] == 60
    assert config["purge_jobs"] is False
    # untouched keys keep their defaults
    assert config["ghost_times"] == 1


def test_job_flags_merge_per_name_and_flag():
    Kickq.config(jobFlags={"a": {"retry": True, "retryCount": 2}})
    Kickq.config(job_flags={"a": {"retry_count": 5}, "b": {"delay": 1}})
    assert Kickq.get_config()["job_flags"] == {
        "a": {"retry": True, "retry_count": 5}, "b": {"delay": 1}}


def test_get_config_is_a_copy():
    Kickq.config(job_flags={"a": {"retry": True}})
    copy = Kickq.get_config()
    copy["retry_count"] = 99
    copy["job_flags"]["a"]["retry"] = False
    copy["job_flags"]["b"] = {}
    config = Kickq.get_config()
    assert config["retry_count"] == 3
    assert config["job_flags"] == {"a": {"retry": True}}


@pytest.mark.parametrize("reset", [Kickq.reset, kickq_celery.reset])
def test_reset_restores_the_defaults(reset):
    Kickq.config({"redisNamespace": "other", "retry": True, "jobFlags": {"x": {"delay": 3}}})
    assert Kickq.get_config()["redis_namespace"] == "other"
    reset()
    config = Kickq.get_config()
    for key, value in DEFAULTS.items():
        assert config[key] == value, key


def test_reset_closes_connections_and_kickq_still_works(kickq_app, kickq_redis_url, kickq_namespace):
    # a client name in the URL lets the server tell us which connections are kickq's
    kq = Kickq(kickq_app, redis=f"{kickq_redis_url}?client_name={kickq_namespace}",
               redis_namespace=kickq_namespace)
    observer = redis.Redis.from_url(kickq_redis_url)

    def connections() -> int:
        return sum(1 for c in observer.client_list() if c.get("name") == kickq_namespace)

    try:
        kq.create("x", 1)
        assert connections() >= 1
        Kickq.reset()
        wait_for(lambda: connections() == 0, 10, 0.05, "kickq's connections to close")
        # a reset is not a shutdown: the instance reconnects on its next call
        assert kq.get(kq.create("x", 2).id).data == 2
    finally:
        purge_namespace(kq)
        observer.close()


def test_app_conf_settings(kickq_redis_url, kickq_namespace):
    app = make_app(kickq_redis_url)
    app.conf.kickq_redis_namespace = kickq_namespace
    app.conf.kickq_retry_count = 6
    app.conf.kickq_job_flags = {"a": {"delay": 2}}
    kq = Kickq(app)
    try:
        assert kq.options["redis_namespace"] == kickq_namespace
        assert kq.options["retry_count"] == 6
        assert kq.options["job_flags"] == {"a": {"delay": 2}}
        # the redis default is the app's broker when it is a redis:// URL
        assert kq.options["redis"] == kickq_redis_url
        assert kq.task_name("a") == f"{kickq_namespace}.a"
    finally:
        app.close()


def test_redis_default_without_a_redis_broker():
    app = make_app("amqp://guest:guest@127.0.0.1:5672//")
    try:
        assert Kickq(app).options["redis"] == "redis://localhost:6379/0"
    finally:
        app.close()


def test_config_applies_to_existing_instances_at_run_time(kickq_redis_url):
    app = make_app(kickq_redis_url)
    kq = Kickq(app)
    try:
        assert kq.options["retry_count"] == 3
        Kickq.config(retry_count=4)
        assert kq.options["retry_count"] == 4
        Kickq.reset()
        assert kq.options["retry_count"] == 3
    finally:
        app.close()


def test_precedence_of_every_layer(kickq, kickq_namespace, kickq_redis_url):
    """create flags > job_flags[name] > Kickq(**overrides) > Kickq.config() > app.conf > defaults.

    Each layer sets one flag fewer than the layer below it, so each flag shows
    which layer won for it; read back from the stored records.
    """
    app = make_app(kickq_redis_url)
    for flag in ("process_timeout", "retry_interval", "tombstone_timeout", "retry_count", "ghost_times"):
        app.conf[f"kickq_{flag}"] = 1
    app.conf.kickq_redis_namespace = kickq_namespace
    Kickq.config({"retryInterval": 2, "tombstoneTimeout": 2, "retryCount": 2, "ghostTimes": 2})
    Kickq.config(jobFlags={"layered": {"retryCount": 4, "ghostTimes": 4}})
    kq = Kickq(app, redis=kickq_redis_url, tombstone_timeout=3, retry_count=3, ghost_times=3)
    try:
        job = kq.create("layered", None, ghost_times=5)
        flags = kq.get(job.id).flags
        assert flags["ghost_interval"] == 1800  # default
        assert flags["process_timeout"] == 1  # app.conf.kickq_*
        assert flags["retry_interval"] == 2  # Kickq.config()
        assert flags["tombstone_timeout"] == 3  # Kickq(**overrides)
        assert flags["retry_count"] == 4  # job_flags[name]
        assert flags["ghost_times"] == 5  # create() flags
        # job_flags apply to their own name only
        other = kq.get(kq.create("other").id).flags
        assert (other["retry_count"], other["ghost_times"]) == (3, 3)
        # the fixture's instance overrides only redis and namespace: it sees config > app.conf
        assert kickq.get(kickq.create("other").id).flags["retry_count"] == 2
    finally:
        app.close()


def test_job_flags_given_in_overrides_and_app_conf(kickq_redis_url, kickq_namespace, kickq):
    # (the kickq fixture removes the namespace's keys afterwards)
    app = make_app(kickq_redis_url)
    app.conf.kickq_job_flags = {"j": {"retry": True, "retry_count": 1}}
    kq = Kickq(app, redis=kickq_redis_url, redis_namespace=kickq_namespace,
               job_flags={"j": {"retryCount": 2}}, retry_count=9)
    try:
        flags = kq.get(kq.create("j").id).flags
        assert flags["retry"] is True
        assert flags["retry_count"] == 2  # overrides' job_flags merge over app.conf's
    finally:
        app.close()


# --- validation ---------------------------------------------------------------


@pytest.mark.parametrize("call, key, suggestion", [
    (lambda: Kickq.config({"redisNamespce": "x"}), "redisNamespce", "redisNamespace"),
    (lambda: Kickq.config(tombstone_timout=3), "tombstone_timout", "tombstone_timeout"),
    (lambda: Kickq.config("procesTimeout", 3), "procesTimeout", "processTimeout"),
    (lambda: kickq_celery.config(purge_jobz=True), "purge_jobz", "purge_jobs"),
    (lambda: Kickq.config(zzzzzz=1), "zzzzzz", None),
])
def test_unknown_key_names_it_with_a_suggestion(call, key, suggestion):
    before = Kickq.get_config()
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert repr(key) in message
    if suggestion:
        assert f"did you mean {suggestion!r}" in message
    else:
        assert "did you mean" not in message
    assert Kickq.get_config() == before


@pytest.mark.parametrize("key, value", [
    ("tombstone", "yes"),  # wrong type
    ("retry", 1),  # an int is not a bool
    ("retryCount", -1),  # out of range
    ("retry_count", 1.5),
    ("ghostTimes", True),
    ("tombstone_timeout", 0),
    ("purgeTimeout", -5),
    ("delay", float("nan")),
    ("delay", "3"),
    ("processTimeout", float("inf")),
    ("purgeTimeout", 1e16),  # PEXPIRE in ms would overflow
    ("delay", timedelta(days=365 * 101)),
    ("retry_interval", []),
    ("retry_interval", [1, "x"]),
    ("redis", "http://localhost"),
    ("redis", 6379),
    ("redisNamespace", ""),
    ("redis_namespace", "has space"),
    ("redis_namespace", "x" * 65),
    ("jobFlags", {"a": {"nope": 1}}),
    ("job_flags", {"a": {"retry": "yes"}}),
    ("job_flags", ["a"]),
])
def test_bad_value_names_the_key_and_changes_nothing(key, value):
    Kickq.config(retry_count=5)
    before = Kickq.get_config()
    with pytest.raises(ConfigError) as info:
        Kickq.config(key, value)
    assert repr(key) in str(info.value)
    assert Kickq.get_config() == before


def test_one_bad_key_in_a_mapping_changes_nothing():
    before = Kickq.get_config()
    for bad in ({"retryCount": 7, "redisNamespce": "x"},
                {"retry_count": 7, "tombstone": "yes"},
                {"jobFlags": {"a": {"retry": True}}, "ghostTimes": -1}):
        with pytest.raises(ConfigError):
            Kickq.config(bad)
        with pytest.raises(ConfigError):
            Kickq.config(**bad)
    assert Kickq.get_config() == before


def test_bad_call_shapes():
    before = Kickq.get_config()
    for args in ((1,), ("retry",), ("retry", True, 3), ([("retry", True)],)):
        with pytest.raises(ConfigError):
            Kickq.config(*args)
    assert Kickq.get_config() == before


def test_bad_overrides_and_app_conf_raise_config_error(kickq_redis_url):
    app = make_app(kickq_redis_url)
    try:
        with pytest.raises(ConfigError, match="retyr"):
            Kickq(app, retyr=True)
        with pytest.raises(ConfigError, match="'retry_count'"):
            Kickq(app, retry_count="3")
        app.conf.kickq_tombstone_timeout = "soon"
        with pytest.raises(ConfigError, match="tombstone_timeout"):
            Kickq(app).options  # noqa: B018 (resolving the options validates app.conf)
    finally:
        app.close()


@pytest.mark.parametrize("key, value, suggestion", [
    ("kickq_redis_namspace", "x", "kickq_redis_namespace"),
    ("kickq_tombstone_timout", 3, "kickq_tombstone_timeout"),
    ("kickq_retryCount", 2, "kickq_retry_count"),  # camelCase is for Kickq.config(), not settings
    ("KICKQ_REDIS_NAMESPACE", "x", "kickq_redis_namespace"),  # Celery reads the exact key only
    ("kickq_redis_namspace", None, "kickq_redis_namespace"),  # even when None
    ("kickq_zzzzzz", 1, None),
])
def test_a_typo_in_app_conf_raises_on_first_read_with_a_suggestion(kickq_redis_url, key, value, suggestion):
    app = make_app(kickq_redis_url)
    app.conf.kickq_retry_count = 4  # a good setting beside the typo
    app.conf[key] = value
    try:
        kq = Kickq(app)  # constructing reads no options
        for _ in range(2):  # nor is the bad setting forgotten after the first failure
            with pytest.raises(ConfigError) as info:
                kq.options  # noqa: B018
            message = str(info.value)
            assert message.startswith(f"unknown Celery setting {key!r}"), message
            if suggestion:
                assert message.endswith(f"; did you mean {suggestion!r}?"), message
            else:
                assert "did you mean" not in message
        del app.conf[key]
        Kickq.config(retry=False)  # (a config change makes the instance resolve again)
        assert kq.options["retry_count"] == 4
    finally:
        app.close()


def test_app_conf_typo_message_is_the_documented_one(kickq_redis_url):
    app = make_app(kickq_redis_url)
    app.conf.kickq_redis_namspace = "x"
    try:
        with pytest.raises(ConfigError) as info:
            Kickq(app).options  # noqa: B018
        assert str(info.value) == ("unknown Celery setting 'kickq_redis_namspace'; "
                                   "did you mean 'kickq_redis_namespace'?")
    finally:
        app.close()


def _django_style_app(kickq_redis_url: str, **settings: object) -> Celery:
    """An app configured like examples/django_project: config_from_object(..., namespace="CELERY")."""
    app = Celery("django-style", set_as_current=False)
    app.config_from_object(SimpleNamespace(CELERY_BROKER_URL=kickq_redis_url, **settings), namespace="CELERY")
    return app


def test_django_namespaced_settings_and_their_typos(kickq_redis_url):
    app = _django_style_app(kickq_redis_url, CELERY_KICKQ_RETRY_COUNT=5, CELERY_KICKQ_REDIS_NAMESPACE="dj",
                            # a project's own setting: not in Celery's namespace, so not kickq's
                            KICKQ_API_URL="https://example.com")
    try:
        options = Kickq(app).options
        assert (options["retry_count"], options["redis_namespace"]) == (5, "dj")
    finally:
        app.close()
    app = _django_style_app(kickq_redis_url, CELERY_KICKQ_REDIS_NAMSPACE="dj")
    try:
        with pytest.raises(ConfigError) as info:
            Kickq(app).options  # noqa: B018
        assert str(info.value) == ("unknown Celery setting 'CELERY_KICKQ_REDIS_NAMSPACE'; "
                                   "did you mean 'CELERY_KICKQ_REDIS_NAMESPACE'?")
    finally:
        app.close()


def test_a_config_module_importing_kickq_celery_is_no_typo(kickq_redis_url):
    module = ModuleType("celeryconfig")
    module.broker_url = kickq_redis_url  # type: ignore[attr-defined]
    module.kickq_celery = kickq_celery  # type: ignore[attr-defined]  # `import kickq_celery` in it
    module.kickq_retry_count = 6  # type: ignore[attr-defined]
    app = Celery("module-config", set_as_current=False)
    app.config_from_object(module)
    try:
        assert Kickq(app).options["retry_count"] == 6
    finally:
        app.close()


def test_app_settings_are_checked_once_per_config_change(kickq_redis_url, monkeypatch):
    app = make_app(kickq_redis_url)
    calls = []
    check = opts_module._check_app_setting_names
    monkeypatch.setattr(opts_module, "_check_app_setting_names", lambda conf: calls.append(1) or check(conf))
    try:
        kq = Kickq(app)
        for _ in range(100):
            assert kq.options["retry_count"] == 3
        assert len(calls) == 1
        Kickq.config(retry_count=2)
        assert kq.options["retry_count"] == 2 and len(calls) == 2
    finally:
        app.close()


def test_every_option_has_a_camel_case_alias():
    values = {"redis": "redis://127.0.0.1:6379/1", "redis_namespace": "ns", "job_flags": {"a": {}},
              "delay": 1, "tombstone": True, "tombstone_timeout": 2, "retry": True, "retry_count": 4,
              "retry_interval": [1, 2], "process_timeout": 3, "ghost_retry": False, "ghost_times": 5,
              "ghost_interval": 6, "purge_jobs": False, "purge_timeout": 7}
    camel = {"redisNamespace", "jobFlags", "tombstoneTimeout", "retryCount", "retryInterval",
             "processTimeout", "ghostRetry", "ghostTimes", "ghostInterval", "purgeJobs", "purgeTimeout"}
    Kickq.config({OPTIONS[k].camel: v for k, v in values.items()})
    assert camel <= {OPTIONS[k].camel for k in values}
    config = Kickq.get_config()
    for key, value in values.items():
        assert config[key] == value, key
