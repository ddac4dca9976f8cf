"""The Kickq instances of each Celery app, for the worker step and the ``celery kickq`` command.

Kept apart from the client so that the worker side finds the instances it serves
without importing the client.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from celery import Celery

if TYPE_CHECKING:
    from .client import Kickq

_instances: weakref.WeakKeyDictionary[Celery, list[Kickq]] = weakref.WeakKeyDictionary()


def register(app: Celery, kq: Kickq) -> None:
    _instances.setdefault(app, []).append(kq)


def instances(app: Celery) -> list[Kickq]:
    """The Kickq instances created for ``app``, oldest first."""
    return list(_instances.get(app, []))
