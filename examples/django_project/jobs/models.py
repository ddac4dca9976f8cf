from __future__ import annotations

from django.db import models


class Signup(models.Model):
    """A signed-up user: saved in the same transaction as the welcome-email job is asked for."""

    email = models.EmailField(unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
